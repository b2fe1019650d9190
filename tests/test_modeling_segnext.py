"""Transformers-style tests of SegNeXt / MSCAN (tiny configs) and of the NMF determinism contract."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub.dataclasses import StrictDataclassClassValidationError
from transformers import AutoBackbone, AutoConfig, AutoModelForSemanticSegmentation

from offseg_hf import MscanBackbone, MscanConfig, SegNextConfig, SegNextForSemanticSegmentation, SegNextNMF2D
from offseg_hf.models.offset_learning import OffsetLearning

pytestmark = pytest.mark.torch_threads(1)

NUM_LABELS = 5
CLASSIFIERS = ["offset_learning", "per_pixel"]


def tiny_config(classifier="offset_learning", **kwargs):
    backbone = MscanConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], mlp_ratios=[2, 2, 2, 2], attention_kernel_size=3,
        strip_kernel_sizes=[3, 5], drop_path_rate=kwargs.pop("drop_path_rate", 0.0),
        out_features=["stage2", "stage3", "stage4"],
    )
    fields = dict(
        backbone_config=backbone, classifier=classifier, num_labels=NUM_LABELS, hamburger_channels=16,
        decoder_hidden_size=16, decoder_num_groups=4, nmf_rank=4,
    )
    fields.update(kwargs)
    return SegNextConfig(**fields)


def tiny_model(classifier="offset_learning", **kwargs):
    torch.manual_seed(0)
    return SegNextForSemanticSegmentation(tiny_config(classifier, **kwargs))


# ---------------------------------------------------------------- shapes and outputs


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_logits_at_stride_8_for_any_size(classifier):
    model = tiny_model(classifier).eval()
    assert hasattr(model, "offset_learning") == (classifier == "offset_learning")
    assert hasattr(model, "classifier") == (classifier == "per_pixel")
    with torch.no_grad():
        # 37 -> 19 -> 10 (stride 4) -> 5 (stride 8); 53 -> 27 -> 14 -> 7
        assert model(torch.randn(2, 3, 37, 53)).logits.shape == (2, NUM_LABELS, 5, 7)
        assert model(torch.randn(1, 3, 64, 96)).logits.shape == (1, NUM_LABELS, 8, 12)
        assert model(torch.randn(1, 3, 9, 9)).logits.shape == (1, NUM_LABELS, 2, 2)


def test_hidden_states_and_tuple_output():
    model = tiny_model().eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
        plain = model(pixel_values)
        as_tuple = model(pixel_values, return_dict=False)
    shapes = [tuple(h.shape) for h in outputs.hidden_states]
    assert shapes == [(1, 8, 16, 16), (1, 8, 16, 16), (1, 16, 8, 8), (1, 24, 4, 4), (1, 32, 2, 2)]  # stem, stages 1-4
    assert plain.hidden_states is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)


def test_backbone_out_features():
    config = MscanConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2])
    assert config.out_features == ["stage4"]  # the last stage, as every Transformers backbone config
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, MscanBackbone) and backbone.channels == [32]
    pixel_values = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        outputs = backbone(pixel_values)
        assert [tuple(m.shape) for m in outputs.feature_maps] == [(2, 32, 2, 3)]
        assert outputs.hidden_states is None
        backbone.out_features = ["stem", "stage2"]
        maps = backbone(pixel_values, output_hidden_states=True)
    assert [tuple(m.shape) for m in maps.feature_maps] == [(2, 8, 13, 18), (2, 16, 7, 9)]
    assert torch.equal(maps.feature_maps[1], maps.hidden_states[2])
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\)"):
        backbone(torch.randn(1, 4, 32, 32))


def test_config_validation_and_presets():
    with pytest.raises(StrictDataclassClassValidationError, match="use num_labels=2"):
        SegNextConfig(num_labels=1)
    with pytest.raises(StrictDataclassClassValidationError, match="classifier must be one of"):
        SegNextConfig(classifier="linear")
    with pytest.raises(ValueError, match="unknown SegNeXt preset"):
        SegNextConfig.from_preset("segnext-xl")
    config = SegNextConfig.from_preset("segnext-b-offset", num_labels=150)
    assert (config.classifier, config.hamburger_channels, config.backbone_config.depths) == ("offset_learning", 512, [3, 3, 12, 3])
    assert SegNextConfig.from_preset("segnext-l").backbone_config.drop_path_rate == 0.3
    assert SegNextConfig.from_preset("segnext-s").classifier == "per_pixel"


def test_bad_inputs_are_named():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r"nmf_bases must have shape .*\(1, 16, 4\).*\(1, 16, 5\)"):
        model(torch.randn(1, 3, 32, 32), nmf_bases=torch.rand(1, 16, 5))
    with pytest.raises(ValueError, match="got shape"):
        model(torch.randn(3, 32, 32))


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_save_and_load(tmp_path, classifier):
    model = tiny_model(classifier).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "segnext"
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded) is SegNextForSemanticSegmentation and reloaded.config.classifier == classifier
    pixel_values = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, model(pixel_values).logits)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == [
        "configuration_segnext.py", "loss.py", "modeling_segnext.py", "offset_learning.py", "precision.py"
    ]


def test_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "model")
    pixel_values = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.save({"pixel_values": pixel_values, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["offseg_hf"] = None  # make the package unimportable
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # the test's threads: parallel sums split the same way
        from transformers import AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = model(io["pixel_values"]).logits
        print(type(model).__module__, float((logits - io["expected"]).abs().max()))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, difference = result.stdout.split()
    assert module.startswith("transformers_modules") and float(difference) <= 1e-6


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_batching_equivalence(classifier):
    model = tiny_model(classifier).eval()
    pixel_values = torch.randn(3, 3, 40, 56)
    with torch.no_grad():
        batched = model(pixel_values).logits
        single = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_gradients_reach_every_parameter(classifier):
    model = tiny_model(classifier).train()
    labels = torch.randint(0, NUM_LABELS, (2, 40, 40))
    labels[:, :3] = 255
    loss = model(torch.randn(2, 3, 40, 40), labels=labels).loss
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_training_steps_reduce_the_loss(classifier):
    model = tiny_model(classifier).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = (pixel_values[:, 0] > 0).long() + 2 * (pixel_values[:, 1] > 0).long()
    losses = []
    for _ in range(15):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < 0.9 * losses[0]


def test_fresh_initialisation_follows_the_reference():
    model = tiny_model("per_pixel")
    assert torch.allclose(model.backbone.stages[0].blocks[0].layer_scale_1, torch.full((8,), 1e-2))
    mlp_fc1 = model.backbone.stages[0].blocks[0].mlp.fc1  # fan_out = 16: std sqrt(2/16)
    assert 0.2 < mlp_fc1.weight.std().item() < 0.5 and torch.equal(mlp_fc1.bias, torch.zeros(16))
    assert model.classifier.weight.std().item() < 0.02 and torch.equal(model.classifier.bias, torch.zeros(NUM_LABELS))
    assert model.decode_head.align.conv.weight.std().item() > 0.2  # Kaiming fan-out: sqrt(2/16)
    offset = tiny_model().offset_learning
    assert isinstance(offset, OffsetLearning) and 0.01 < offset.class_embeddings.std().item() < 0.03


# ---------------------------------------------------------------- NMF determinism


def test_inference_is_deterministic_and_leaves_the_global_rng_alone():
    model = tiny_model().eval()
    pixel_values = torch.randn(2, 3, 40, 40)
    state = torch.get_rng_state()
    with torch.no_grad():
        first = model(pixel_values).logits
        second = model(pixel_values).logits
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)
    other = SegNextForSemanticSegmentation(tiny_config(nmf_eval_seed=1)).eval()  # another fixed draw
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other(pixel_values).logits, first)
    assert "decode_head.hamburger.nmf.eval_bases" not in model.state_dict()  # derived from the seed, not saved
    assert torch.equal(
        model.decode_head.hamburger.nmf.eval_bases, SegNextNMF2D.draw_bases(1, 16, 4, torch.Generator().manual_seed(0))
    )


def test_reference_randomness_on_request():
    model = tiny_model(nmf_eval_seed=None).eval()
    pixel_values = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.manual_seed(5)
        first = model(pixel_values).logits
        second = model(pixel_values).logits
        torch.manual_seed(5)
        replay = model(pixel_values).logits
    assert not torch.equal(first, second) and torch.equal(first, replay)


def test_training_draws_fresh_bases():
    model = tiny_model(classifier_dropout_prob=0.0).train()  # no dropout, no drop path: the bases are the only randomness
    pixel_values = torch.randn(2, 3, 40, 40)
    first = model(pixel_values).logits
    second = model(pixel_values).logits
    assert not torch.allclose(first, second)
    bases = torch.rand(2, 16, 4)
    assert torch.equal(model(pixel_values, nmf_bases=bases).logits, model(pixel_values, nmf_bases=bases).logits)


def test_two_processes_give_identical_logits(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "model")
    torch.save(torch.randn(2, 3, 40, 48), tmp_path / "pixels.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        import offseg_hf.models  # registers SegNeXt
        from transformers import AutoModelForSemanticSegmentation
        torch.manual_seed(int(sys.argv[1]))  # a different global random state in each process
        torch.rand(int(sys.argv[1]))
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / "model")!r}).eval()
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)).logits
        torch.save(logits, sys.argv[2])
        """
    )
    for seed in (1, 2):
        result = subprocess.run(
            [sys.executable, "-c", script, str(seed), str(tmp_path / f"logits{seed}.pt")],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"logits{seed}.pt", weights_only=True) for seed in (1, 2))
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(first, model(torch.load(tmp_path / "pixels.pt", weights_only=True)).logits)


# ---------------------------------------------------------------- torch.export


def test_torch_export_static_and_dynamic():
    model = tiny_model().eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).logits
        static = torch.export.export(model, (pixel_values,))
        torch.testing.assert_close(static.module()(pixel_values).logits, expected, atol=1e-5, rtol=1e-5)
        # below 33 px the stride-32 map has one pixel, which export specialises
        height, width = torch.export.Dim("height", min=64, max=1024), torch.export.Dim("width", min=64, max=1024)
        dynamic = torch.export.export(model, (pixel_values,), dynamic_shapes={"pixel_values": {2: height, 3: width}})
        for other in (torch.randn(1, 3, 72, 120), torch.randn(1, 3, 97, 131)):
            torch.testing.assert_close(dynamic.module()(other).logits, model(other).logits, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(classifier_dropout_prob=0.0).train()
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.randint(0, NUM_LABELS, (2, 32, 32))
    bases = torch.rand(2, 16, 4)
    model(pixel_values, labels=labels, nmf_bases=bases).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.backbone.stages[0].blocks[0].gradient_checkpointing
    model(pixel_values, labels=labels, nmf_bases=bases).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
