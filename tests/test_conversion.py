"""Official checkpoint → Transformers folder: golden parity, B/L from key manifests, errors, CLI, Hub upload.

Official-format checkpoints are built here from tests/fixtures (copied from shared/golden): the real OffSeg-T
reference weights, and random tensors laid out like the reference OffSeg-B/L state dicts (key/shape manifests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from offseg_hf.conversion.convert import ConversionError, convert_checkpoint, push_folder_to_hub, read_checkpoint, resolve_dataset
from offseg_hf.data.registry import get_dataset_info

from hub_stand_in import LocalHub

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def official_t(fixtures_dir) -> dict[str, torch.Tensor]:
    return load_file(fixtures_dir / "offseg-t_official.safetensors")


@pytest.fixture(scope="module")
def official_t_pth(official_t, tmp_path_factory) -> Path:
    """The OffSeg-T reference weights as mmengine saves checkpoints: ``state_dict`` and ``meta`` (class names
    of the dataset, a numpy seed), plus bookkeeping objects that weights_only loading cannot build."""
    path = tmp_path_factory.mktemp("ckpt") / "offseg-t_ade20k.pth"
    meta = {
        "mmseg_version": "1.2.2", "iter": 160000, "seed": np.int64(1234),
        "dataset_meta": {"classes": tuple(n + " " if n == "bed" else n for n in get_dataset_info("ade20k").class_names)},
    }
    message_hub = {"log_scalars": {"loss": argparse.Namespace(history=np.zeros(4), count=np.int64(4))}}
    optimizer = {"state": {}, "param_groups": [{"lr": 6e-5, "weight_decay": 0.01}]}
    torch.save({"state_dict": official_t, "meta": meta, "message_hub": message_hub, "optimizer": optimizer}, path)
    return path


@pytest.fixture(scope="module")
def converted_t(official_t_pth, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "offseg-t-ade20k"
    result = convert_checkpoint(official_t_pth, out, verify=True, verify_size=64)
    return result


def manifest_state_dict(manifest: Path, template: dict[str, torch.Tensor], num_labels: int | None = None, seed: int = 0):
    """Random tensors with the keys/shapes of a reference state-dict manifest.

    Constant buffers are filled the way the reference fills them, taken from the real OffSeg-T weights (every
    variant uses the same 512-resolution attention layout and resampler positions): ``attention_bias_idxs_seg``
    and ``init_pos`` by shape, ``hamming_*`` = 1. ``num_labels`` re-sizes the class-dependent head tensors.
    """
    by_shape = {tuple(v.shape): v for k, v in template.items() if k.endswith("attention_bias_idxs_seg")}
    init_pos = next(v for k, v in template.items() if k.endswith("dysampler.init_pos"))
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in json.loads(manifest.read_text()):
        shape = list(shape)
        if num_labels is not None and (
            key.endswith("offset_learning.cls_repr") or "conv_seg" in key or "mask_norm" in key
        ):
            shape[1 if key.endswith("cls_repr") else 0] = num_labels
        if key.endswith("attention_bias_idxs_seg"):
            value = by_shape[tuple(shape)].clone()
        elif key.endswith("attention_bias_idxs"):
            value = torch.ones(shape, dtype=torch.long)
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(0)
        elif key.endswith("init_pos"):
            value = init_pos.clone()
        elif key.endswith(("hamming_lowpass", "hamming_highpass")):
            value = torch.ones(shape)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=generator) + 0.5
        else:
            value = torch.randn(shape, generator=generator) * 0.02
        state_dict[key] = value
    return state_dict


def assert_nothing_written(parent: Path, name: str):
    assert not (parent / name).exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]
    assert leftovers == [], f"staging folders left behind: {leftovers}"


# ------------------------------------------------------------------------------------------------ OffSeg-T


def test_t_folder_contents_and_golden_logits(converted_t, fixtures_dir):
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    folder = converted_t.output_dir
    assert EXPECTED_FILES <= {p.name for p in folder.iterdir()}
    assert (converted_t.preset, converted_t.dataset, converted_t.num_labels) == ("offseg-t", "ade20k", 150)
    # golden stats: 6,183,626 parameters excluding the unused conv_seg classifier
    stats = json.loads((fixtures_dir / "offseg_official_stats.json").read_text())
    assert converted_t.num_parameters == stats["offseg-t"]["params_total_excl_conv_seg"] == 6_183_626
    # --verify compared every saved tensor with its original (exactly) and the logits
    assert converted_t.verification["max_weight_diff"] == 0.0
    assert converted_t.verification["max_logits_diff"] <= 1e-5
    # every dropped key is one the converter documents as unused or derived
    assert "decode_head.conv_seg.weight" in converted_t.dropped_keys
    assert all(
        k.endswith(("attention_biases", "attention_bias_idxs", "attention_bias_idxs_seg", "init_pos", "hamming_lowpass", "hamming_highpass"))
        or "conv_seg" in k
        for k in converted_t.dropped_keys
    )

    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "offseg" and config.num_labels == 150
    assert config.id2label[0] == "wall" and config.id2label[149] == "flag" and config.label2id["bed"] == 7

    model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    golden = load_file(fixtures_dir / "offseg-t_io.safetensors")
    with torch.no_grad():
        logits = model(golden["pixel_values"]).logits
        logits_b2 = model(golden["pixel_values_b2"]).logits
    assert logits.shape == golden["logits"].shape
    assert (logits - golden["logits"]).abs().max().item() <= 1e-4
    assert (logits_b2 - golden["logits_b2"]).abs().max().item() <= 1e-4


def test_t_processor_and_card(converted_t):
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor

    folder = converted_t.output_dir
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "SegformerImageProcessor"  # a built-in class: no remote code, no auto_map
    assert "auto_map" not in json.loads((folder / "preprocessor_config.json").read_text())
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (512, 2048)
    assert processor.do_reduce_labels is True
    np.testing.assert_allclose(np.array(processor.image_mean) * 255, [123.675, 116.28, 103.53], rtol=1e-6)
    image = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    shape = tuple(processor(image, return_tensors="pt").pixel_values.shape)
    # short side 512, aspect ratio kept; Transformers truncates 682.67 (mmcv's half-up rounding, used by
    # offseg_hf.segment, gives 683: see tests/test_image_processing.py)
    assert shape == (1, 3, 512, 682)

    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-segmentation" and card.data.library_name == "transformers"
    assert "offseg-t_ade20k.pth" in card.text  # provenance of the converted file
    assert "6,183,626 (6.18 M, counted from the model)" in card.text


# pipeline("image-segmentation") on a converted folder in a fresh process (with and without `import offseg_hf.models`,
# stdin closed, no prompt) and its parity with offseg_hf.segment: tests/test_pipeline.py.


def test_overwrite_rules(converted_t, official_t_pth):
    folder = converted_t.output_dir
    before = (folder / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(official_t_pth, folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------------ B and L


def test_b_cityscapes_through_cli_and_hub(official_t, fixtures_dir, tmp_path, monkeypatch, capsys):
    """OffSeg-B with 19 classes (random weights), converted by ``offseg convert --push-to-hub --private``."""
    from huggingface_hub import constants

    from offseg_hf.cli import main
    from offseg_hf.models.modeling_offseg import OffSegForSemanticSegmentation

    state_dict = manifest_state_dict(fixtures_dir / "offseg-b_official_keys.json", official_t, num_labels=19)
    checkpoint = tmp_path / "offseg-b_cityscapes.pth"
    torch.save({"state_dict": state_dict, "meta": {}}, checkpoint)
    out = tmp_path / "offseg-b-cityscapes"
    with LocalHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
        status = main(["convert", str(checkpoint), str(out), "--push-to-hub", "someone/offseg-b-cityscapes", "--private"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "offseg-b, cityscapes (19 classes)" in printed.out and "uploaded" in printed.out

    model = OffSegForSemanticSegmentation.from_pretrained(out)
    assert model.config.id2label[0] == "road" and model.config.id2label[18] == "bicycle"
    assert model.config.backbone_config.hidden_sizes == [32, 64, 144, 288]
    torch.testing.assert_close(model.offset_learning.class_embeddings.data, state_dict["decode_head.offset_learning.cls_repr"][0])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).logits.shape == (1, 19, 16, 24)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 1024, "longest_edge": 2048} and processor["do_reduce_labels"] is False

    repo = hub.repos["someone/offseg-b-cityscapes"]
    assert repo.private is True
    assert set(repo.files) == {p.name for p in out.iterdir()}
    for name, data in repo.files.items():
        assert hashlib.sha256(data).digest() == hashlib.sha256((out / name).read_bytes()).digest(), name
    assert hub.unknown_requests == []
    assert set(hub.authorizations) == {"Bearer hf_stand_in_token"}


def test_l_cocostuff(official_t, fixtures_dir, tmp_path):
    from offseg_hf.models.modeling_offseg import OffSegForSemanticSegmentation

    state_dict = manifest_state_dict(fixtures_dir / "offseg-l_official_keys.json", official_t, num_labels=171, seed=1)
    checkpoint = tmp_path / "offseg-l_coco-stuff.pth"
    torch.save({"state_dict": state_dict, "meta": {}}, checkpoint)
    result = convert_checkpoint(checkpoint, tmp_path / "offseg-l-cocostuff")
    assert (result.preset, result.dataset, result.num_labels) == ("offseg-l", "coco-stuff", 171)
    model = OffSegForSemanticSegmentation.from_pretrained(result.output_dir)
    saved = model.state_dict()
    for official, ours in [
        ("backbone.network.6.9.token_mixer.attention_biases_seg", "offseg.backbone.stages.3.blocks.9.attention.relative_position.attention_biases"),
        ("backbone.network.5.attn.q.local.0.weight", "offseg.backbone.stages.3.downsample.attention.q.local.weight"),
        ("decode_head.freqfusions.2.content_encoder2.weight", "offseg.decoder.fusions.2.highpass_encoder.weight"),
    ]:
        assert torch.equal(saved[ours], state_dict[official]), official
    assert model.config.id2label[0] == "person" and model.config.id2label[170] == "wood"
    assert model.config.backbone_config.hidden_sizes == [40, 80, 192, 384]
    assert "OffSeg-L" in (result.output_dir / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ errors


def test_truncated_file(official_t_pth, tmp_path):
    data = official_t_pth.read_bytes()
    broken = tmp_path / "broken.pth"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert_checkpoint(broken, tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert_checkpoint(tmp_path / "nope.pth", tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_bookkeeping_objects_next_to_the_weights_are_ignored(tmp_path, caplog):
    """mmengine checkpoints pickle Python objects (message_hub, numpy scalars in meta) next to the weights:
    they are read as inert stand-ins under weights_only=True and dropped; the weights load."""
    checkpoint = tmp_path / "with_objects.pth"
    weights = {"a": torch.arange(3.0)}
    meta = {"seed": np.int64(7), "dataset_meta": {"classes": ("road", "sky")}, "args": argparse.Namespace(lr=1)}
    torch.save({"state_dict": weights, "meta": meta, "message_hub": {"log": argparse.Namespace(x=np.ones(3))}}, checkpoint)
    with caplog.at_level("INFO", logger="offseg_hf.conversion"):
        state_dict, read_meta = read_checkpoint(checkpoint)
    assert torch.equal(state_dict["a"], weights["a"])
    assert read_meta == {"dataset_meta": {"classes": ("road", "sky")}}
    assert "argparse.Namespace" in caplog.text


def test_objects_inside_the_weights_say_what_to_do(tmp_path):
    checkpoint = tmp_path / "numpy_weights.pth"
    torch.save({"state_dict": {"a": torch.zeros(1), "b": np.zeros(3)}, "meta": {}}, checkpoint)
    with pytest.raises(ConversionError) as error:
        read_checkpoint(checkpoint)
    message = str(error.value)
    assert "'b'" in message and "weights_only=True" in message and "trust" in message
    assert "torch.save({'state_dict'" in message


def test_other_architecture(tmp_path):
    # SegFormer + offset learning (also has cls_repr), in mmsegmentation key names
    segformer = {
        "backbone.layers.0.0.projection.weight": torch.zeros(32, 3, 7, 7),
        "decode_head.fusion_conv.conv.weight": torch.zeros(256, 1024, 1, 1),
        "decode_head.offset_learning.cls_repr": torch.zeros(1, 150, 256),
    }
    checkpoint = tmp_path / "segformer.pth"
    torch.save({"state_dict": segformer, "meta": {}}, checkpoint)
    with pytest.raises(ConversionError, match=r"not an OffSeg checkpoint.*SegFormer"):
        convert_checkpoint(checkpoint, tmp_path / "out")
    assert_nothing_written(tmp_path, "out")

    imagenet = tmp_path / "eformer_s1_450.pth"
    torch.save({"model": {"patch_embed.0.weight": torch.zeros(16, 3, 3, 3), "head.weight": torch.zeros(1000, 224)}}, imagenet)
    with pytest.raises(ConversionError, match="load_imagenet_backbone_weights"):
        convert_checkpoint(imagenet, tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_wrong_class_count(official_t, tmp_path):
    checkpoint = tmp_path / "offseg-t_100.pth"
    state_dict = dict(official_t)
    state_dict["decode_head.offset_learning.cls_repr"] = official_t["decode_head.offset_learning.cls_repr"][:, :100]
    torch.save({"state_dict": state_dict, "meta": {}}, checkpoint)
    with pytest.raises(ConversionError, match=r"100 classes.*matches none.*ade20k \(150\)"):
        convert_checkpoint(checkpoint, tmp_path / "out")
    assert_nothing_written(tmp_path, "out")
    with pytest.raises(ConversionError, match=r"150 classes.*'cityscapes' has 19"):
        resolve_dataset(150, "cityscapes")
    with pytest.raises(ConversionError, match="unknown dataset 'voc'"):
        resolve_dataset(150, "voc")


def test_dataset_resolution_and_processor_per_dataset(caplog):
    from offseg_hf.inference.image_processing_offseg import build_image_processor

    assert resolve_dataset(59).name == "pascal-context"
    assert resolve_dataset(19, "Cityscapes").name == "cityscapes"
    # class names in the checkpoint meta (mmengine checkpoints store them) decide before the count
    names = list(get_dataset_info("coco-stuff").class_names)
    assert resolve_dataset(171, meta={"dataset_meta": {"classes": names}}).name == "coco-stuff"
    # same count, different names: the table is used, with a warning naming the differences
    with caplog.at_level("WARNING", logger="offseg_hf.conversion"):
        info = resolve_dataset(19, meta={"dataset_meta": {"classes": ["lane"] + ["x"] * 18}})
    assert info.name == "cityscapes" and "0: 'lane' vs 'road'" in caplog.text
    expected = {  # (shortest_edge, longest_edge, reduce_labels) of the paper's test resize
        "ade20k": (512, 2048, True), "coco-stuff": (512, 2048, False),
        "cityscapes": (1024, 2048, False), "pascal-context": (520, 520, True),
    }
    for name, (short, long, reduce) in expected.items():
        processor = build_image_processor(name)
        assert (processor.size.shortest_edge, processor.size.longest_edge, processor.do_reduce_labels) == (short, long, reduce)


def test_renamed_and_reshaped_keys(official_t, tmp_path):
    state_dict = dict(official_t)
    state_dict["decode_head.align.conv.weights"] = state_dict.pop("decode_head.align.conv.weight")
    checkpoint = tmp_path / "renamed.pth"
    torch.save({"state_dict": state_dict, "meta": {}}, checkpoint)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(checkpoint, tmp_path / "out")
    message = str(error.value)
    assert "'decode_head.align.conv.weights'" in message  # the unexpected key, as in the file
    assert "missing key 'offseg.decoder.align.conv.weight'" in message
    assert str(checkpoint) in message
    assert_nothing_written(tmp_path, "out")

    state_dict = dict(official_t)
    state_dict["decode_head.offset_learning.cls_offset_proj.weight"] = torch.zeros(256, 128)
    torch.save({"state_dict": state_dict, "meta": {}}, checkpoint)
    with pytest.raises(
        ConversionError,
        match=r"wrong shape for 'decode_head.offset_learning.cls_offset_proj.weight': checkpoint \(256, 128\), model \(256, 256\)",
    ):
        convert_checkpoint(checkpoint, tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_failure_while_writing_leaves_nothing(official_t_pth, tmp_path, monkeypatch):
    """A failure after the model files were written (here: no card template) removes the staging folder."""
    monkeypatch.setenv("OFFSEG_MODEL_CARD_TEMPLATE", str(tmp_path / "missing_template.md"))
    target = tmp_path / "new_parent" / "offseg-t-ade20k"
    with pytest.raises(FileNotFoundError, match="missing_template.md"):
        convert_checkpoint(official_t_pth, target)
    assert not (tmp_path / "new_parent").exists(), "parent folders created for the output are removed again"


def test_cli_error_exit_status(tmp_path, capsys):
    from offseg_hf.cli import main

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["convert", str(broken), str(tmp_path / "out")]) == 1
    assert "offseg convert: error:" in capsys.readouterr().err
    assert_nothing_written(tmp_path, "out")


def test_python_m_offseg_hf_convert_help():
    completed = subprocess.run(
        [sys.executable, "-m", "offseg_hf", "convert", "--help"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert completed.returncode == 0, completed.stderr
    assert "--push-to-hub" in completed.stdout and "--verify" in completed.stdout


# ------------------------------------------------------------------------------------------------ Hub


def test_push_folder_to_local_hub(converted_t, monkeypatch):
    from huggingface_hub import constants

    with LocalHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        url = push_folder_to_hub(converted_t.output_dir, "me/offseg-t-ade20k", token="hf_explicit")
        # a second upload to the same (existing) repo works too
        push_folder_to_hub(converted_t.output_dir, "me/offseg-t-ade20k", token="hf_explicit", commit_message="again")
    repo = hub.repos["me/offseg-t-ade20k"]
    assert url.startswith(hub.endpoint + "/me/offseg-t-ade20k/commit/")
    assert repo.private is False and repo.commits == ["Upload OffSeg model", "again"]
    local = {p.name: p.read_bytes() for p in converted_t.output_dir.iterdir()}
    assert repo.files == local
    assert len(hub.lfs_objects) == 1, "model.safetensors travels through Git LFS"
    assert hub.validated_cards and "pipeline_tag: image-segmentation" in hub.validated_cards[0]
    assert hub.unknown_requests == []
    assert set(hub.authorizations) == {"Bearer hf_explicit"}


def test_per_pixel_baseline_checkpoint_converts_saves_and_reloads(official_t, fixtures_dir, tmp_path):
    """A reference checkpoint without offset learning (the per-pixel baseline of the paper's Table 6) becomes a
    ``classifier="per_pixel"`` folder whose logits are the checkpoint's conv_seg applied to the aligned feature."""
    from offseg_hf import OffSegForSemanticSegmentation

    generator = torch.Generator().manual_seed(5)
    state = {k: v for k, v in official_t.items() if not k.startswith("decode_head.offset_learning.")}
    state["decode_head.conv_seg.weight"] = torch.randn(150, 256, 1, 1, generator=generator) * 0.05
    state["decode_head.conv_seg.bias"] = torch.randn(150, generator=generator) * 0.05
    checkpoint = tmp_path / "per_pixel.pth"
    torch.save({"state_dict": state}, checkpoint)
    convert_checkpoint(checkpoint, tmp_path / "out", dataset="ade20k", verify=True, verify_size=64)
    model = OffSegForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    assert model.config.classifier == "per_pixel" and not hasattr(model, "offset_learning")
    golden = load_file(fixtures_dir / "offseg-t_io.safetensors")
    expected = torch.nn.functional.conv2d(
        golden["head.aligned"], state["decode_head.conv_seg.weight"], state["decode_head.conv_seg.bias"]
    )
    with torch.no_grad():
        logits = model(golden["pixel_values"]).logits
    assert (logits - expected).abs().max().item() <= 1e-4
