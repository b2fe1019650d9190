"""`offseg convert` on an official "SegFormer w/ Offset Learning" checkpoint (built from the golden fixture)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation

import offseg_hf  # noqa: F401  (activates the Auto classes)
from offseg_hf.cli import main
from offseg_hf.models.modeling_segformer_offset import SegformerOffsetForSemanticSegmentation


@pytest.fixture(scope="module")
def official_checkpoint(fixtures_dir, tmp_path_factory):
    state_dict = load_file(fixtures_dir / "segformer-b0-offset_official.safetensors")
    path = tmp_path_factory.mktemp("ckpt") / "segformer-b0-offset_ade20k.pth"
    torch.save({"state_dict": state_dict, "meta": {}}, path)
    return path


def test_cli_converts_and_reproduces_reference_logits(official_checkpoint, fixtures_dir, tmp_path, capsys):
    output = tmp_path / "segformer-b0-offset-ade20k"
    assert main(["convert", str(official_checkpoint), str(output), "--verify", "--verify-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "segformer-offset, ade20k (150 classes)" in printed and "verified" in printed
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "segformer_offset" and config["id2label"]["0"] == "wall"
    assert (output / "preprocessor_config.json").exists()
    model = AutoModelForSemanticSegmentation.from_pretrained(output).eval()
    assert isinstance(model, SegformerOffsetForSemanticSegmentation)
    golden = load_file(fixtures_dir / "segformer-b0-offset_io.safetensors")
    with torch.no_grad():
        logits = model(golden["pixel_values"]).logits
    assert (logits - golden["logits"]).abs().max().item() <= 1e-4


def test_renamed_key_is_reported_and_nothing_written(official_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(official_checkpoint, weights_only=True)
    state_dict = checkpoint["state_dict"]
    state_dict["decode_head.offset_learning.cls_offset_proj.weight_renamed"] = state_dict.pop(
        "decode_head.offset_learning.cls_offset_proj.weight"
    )
    broken = tmp_path / "broken.pth"
    torch.save(checkpoint, broken)
    output = tmp_path / "out"
    assert main(["convert", str(broken), str(output)]) == 1
    assert not output.exists()
    assert "offset_proj.weight_renamed" in capsys.readouterr().err  # named (in our key layout)
