"""A small Transformers-style model tester, shared by the model test modules of this package.

It checks, for one model class and a tiny config, what Transformers' common model tests check for a vision
model (written here, not copied): config round trip, output shapes, hidden states and attentions through the
standard output capturing (``output_hidden_states`` / ``output_attentions`` as arguments and as config fields),
tuple outputs, save/load, batching equivalence, eager vs SDPA attention, a training step with gradients for every
parameter, gradient checkpointing, ``torch.export`` and the initialisation of weights missing from a checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file


def in_own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every parameter and buffer copied to fresh (allocator-aligned) memory.

    ``from_pretrained`` leaves tensors where the safetensors file puts them (8-byte aligned), and MKL's AVX2 matrix
    kernels round differently for unaligned operands (AMD EPYC: ~4e-6 on tiny models): a model compared bit for bit
    with one built in memory must first sit in memory of its own."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model


@dataclass
class ModelTester:
    model_class: type
    config: object
    input_size: tuple[int, int] = (64, 96)
    batch_size: int = 2
    num_hidden_states: int | None = None
    num_attentions: int | None = None
    has_labels: bool = True
    output_key: str = "logits"
    untrained_prefixes: tuple[str, ...] = field(default_factory=tuple)  # parameters a training step may not reach

    def make_model(self, seed: int = 0, **config_overrides):
        torch.manual_seed(seed)
        config = copy.deepcopy(self.config)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        return self.model_class(config)

    def inputs(self, batch_size: int | None = None, size: tuple[int, int] | None = None, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        height, width = size or self.input_size
        return torch.randn(batch_size or self.batch_size, 3, height, width, generator=generator)

    def labels(self, pixel_values: torch.Tensor, seed: int = 2) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        batch, _, height, width = pixel_values.shape
        return torch.randint(0, self.config.num_labels, (batch, height, width), generator=generator)

    def output(self, outputs):
        """The main output as one `(B, …)` tensor (a backbone's feature maps are flattened and concatenated)."""
        value = getattr(outputs, self.output_key)
        if isinstance(value, (tuple, list)):
            return torch.cat([feature_map.flatten(1) for feature_map in value], dim=1)
        return value

    # ------------------------------------------------------------------ checks

    def check_config_round_trip(self, tmp_path):
        self.config.save_pretrained(tmp_path)
        reloaded = type(self.config).from_pretrained(tmp_path)
        assert reloaded.to_dict() == self.config.to_dict()

    def check_save_load(self, tmp_path):
        """Bit-identical weights, and bit-identical outputs once they sit in memory of their own
        (:func:`in_own_memory`: 4.2e-6 on the tiny OffSeg as loaded, AMD EPYC); the loaded model itself to 1e-5."""
        model = self.make_model().eval()
        model.save_pretrained(tmp_path)
        reloaded = self.model_class.from_pretrained(tmp_path).eval()
        saved, loaded = model.state_dict(), reloaded.state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[key], loaded[key]) for key in saved)
        pixel_values = self.inputs()
        with torch.no_grad():
            expected = self.output(model(pixel_values))
            torch.testing.assert_close(self.output(reloaded(pixel_values)), expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(self.output(in_own_memory(reloaded)(pixel_values)), expected)

    def check_hidden_states(self, expected_shapes):
        """``expected_shapes``: the shapes of the hidden states for the default input."""
        model = self.make_model().eval()
        pixel_values = self.inputs()
        with torch.no_grad():
            by_argument = model(pixel_values, output_hidden_states=True).hidden_states
            model.config.output_hidden_states = True
            by_config = model(pixel_values).hidden_states
            model.config.output_hidden_states = False
            plain = model(pixel_values)
        assert plain.hidden_states is None
        assert len(by_argument) == len(expected_shapes)
        assert [tuple(state.shape) for state in by_argument] == [tuple(shape) for shape in expected_shapes]
        assert all(torch.equal(a, b) for a, b in zip(by_argument, by_config))

    def check_attentions(self, expected_shapes):
        """Attention weights are recorded with the eager implementation (SDPA returns none)."""
        model = self.make_model().eval()
        model.set_attn_implementation("eager")
        pixel_values = self.inputs()
        with torch.no_grad():
            outputs = model(pixel_values, output_attentions=True)
            model.config.output_attentions = True
            by_config = model(pixel_values).attentions
        attentions = outputs.attentions
        assert [tuple(a.shape) for a in attentions] == [tuple(shape) for shape in expected_shapes]
        assert all(torch.equal(a, b) for a, b in zip(attentions, by_config))
        for weights in attentions:  # probabilities over the keys (before any head mixing they sum to one)
            assert torch.isfinite(weights).all()

    def check_eager_equals_sdpa(self):
        eager = self.make_model().eval()
        eager.set_attn_implementation("eager")
        sdpa = self.make_model().eval()
        sdpa.set_attn_implementation("sdpa")
        pixel_values = self.inputs()
        with torch.no_grad():
            torch.testing.assert_close(self.output(eager(pixel_values)), self.output(sdpa(pixel_values)), atol=1e-5, rtol=1e-5)

    def check_tuple_output(self):
        model = self.make_model().eval()
        pixel_values = self.inputs()
        with torch.no_grad():
            as_dict = model(pixel_values, output_hidden_states=True)
            as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False)
        assert isinstance(as_tuple, tuple)
        first = as_tuple[0]
        if isinstance(first, (tuple, list)):  # a backbone's feature maps
            first = torch.cat([feature_map.flatten(1) for feature_map in first], dim=1)
        assert torch.equal(first, self.output(as_dict))
        assert len(as_tuple[1]) == len(as_dict.hidden_states)

    def check_batching_equivalence(self, atol: float = 1e-10):
        """A batch of 3 gives each image's own output, in float64: a sample leaking into another would move the
        outputs by ~1e-1, while float32 rounding alone (other matrix-kernel blockings for 3 images than for 1)
        reaches 1.4e-5 on AMD EPYC's AVX2 kernels, so float32 could not tell the two apart at a fixed tolerance."""
        model = self.make_model().double().eval()
        pixel_values = self.inputs(batch_size=3).double()
        with torch.no_grad():
            batched = self.output(model(pixel_values))
            single = torch.cat([self.output(model(pixel_values[i : i + 1])) for i in range(3)])
        torch.testing.assert_close(batched, single, atol=atol, rtol=atol)

    def check_training_step(self):
        """One step: the loss is finite and every parameter (but ``untrained_prefixes``) gets a non-zero gradient."""
        model = self.make_model().train()
        pixel_values = self.inputs()
        outputs = model(pixel_values, labels=self.labels(pixel_values))
        assert outputs.loss.ndim == 0 and torch.isfinite(outputs.loss)
        outputs.loss.backward()
        silent = [
            name
            for name, parameter in model.named_parameters()
            if not name.startswith(self.untrained_prefixes) and (parameter.grad is None or not parameter.grad.abs().sum() > 0)
        ]
        assert not silent, f"parameters without gradient: {silent}"

    def check_gradient_checkpointing(self):
        def step(model):
            pixel_values = self.inputs()
            loss = model(pixel_values, labels=self.labels(pixel_values)).loss
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        # Eager attention in both: under checkpointing the first forward runs without autograd, where SDPA may
        # pick another CPU kernel (measured 1e-4 on SegFormer's loss), which is not what this test is about.
        plain = self.make_model().train()
        plain.set_attn_implementation("eager")
        checkpointed = self.make_model().train()
        checkpointed.set_attn_implementation("eager")
        checkpointed.gradient_checkpointing_enable()
        assert checkpointed.is_gradient_checkpointing
        loss, grads = step(plain)
        loss_ckpt, grads_ckpt = step(checkpointed)
        torch.testing.assert_close(loss, loss_ckpt)
        assert grads.keys() == grads_ckpt.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ckpt[name], atol=1e-5, rtol=1e-4, msg=name)

    def check_export(self, dynamic_sizes=None, atol: float = 1e-4):
        """``torch.export`` with static shapes, and with dynamic H, W (multiples of 32) evaluated at sizes it was
        not traced at (``dynamic_sizes``)."""
        model = self.make_model().eval()
        pixel_values = self.inputs(batch_size=1)
        with torch.no_grad():
            program = torch.export.export(model, (pixel_values,))
            torch.testing.assert_close(
                self.output(program.module()(pixel_values)), self.output(model(pixel_values)), atol=atol, rtol=atol
            )
            if dynamic_sizes:
                height, width = torch.export.Dim("height", min=1, max=64), torch.export.Dim("width", min=1, max=64)
                program = torch.export.export(
                    model, (pixel_values,), dynamic_shapes={"pixel_values": {2: 32 * height, 3: 32 * width}}
                )
                for size in dynamic_sizes:
                    assert size != tuple(pixel_values.shape[-2:])
                    other = self.inputs(batch_size=1, size=size, seed=7)
                    torch.testing.assert_close(
                        self.output(program.module()(other)), self.output(model(other)), atol=atol, rtol=atol
                    )

    def check_missing_weights_are_initialised(self, tmp_path):
        """``from_pretrained`` of a checkpoint without any weight initialises every parameter and buffer as a fresh
        model does (same seed), through the model's own ``_init_weights``."""
        model = self.make_model()
        model.config.save_pretrained(tmp_path)
        save_file({}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        torch.manual_seed(0)
        loaded = self.model_class.from_pretrained(tmp_path)
        fresh = self.make_model(seed=0)
        loaded_state, fresh_state = loaded.state_dict(), fresh.state_dict()
        assert loaded_state.keys() == fresh_state.keys()
        for key, value in fresh_state.items():
            other = loaded_state[key]
            assert torch.isfinite(other.float()).all(), key
            if value.numel() == 1 or value.float().std() == 0:  # constant init (norms, layer scales, zero biases, indices)
                assert torch.equal(other, value), key
            elif value.numel() >= 64:  # random init: the same distribution (not the same draw)
                ratio = (other.float().std() / value.float().std()).item()
                assert 0.5 < ratio < 2.0, f"{key}: std {other.float().std():.4g} vs fresh {value.float().std():.4g}"
            else:
                assert other.float().std() > 0, f"{key} is constant where a fresh model draws it at random"
