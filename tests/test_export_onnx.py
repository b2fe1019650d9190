"""``offseg export`` / ``export_onnx`` and ``offseg predict --onnx``: one tiny OffSeg is exported ONCE (dynamic batch,
height and width, through the command line with its built-in verification) and every ONNX Runtime check reuses the
file. Bad export targets fail with one line and leave no file."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install -e '.[onnx]') is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra (pip install -e '.[onnx]') is not installed")

from offseg_hf import OffSegForSemanticSegmentation  # noqa: E402
from offseg_hf.cli import main  # noqa: E402
from offseg_hf.deploy.onnx_export import ExportError, export_onnx  # noqa: E402
from offseg_hf.deploy.onnx_runtime import OnnxSegmenter  # noqa: E402
from offseg_hf.inference.image_processing_offseg import build_image_processor  # noqa: E402
from offseg_hf.inference.predict import load_model  # noqa: E402
from test_modeling_common import tiny_offseg_config  # noqa: E402

pytestmark = pytest.mark.torch_threads(1)

TRACED = (64, 96)


def _run(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        status = main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny OffSeg (two attention stages, so the stage-4 bias resize is in the graph) with 5 classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-offseg")
    OffSegForSemanticSegmentation(tiny_offseg_config()).save_pretrained(path)
    build_image_processor("ade20k").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory) -> SimpleNamespace:
    """``offseg export DIR --format onnx --dynamic-size`` traced at 64×96, verified at three sizes: once per module."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    status, stdout, stderr = _run(["export", str(model_dir), "--format", "onnx", "--dynamic-size",
                                   "--size", *map(str, TRACED), "--out", str(out), "--quiet"])
    assert status == 0, stderr
    return SimpleNamespace(path=out, stdout=stdout)


def test_export_prints_its_verification_at_three_sizes(exported):
    lines = [line.strip() for line in exported.stdout.splitlines() if "arg-max agreement" in line]
    assert [line.split(":")[0] for line in lines] == ["64x96 batch 2", "64x128 batch 1", "43x93 batch 1"]
    assert all(line.endswith("[ok]") for line in lines)
    for line in lines:
        assert float(line.split("max abs diff ")[1].split(" ")[0]) <= 1e-4
    assert "any height/width >= 33" in exported.stdout


def test_graph_is_dynamic_and_carries_the_preprocessing(exported, model_dir):
    segmenter = OnnxSegmenter(exported.path)
    assert (segmenter.input_name, segmenter.output_name) == ("pixel_values", "logits")
    assert segmenter.input_shape == (None, 3, None, None)
    metadata = segmenter.metadata
    processor = build_image_processor("ade20k")
    assert metadata["preprocessing"]["image_mean"] == list(processor.image_mean)
    assert metadata["preprocessing"]["image_std"] == list(processor.image_std)
    assert metadata["preprocessing"]["scale"] == [2048, 512] and metadata["preprocessing"]["size_divisor"] == 32
    config = json.loads((model_dir / "config.json").read_text())
    assert metadata["id2label"] == config["id2label"] and metadata["model_type"] == "offseg"
    assert segmenter.image_processor().to_dict() == processor.to_dict()


def test_graph_takes_the_gather_forms_of_carafe_and_the_resampler(exported, model_dir):
    """CARAFE's windows and the resampler's bilinear points are whole-row Gathers of pixel-major maps (one per
    CARAFE call — four per fusion — one per bilinear corner), not the strided views / GridSample the eager model
    runs: ONNX Runtime runs those element by element (the full OffSeg-T: 231 such Gathers and 1.25 s before, 24
    and 0.41 s after)."""
    import onnx

    graph = onnx.load(str(exported.path)).graph
    assert "GridSample" not in {node.op_type for node in graph.node}
    row_gathers = [node for node in graph.node if node.op_type == "Gather"
                   and all(attribute.i == 0 for attribute in node.attribute if attribute.name == "axis")]
    model, _ = load_model(str(model_dir), device="cpu")
    assert len(row_gathers) == len(model.offseg.decoder.fusions) * (4 + 4)


@pytest.mark.parametrize("batch, size", [(1, (70, 90)), (3, (128, 64)), (1, (33, 161))])
def test_onnx_runtime_matches_eager_at_untraced_sizes(exported, model_dir, batch, size):
    """Sizes the trace never saw, two of them not multiples of 32 (the padding and crop are inside the graph)."""
    model, _ = load_model(str(model_dir), device="cpu", fold_batch_norm=False)
    pixel_values = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(pixel_values).logits.numpy()
    got = OnnxSegmenter(exported.path)(pixel_values.numpy())
    assert got.shape == expected.shape == (batch, 5, (size[0] + 3) // 4, (size[1] + 3) // 4)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_predict_onnx_gives_the_label_maps_of_predict(exported, model_dir, tmp_path):
    """Same images, same resize / TTA code, only the network call swapped: label maps agree (float rounding
    between ONNX Runtime and PyTorch kernels, ~1e-5 on the logits, may flip a pixel at a near tie)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(75, 100), (96, 64)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images / f"{index}.png")
    options = ["--scale", "256", "96", "--tta", "--quiet"]  # TTA: six sizes through the one dynamic file
    status, _, stderr = _run(["predict", str(images), "--model", str(model_dir), "--out", str(tmp_path / "torch"), *options])
    assert status == 0, stderr
    status, _, stderr = _run(["predict", str(images), "--onnx", str(exported.path), "--out", str(tmp_path / "onnx"), *options])
    assert status == 0, stderr
    for index in range(2):
        with Image.open(tmp_path / "torch" / f"{index}_labels.png") as a, Image.open(tmp_path / "onnx" / f"{index}_labels.png") as b:
            eager, onnx = np.array(a), np.array(b)
        assert eager.shape == onnx.shape
        assert (eager == onnx).mean() >= 0.999
        assert json.loads((tmp_path / "onnx" / f"{index}.json").read_text())["model"] == str(exported.path)


def test_bad_export_targets_fail_with_one_line_and_no_file(model_dir, tmp_path):
    out = tmp_path / "x.onnx"
    status, _, stderr = _run(["export", str(model_dir), "--format", "tflite", "--out", str(out)])
    assert status == 2 and stderr.strip() == "offseg export: unsupported --format 'tflite'; supported: onnx"

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    status, _, stderr = _run(["export", str(model_dir), "--out", str(blocker / "model.onnx")])
    assert status == 1 and f"cannot create the output folder {blocker}" in stderr
    assert len(stderr.strip().splitlines()) == 2  # the message and the --debug hint

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    status, _, stderr = _run(["export", str(no_weights), "--out", str(out)])
    assert status == 2 and str(no_weights) in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not (no_weights / "model.onnx").exists()


class _TwoClassConv(torch.nn.Module):
    """The smallest segmentation network: one 1×1 convolution (exports in seconds)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(id2label={0: "a", 1: "b"}, model_type="conv")
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, pixel_values):
        return SimpleNamespace(logits=self.conv(pixel_values))


def test_failed_export_or_verification_leaves_no_file(tmp_path):
    out = tmp_path / "conv.onnx"
    with pytest.raises(ExportError, match="verification of the ONNX file failed"):
        export_onnx(_TwoClassConv(), out, size=(40, 48), min_agreement=1.01)  # unattainable
    assert list(tmp_path.iterdir()) == []

    class Broken(_TwoClassConv):
        def forward(self, pixel_values):
            raise RuntimeError("boom")

    with pytest.raises(ExportError, match="export of Broken failed: RuntimeError: boom"):
        export_onnx(Broken(), out, size=(40, 48))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["segformer_offset", "segnext"])
def test_other_model_types_export_with_dynamic_sizes(kind, tmp_path):
    """SegFormer + offset learning and SegNeXt (whose NMF bases are a fixed draw in eval mode: two eager passes are
    identical, so the file can match them) export and verify at three sizes, one not a multiple of 32."""
    from offseg_hf import SegformerOffsetForSemanticSegmentation, SegNextForSemanticSegmentation
    from test_modeling_common import tiny_segformer_offset_config
    from test_modeling_segnext import tiny_config as tiny_segnext_config

    torch.manual_seed(0)
    model = (SegformerOffsetForSemanticSegmentation(tiny_segformer_offset_config()) if kind == "segformer_offset"
             else SegNextForSemanticSegmentation(tiny_segnext_config())).eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, model(pixel_values).logits)
    report = export_onnx(model, tmp_path / f"{kind}.onnx", size=(64, 96), verify_sizes=[(64, 96), (96, 64), (70, 90)])
    assert [check.size for check in report.checks] == [(64, 96), (96, 64), (70, 90)]
    assert all(check.ok and check.max_abs_diff <= 1e-4 for check in report.checks), report.summary()
    assert OnnxSegmenter(report.path).metadata["model_type"] == kind
