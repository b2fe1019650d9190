"""Official SegNeXt checkpoints (plain and w/ offset learning) and MSCAN backbones → Transformers folders via `offseg convert`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from offseg_hf.cli import main
from offseg_hf.conversion.convert import ConversionError, convert_any_checkpoint
from offseg_hf.data.registry import get_dataset_info
from offseg_hf.models.modeling_segnext import MscanBackbone, SegNextForSemanticSegmentation

from hub_stand_in import LocalHub

REPO_ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-4


def save_mmengine_checkpoint(state_dict, path: Path, dataset: str | None = "ade20k") -> Path:
    meta = {"mmseg_version": "1.2.2", "seed": np.int64(0)}
    if dataset:
        meta["dataset_meta"] = {"classes": get_dataset_info(dataset).class_names}
    torch.save({"state_dict": state_dict, "meta": meta}, path)
    return path


@pytest.fixture(scope="module", params=["segnext-t-offset", "segnext-t"])
def converted(request, fixtures_dir, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    checkpoint = save_mmengine_checkpoint(
        load_file(fixtures_dir / f"{name}_official.safetensors"), root / f"{name}_ade20k.pth"
    )
    result = convert_any_checkpoint(checkpoint, root / f"{name}-ade20k", verify=True, verify_size=64)
    return name, result


def test_folder_and_golden_logits_after_conversion(converted, fixtures_dir):
    name, result = converted
    offset = name.endswith("-offset")
    assert (result.preset, result.dataset, result.num_labels) == (name, "ade20k", 150)
    assert result.dropped_keys == (["decode_head.conv_seg.bias", "decode_head.conv_seg.weight"] if offset else [])
    assert result.verification["max_weight_diff"] == 0.0 and result.verification["max_logits_diff"] == 0.0
    folder = result.output_dir
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "segnext" and config["classifier"] == ("offset_learning" if offset else "per_pixel")
    assert config["id2label"]["0"] == "wall" and config["id2label"]["149"] == "flag"
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 512, "longest_edge": 2048} and processor["do_reduce_labels"] is True

    model = SegNextForSemanticSegmentation.from_pretrained(folder).eval()
    golden = load_file(fixtures_dir / f"{name}_io.safetensors")
    with torch.no_grad():
        for suffix in ("", "_b2"):
            logits = model(golden[f"pixel_values{suffix}"], nmf_bases=golden[f"hamburger.bases{suffix}"]).logits
            torch.testing.assert_close(logits, golden[f"logits{suffix}"], atol=ATOL, rtol=ATOL)


FRESH_PROCESS_PIPELINE = """
import sys
import numpy as np
from PIL import Image
import offseg_hf  # activates SegNeXt with the Auto classes
from offseg_hf.data.registry import get_dataset_info
from transformers import pipeline
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
segments = pipeline("image-segmentation", model=sys.argv[1], trust_remote_code=False)(image)
coverage = sum(np.array(s["mask"]) > 0 for s in segments)
names = set(get_dataset_info("ade20k").class_names)
print(len(segments), {s["mask"].size for s in segments} == {(64, 48)}, int(coverage.min()), int(coverage.max()),
      all(s["label"] in names for s in segments), sep="|")
"""


def test_pipeline_on_a_converted_folder_in_a_fresh_process(converted):
    _, result = converted
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_PIPELINE, str(result.output_dir)],
        capture_output=True, text=True, timeout=600, cwd=result.output_dir.parent, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    count, sizes_ok, low, high, labels_ok = completed.stdout.strip().splitlines()[-1].split("|")
    assert int(count) >= 1 and sizes_ok == "True" and (low, high) == ("1", "1") and labels_ok == "True"


def manifest_state_dict(manifest: Path, num_labels: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with a reference manifest's keys and shapes, classes re-sized to ``num_labels``."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in json.loads(manifest.read_text()):
        shape = list(shape)
        if key.endswith("cls_repr"):
            shape[1] = num_labels
        elif "conv_seg" in key or "mask_norm" in key:
            shape[0] = num_labels
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state_dict[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state_dict[key] = torch.randn(shape, generator=generator) * 0.02
    return state_dict


def test_s_offset_cityscapes_through_the_cli_and_the_hub(fixtures_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    state_dict = manifest_state_dict(fixtures_dir / "segnext-s-offset_official_keys.json", num_labels=19)
    checkpoint = save_mmengine_checkpoint(state_dict, tmp_path / "segnext-s-offset_city.pth", dataset=None)
    out = tmp_path / "segnext-s-offset-cityscapes"
    with LocalHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
        status = main(["convert", str(checkpoint), str(out), "--verify", "--verify-size", "64",
                       "--push-to-hub", "someone/segnext-s-offset-cityscapes"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "segnext-s-offset, cityscapes (19 classes)" in printed.out and "verified" in printed.out
    assert set(hub.repos["someone/segnext-s-offset-cityscapes"].files) == {p.name for p in out.iterdir()}
    model = SegNextForSemanticSegmentation.from_pretrained(out)
    assert model.config.id2label[0] == "road" and model.config.backbone_config.depths == [2, 2, 4, 2]
    torch.testing.assert_close(model.offset_learning.class_embeddings.data, state_dict["decode_head.offset_learning.cls_repr"][0])
    assert torch.equal(
        model.state_dict()["backbone.stages.2.blocks.3.attention.msca.strip_convolutions.1.vertical.weight"],
        state_dict["backbone.block3.3.attn.spatial_gating_unit.conv1_2.weight"],
    )


def test_truncated_file_is_refused_and_nothing_written(fixtures_dir, tmp_path):
    checkpoint = save_mmengine_checkpoint(
        load_file(fixtures_dir / "segnext-t_official.safetensors"), tmp_path / "segnext-t.pth"
    )
    data = checkpoint.read_bytes()
    broken = tmp_path / "broken.pth"
    broken.write_bytes(data[: len(data) // 2])
    assert main(["convert", str(broken), str(tmp_path / "out")]) == 1
    with pytest.raises(ConversionError, match="truncated"):
        convert_any_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_renamed_key_is_named(fixtures_dir, tmp_path):
    state_dict = dict(load_file(fixtures_dir / "segnext-t-offset_official.safetensors"))
    state_dict["decode_head.align.gn.weights"] = state_dict.pop("decode_head.align.gn.weight")
    checkpoint = save_mmengine_checkpoint(state_dict, tmp_path / "renamed.pth")
    with pytest.raises(ConversionError) as error:
        convert_any_checkpoint(checkpoint, tmp_path / "out")
    message = str(error.value)
    assert "renamed.pth" in message and "'decode_head.align.gn.weights'" in message
    assert "missing key 'decode_head.align.norm.weight'" in message
    assert not (tmp_path / "out").exists()


def test_dataset_disagreeing_with_the_class_count(fixtures_dir, tmp_path):
    checkpoint = save_mmengine_checkpoint(
        load_file(fixtures_dir / "segnext-t_official.safetensors"), tmp_path / "t.pth", dataset=None
    )
    with pytest.raises(ConversionError, match="150 classes.*'cityscapes' has 19"):
        convert_any_checkpoint(checkpoint, tmp_path / "out", dataset="cityscapes")


def test_mscan_imagenet_backbone(fixtures_dir, tmp_path, capsys):
    """An ImageNet MSCAN file (backbone keys without prefix + classifier head) → a backbone folder whose
    features equal the SegNeXt-T backbone's on the same weights."""
    official = load_file(fixtures_dir / "segnext-t_official.safetensors")
    imagenet = {k.removeprefix("backbone."): v for k, v in official.items() if k.startswith("backbone.")}
    imagenet["head.weight"], imagenet["head.bias"] = torch.randn(1000, 256), torch.randn(1000)
    checkpoint = tmp_path / "mscan_t.pth"
    torch.save({"state_dict": imagenet}, checkpoint)
    assert main(["convert", str(checkpoint), str(tmp_path / "mscan-t")]) == 0
    assert "MSCAN-T backbone" in capsys.readouterr().out
    backbone = MscanBackbone.from_pretrained(tmp_path / "mscan-t").eval()
    assert backbone.out_features == ["stage2", "stage3", "stage4"]
    segnext = SegNextForSemanticSegmentation.from_pretrained(
        convert_any_checkpoint(save_mmengine_checkpoint(official, tmp_path / "t.pth"), tmp_path / "t").output_dir
    ).eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for ours, theirs in zip(backbone(pixel_values).feature_maps, segnext.backbone(pixel_values).feature_maps):
            assert torch.equal(ours, theirs)
    broken = dict(imagenet)
    del broken["block2.0.mlp.fc1.bias"]
    torch.save(broken, tmp_path / "broken_mscan.pth")
    with pytest.raises(ConversionError, match=r"missing key 'stages\.1\.blocks\.0\.mlp\.fc1\.bias'"):
        convert_any_checkpoint(tmp_path / "broken_mscan.pth", tmp_path / "broken-out")
