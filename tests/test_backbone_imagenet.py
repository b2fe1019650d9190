"""EfficientFormerV2 ImageNet weights (authors' layout and timm's) → EfficientFormerV2Backbone.

timm models are built with random weights (no download); BatchNorm statistics, layer scales and attention
biases are re-drawn so that every block visibly contributes. Outputs are compared in float32 (the two
implementations run the same operations; only the attention's summation order differs).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

timm = pytest.importorskip("timm")

from offseg_hf.models.configuration_offseg import EfficientFormerV2Config  # noqa: E402
from offseg_hf.conversion.convert import (  # noqa: E402
    ConversionError,
    imagenet_to_reference_backbone,
    load_imagenet_backbone_weights,
    transfer_attention_biases,
)
from offseg_hf.conversion.keymaps import backbone_key  # noqa: E402
from offseg_hf.models.modeling_efficientformer_v2 import EfficientFormerV2Backbone  # noqa: E402
from model_tester import in_own_memory  # noqa: E402


@pytest.fixture(autouse=True)
def _flush_denormals():
    """Random EfficientFormerV2 weights produce subnormal floats, which make CPU kernels ~20× slower; flushing
    them to zero (same for both implementations) keeps these tests fast."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def randomize(model: torch.nn.Module, seed: int = 1, bias_std: float = 0.5) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.rand(param.shape, generator=generator) * 0.3 + 0.3)
            elif name.endswith("attention_biases"):
                param.copy_(torch.randn(param.shape, generator=generator) * bias_std)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def timm_s0():
    torch.manual_seed(0)
    return randomize(timm.create_model("efficientformerv2_s0", pretrained=False))


@pytest.fixture(scope="module")
def timm_s0_256(timm_s0):
    """The same weights in a timm model built for 256 inputs, attention biases zero."""
    model = timm.create_model("efficientformerv2_s0", pretrained=False, img_size=256)
    weights = {k: v for k, v in timm_s0.state_dict().items() if not k.endswith("attention_biases")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert all(k.endswith("attention_biases") for k in missing) and not unexpected
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attention_biases"):
                param.zero_()
    return model.eval()


def new_backbone(variant: str = "s0") -> EfficientFormerV2Backbone:
    return EfficientFormerV2Backbone(EfficientFormerV2Config.from_variant(variant, out_features=["stage1", "stage2", "stage3", "stage4"])).eval()


def features(model, pixel_values):
    with torch.no_grad():
        if isinstance(model, EfficientFormerV2Backbone):
            return list(model(pixel_values).feature_maps)
        return model.forward_intermediates(pixel_values, intermediates_only=True)


def test_every_timm_key_is_loaded_or_dropped(timm_s0):
    backbone = new_backbone()
    report = load_imagenet_backbone_weights(backbone, timm_s0.state_dict())
    assert report.layout == "timm" and report.attention_biases == "zero"
    timm_keys = set(timm_s0.state_dict())
    classifier = {k for k in timm_keys if k.split(".")[0] in ("head", "head_dist", "norm")}
    assert classifier == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "norm.weight", "norm.bias",
                          "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    imagenet_tables = {k for k in timm_keys if k.endswith("attention_biases")}
    assert len(imagenet_tables) == 5
    assert set(report.dropped) >= classifier
    assert len(report.dropped) == len(classifier) + len(imagenet_tables)
    # everything else landed, and the seg tables are (explicitly) zero
    assert len(report.loaded) == len(backbone.state_dict()) == len(timm_keys) - len(classifier) - len(imagenet_tables) + 5
    for key in report.zeroed:
        assert torch.count_nonzero(backbone.state_dict()[key]) == 0


def test_mlp_stages_match_timm_at_224(timm_s0):
    """Stages 1-2 (MLP blocks only) give exactly timm's features for the ImageNet input size."""
    backbone = new_backbone()
    load_imagenet_backbone_weights(backbone, timm_s0.state_dict())
    pixel_values = torch.randn(1, 3, 224, 224)
    ours, theirs = features(backbone, pixel_values), features(timm_s0, pixel_values)
    for stage in (0, 1):
        assert ours[stage].shape == theirs[stage].shape
        assert (ours[stage] - theirs[stage]).abs().max().item() <= 1e-6
    # stage 3/4 attention differs at 224 by design: our tables are the 512-layout ones (zero here)
    assert (ours[3] - theirs[3]).abs().max().item() > 1e-3


def test_all_stages_match_timm_with_reference_zero_biases(timm_s0, timm_s0_256):
    """With the reference's zero tables, every stage equals timm's (zero biases) at any multiple-of-32 size:
    our 512-layout zero matrix, resized, is still zero."""
    backbone = new_backbone()
    load_imagenet_backbone_weights(backbone, timm_s0.state_dict(), attention_biases="zero")
    pixel_values = torch.randn(1, 3, 256, 256)
    theirs = features(timm_s0_256, pixel_values)
    ours = features(backbone, pixel_values)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_transfer_keeps_tables_of_the_right_size():
    """A timm model built for 512 inputs has the segmentation tables: "transfer" copies them, all stages match."""
    model = randomize(timm.create_model("efficientformerv2_s0", pretrained=False, img_size=512), seed=3)
    backbone = new_backbone()
    load_imagenet_backbone_weights(backbone, model.state_dict(), attention_biases="transfer")
    pixel_values = torch.randn(1, 3, 512, 512)
    theirs = features(model, pixel_values)
    ours = features(backbone, pixel_values)
    for a, b in zip(ours, theirs):
        # float32: only summation-order rounding, amplified by the softmax (exactly 0 in float64)
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item() + 1e-5


def test_transfer_from_224_tables_copies_offsets(timm_s0):
    backbone = new_backbone()
    report = load_imagenet_backbone_weights(backbone, timm_s0.state_dict(), attention_biases="transfer")
    assert report.zeroed == []
    source = timm_s0.stages[2].blocks[4].token_mixer.attention_biases.detach()  # (8, 49): 7×7 offsets
    ours = backbone.stages[2].blocks[4].attention.relative_position.attention_biases.detach()  # (8, 256): 16×16
    grid = ours.reshape(8, 16, 16)
    torch.testing.assert_close(grid[:, :7, :7], source.reshape(8, 7, 7), rtol=0, atol=0)
    torch.testing.assert_close(grid[:, 10, 12], source.reshape(8, 7, 7)[:, 6, 6], rtol=0, atol=0)  # edge repeated
    torch.testing.assert_close(grid[:, 3, 15], source.reshape(8, 7, 7)[:, 3, 6], rtol=0, atol=0)
    # downsampling attention: 14×14 key offsets → 32×32
    source = timm_s0.stages[3].downsample.attn.attention_biases.detach().reshape(8, 14, 14)
    ours = backbone.stages[3].downsample.attention.relative_position.attention_biases.detach().reshape(8, 32, 32)
    torch.testing.assert_close(ours[:, :14, :14], source, rtol=0, atol=0)
    # the bias matrix for a pair of tokens at offset (2, 5) is the ImageNet bias for that offset
    relative = backbone.stages[2].blocks[4].attention.relative_position
    matrix = relative(256, 256)[0]  # (heads, queries, keys) on the 16×16 grid
    query, key = 0, 2 * 16 + 5
    torch.testing.assert_close(matrix[:, query, key], timm_s0.stages[2].blocks[4].token_mixer.attention_biases[:, 2 * 7 + 5].detach())


def test_transfer_attention_biases_rejects_non_square():
    with pytest.raises(ConversionError, match=r"\(2, 10\) is not a square grid"):
        transfer_attention_biases(torch.zeros(2, 10), 16)
    out = transfer_attention_biases(torch.arange(4.0).reshape(1, 4), 3)
    assert out.reshape(3, 3).tolist() == [[0, 1, 1], [2, 3, 3], [2, 3, 3]]


def test_timm_names_become_the_authors_names(fixtures_dir):
    """timm S1 renamed = exactly the authors' S1 backbone keys and shapes (taken from the OffSeg-T reference)."""
    official = load_file(fixtures_dir / "offseg-t_official.safetensors")
    authors = {
        k[len("backbone."):]: tuple(v.shape)
        for k, v in official.items()
        if k.startswith("backbone.") and not k.endswith(("attention_biases_seg", "attention_bias_idxs_seg", "attention_bias_idxs", "attention_biases"))
    }
    model = timm.create_model("efficientformerv2_s1", pretrained=False)
    weights, tables, dropped, layout = imagenet_to_reference_backbone(model.state_dict())
    assert layout == "timm"
    assert {k: tuple(v.shape) for k, v in weights.items()} == authors
    assert set(tables) == {k[len("backbone."):-len(".attention_biases")] for k in official if k.endswith(".attention_biases")}
    assert set(dropped) == {k for k in model.state_dict() if k.split(".")[0] in ("head", "head_dist", "norm")}


def test_authors_imagenet_file(fixtures_dir, tmp_path):
    """An ``eformer_s1_450.pth``-style file (authors' layout under ``model``) loads into the S1 backbone."""
    official = load_file(fixtures_dir / "offseg-t_official.safetensors")
    imagenet = authors_imagenet_s1(official)
    path = tmp_path / "eformer_s1_450.pth"
    torch.save({"model": imagenet}, path)

    backbone = new_backbone("s1")
    report = load_imagenet_backbone_weights(backbone, path)
    assert report.layout == "official"
    assert {"head.weight", "dist_head.weight", "norm.weight", "network.5.attn.attention_bias_idxs"} <= set(report.dropped)
    ours = backbone.state_dict()
    for key, value in imagenet.items():
        if key in report.dropped:
            continue
        assert torch.equal(ours[backbone_key(key)], value), key
    assert all(torch.count_nonzero(ours[k]) == 0 for k in report.zeroed) and len(report.zeroed) == 5


def authors_imagenet_s1(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``eformer_s1_450.pth``-style state dict: the reference S1 backbone tensors (OffSeg-T) in the authors'
    classification layout, plus a final norm, classifier and distillation head."""
    imagenet = {
        k[len("backbone."):]: v
        for k, v in official.items()
        if k.startswith("backbone.") and not k.endswith(("attention_biases_seg", "attention_bias_idxs_seg"))
    }
    generator = torch.Generator().manual_seed(5)
    imagenet.update({
        "norm.weight": torch.ones(224), "norm.bias": torch.zeros(224), "norm.running_mean": torch.zeros(224),
        "norm.running_var": torch.ones(224), "norm.num_batches_tracked": torch.tensor(0),
        "head.weight": torch.randn(1000, 224, generator=generator), "head.bias": torch.zeros(1000),
        "dist_head.weight": torch.randn(1000, 224, generator=generator), "dist_head.bias": torch.zeros(1000),
    })
    return imagenet


def test_offseg_convert_writes_a_backbone_folder(fixtures_dir, tmp_path, capsys):
    """``offseg convert eformer_s1_450.pth DIR`` recognises an ImageNet checkpoint and writes a backbone folder."""
    from offseg_hf.cli import main
    from offseg_hf.conversion.convert import detect_backbone_variant

    imagenet = authors_imagenet_s1(load_file(fixtures_dir / "offseg-t_official.safetensors"))
    assert detect_backbone_variant(imagenet) == "s1"
    path = tmp_path / "eformer_s1_450.pth"
    torch.save({"model": imagenet}, path)
    out = tmp_path / "efficientformerv2-s1"
    assert main(["convert", str(path), str(out), "--dataset", "ade20k"]) == 1  # OffSeg-only option
    err = capsys.readouterr().err
    assert "is a(n) EfficientFormerV2 ImageNet checkpoint; ['dataset'] apply to SegNeXt, SegFormer + offset learning, Mask2Former (Swin), OffSeg checkpoints only" in err
    assert not out.exists()
    assert main(["convert", str(path), str(out), "--attention-biases", "transfer"]) == 0
    assert "EfficientFormerV2-S1 backbone (official layout)" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    assert "EfficientFormerV2-S1" in (out / "README.md").read_text()

    # (AutoBackbone.from_pretrained rejects local folders in transformers 5.24: it asks the Hub whether the path
    # is a repo id first)
    loaded = in_own_memory(EfficientFormerV2Backbone.from_pretrained(out).eval())  # bit-exact comparison below
    assert loaded.config.hidden_sizes == [32, 48, 120, 224] and loaded.config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    direct = new_backbone("s1")
    load_imagenet_backbone_weights(direct, imagenet, attention_biases="transfer")
    pixel_values = torch.randn(1, 3, 64, 64)
    for a, b in zip(features(loaded, pixel_values), features(direct, pixel_values)):
        assert torch.equal(a, b)
    table = loaded.stages[2].blocks[7].attention.relative_position.attention_biases.detach().reshape(8, 16, 16)
    torch.testing.assert_close(table[:, :7, :7], imagenet["network.4.7.token_mixer.attention_biases"].reshape(8, 7, 7))


def test_into_an_offseg_model(timm_s0):
    """The training entry point: load into the backbone inside an OffSeg model."""
    from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation

    config = OffSegConfig.from_preset("offseg-t", num_labels=19, backbone_kwargs={})
    config.backbone_config = EfficientFormerV2Config.from_variant("s0", out_features=["stage1", "stage2", "stage3", "stage4"])
    model = OffSegForSemanticSegmentation(config)
    decoder_before = {k: v.clone() for k, v in model.offseg.decoder.state_dict().items()}
    load_imagenet_backbone_weights(model, timm_s0.state_dict())
    stem = model.offseg.backbone.state_dict()["embeddings.conv1.conv.weight"]
    assert torch.equal(stem, timm_s0.state_dict()["stem.conv1.conv.weight"])
    assert all(torch.equal(v, decoder_before[k]) for k, v in model.offseg.decoder.state_dict().items())


def test_wrong_variant_names_the_culprits(timm_s0):
    with pytest.raises(ConversionError) as error:
        load_imagenet_backbone_weights(new_backbone("s1"), timm_s0.state_dict())
    message = str(error.value)
    assert "hidden_sizes [32, 48, 120, 224]" in message
    assert "wrong shape for 'network.4.0.mlp.fc1.weight': checkpoint (384, 96, 1, 1), backbone (480, 120, 1, 1)" in message
    import re

    counts = re.search(r"(\d+) wrong shape\(s\), (\d+) missing, (\d+) unexpected", message.splitlines()[0])
    assert counts and int(counts.group(1)) > 0 and int(counts.group(2)) > 0, message.splitlines()[0]


def test_not_an_efficientformer_state_dict():
    with pytest.raises(ConversionError, match="not an EfficientFormerV2 ImageNet state dict"):
        load_imagenet_backbone_weights(new_backbone(), {"encoder.layer.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="attention_biases must be one of"):
        load_imagenet_backbone_weights(new_backbone(), {}, attention_biases="bicubic")
