"""``offseg predict`` on generated images, including every awkward input: outputs are checked for content."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.cli import main
from offseg_hf.data.registry import get_dataset_info, palette_array
from offseg_hf.inference.image_io import load_image, to_rgb
from offseg_hf.inference.image_processing_offseg import build_image_processor
from offseg_hf.inference.visualize import deterministic_palette, overlay_layout

FAST = ["--scale", "128", "64", "--quiet"]  # short side 64: fast on CPU
CUSTOM_LABELS = ["sky", "tree", "road", "person", "car"]


pytestmark = pytest.mark.torch_threads(1)


@pytest.fixture(scope="module")
def ade_model(tmp_path_factory) -> Path:
    """OffSeg-T with the 150 ADE20K class names (random weights) and a processor config."""
    info = get_dataset_info("ade20k")
    torch.manual_seed(0)
    config = OffSegConfig.from_preset("offseg-t", num_labels=150, id2label=info.id2label, label2id=info.label2id)
    path = tmp_path_factory.mktemp("ade-model")
    OffSegForSemanticSegmentation(config).save_pretrained(path)
    build_image_processor("ade20k").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> Path:
    """Five classes matching no benchmark, and no preprocessor_config.json (the default processor is used)."""
    torch.manual_seed(1)
    config = OffSegConfig.from_preset(
        "offseg-t", num_labels=5, id2label=dict(enumerate(CUSTOM_LABELS)),
        label2id={name: index for index, name in enumerate(CUSTOM_LABELS)},
    )
    path = tmp_path_factory.mktemp("custom-model")
    OffSegForSemanticSegmentation(config).save_pretrained(path)
    return path


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), ((x // 9 + y // 7) % 2) * 180], -1)
    return np.clip(base + rng.integers(0, 50, (height, width, 3)), 0, 255).astype(np.uint8)


def _write_png16_rgb(path: Path, values: np.ndarray) -> None:
    """A 48-bit RGB PNG (PIL cannot write one)."""
    height, width, _ = values.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Every kind of input, with an 8-bit RGB "twin" where the expected prediction is known."""
    folder = tmp_path_factory.mktemp("inputs")
    photo = _photo(48, 64)
    files: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        files[name] = folder / name
        image.save(files[name], **kwargs)

    save("rgb.png", Image.fromarray(photo))
    save("flat.png", Image.new("RGB", (40, 30), (200, 30, 30)))
    save("grey.png", Image.fromarray(photo[..., 1]))
    save("grey_twin.png", Image.fromarray(np.repeat(photo[..., 1:2], 3, axis=-1)))
    palette_image = Image.fromarray(photo).quantize(colors=16)
    palette_image.info["transparency"] = 0
    save("palette.png", palette_image, transparency=0)
    save("palette_twin.png", palette_image.convert("RGB"))
    alpha = np.zeros((48, 64), np.uint8)
    alpha[:, 32:] = 255  # half fully transparent: its colours must still be used (alpha dropped, not composited)
    save("rgba.png", Image.fromarray(np.dstack([photo, alpha]), mode="RGBA"))
    sixteen = (photo[..., 0].astype(np.uint16) << 8) | 0xA5
    save("grey16.png", Image.fromarray(sixteen))
    save("grey16_twin.png", Image.fromarray(np.repeat(photo[..., :1], 3, axis=-1)))
    files["rgb16.png"] = folder / "rgb16.png"
    _write_png16_rgb(files["rgb16.png"], (photo.astype(np.uint16) << 8) | 0x3C)
    save("cmyk.jpg", Image.fromarray(photo).convert("CMYK"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to display
    sideways = Image.fromarray(_photo(40, 70, seed=3))
    save("rotated.jpg", sideways, exif=exif, quality=95)
    save("rotated_twin.png", ImageOps.exif_transpose(Image.open(files["rotated.jpg"])).convert("RGB"))
    save("tiny.png", Image.new("RGB", (1, 1), (10, 200, 30)))
    save("strip.png", Image.fromarray(_photo(50, 20000, seed=4)))
    good = files["rgb.png"].read_bytes()
    files["truncated.png"] = folder / "truncated.png"
    files["truncated.png"].write_bytes(good[: len(good) // 2])
    files["notes.txt"] = folder / "notes.txt"
    files["notes.txt"].write_text("not an image\n")
    files["fake.jpg"] = folder / "fake.jpg"
    files["fake.jpg"].write_text("also not an image\n")
    return files


BAD = ("truncated.png", "notes.txt", "fake.jpg")


@pytest.fixture(scope="module")
def ade_run(tmp_path_factory, ade_model, inputs):
    """One CLI run over all inputs with the ADE20K-named model."""
    out = tmp_path_factory.mktemp("ade-out")
    ordered = [str(path) for name, path in inputs.items()]
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        status = main(["predict", *ordered, "--model", str(ade_model), "--out", str(out), *FAST])
    return status, stdout.getvalue(), stderr.getvalue(), out


def _labels(out: Path, stem: str) -> np.ndarray:
    with Image.open(out / f"{stem}_labels.png") as image:
        assert image.mode == "P"
        return np.array(image)


def test_bad_files_reported_and_skipped_rest_written(ade_run, inputs):
    status, stdout, stderr, out = ade_run
    assert status == 1  # some inputs failed
    good = [name for name in inputs if name not in BAD]
    assert f"segmented {len(good)} of {len(inputs)} image(s)" in stdout
    for name in BAD:
        assert str(inputs[name]) in stdout and str(inputs[name]) in stderr  # named in the summary and as it happens
        assert not (out / f"{Path(name).stem}.json").exists()
    reasons = {line.split(": ", 1)[0].strip(): line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("  ")}
    assert reasons[str(inputs["truncated.png"])].startswith("cannot decode image")
    assert reasons[str(inputs["notes.txt"])] == reasons[str(inputs["fake.jpg"])] == "not an image file PIL can read"
    for name in good:
        stem = Path(name).stem
        for suffix in ("_labels.png", "_overlay.png", ".json"):
            assert (out / f"{stem}{suffix}").is_file(), f"{stem}{suffix}"


def test_label_png_json_and_overlay_content(ade_run, inputs):
    _, _, _, out = ade_run
    palette = palette_array("ade20k")
    for name in (n for n in inputs if n not in BAD):
        stem = Path(name).stem
        upright = load_image(inputs[name])
        labels = _labels(out, stem)
        assert labels.shape == (upright.height, upright.width), name
        assert labels.max() < 150
        with Image.open(out / f"{stem}_labels.png") as image:
            colours = np.array(image.getpalette()[: 3 * 150], dtype=np.uint8).reshape(150, 3)
        np.testing.assert_array_equal(colours, palette)  # the ADE20K palette as data

        record = json.loads((out / f"{stem}.json").read_text())
        assert (record["width"], record["height"]) == (upright.width, upright.height)
        assert record["palette"] == "ade20k" and record["mode"] == "whole" and record["tta"] is False
        assert record["protocol"]["name"] == "ade20k" and record["protocol"]["scale"] == [128, 64]
        ids, counts = np.unique(labels, return_counts=True)
        assert {c["id"]: c["pixels"] for c in record["classes"]} == dict(zip(ids.tolist(), counts.tolist()))
        assert sum(c["fraction"] for c in record["classes"]) == pytest.approx(1.0, abs=1e-9)
        assert [c["pixels"] for c in record["classes"]] == sorted((c["pixels"] for c in record["classes"]), reverse=True)
        names = get_dataset_info("ade20k").class_names
        assert all(c["label"] == names[c["id"]] for c in record["classes"])

        layout = overlay_layout(upright.height, upright.width, len(record["classes"]))
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.size == (layout.figure_size[1], layout.figure_size[0])


def test_overlay_panels_show_image_and_blend(ade_run, inputs):
    _, _, _, out = ade_run
    label = int(_labels(out, "flat")[15, 20])
    layout = overlay_layout(30, 40, len(json.loads((out / "flat.json").read_text())["classes"]))
    panel_h, panel_w = layout.panel_size
    with Image.open(out / "flat_overlay.png") as overlay:
        pixels = np.array(overlay.convert("RGB")).astype(int)
    top, left = layout.image_origin
    np.testing.assert_allclose(pixels[top + panel_h // 2, left + panel_w // 2], [200, 30, 30], atol=2)
    top, left = layout.prediction_origin
    expected = 0.5 * np.array([200, 30, 30]) + 0.5 * palette_array("ade20k")[label]
    np.testing.assert_allclose(pixels[top + panel_h // 2, left + panel_w // 2], expected, atol=2)


@pytest.mark.parametrize(
    ("name", "twin"),
    [
        ("grey.png", "grey_twin.png"),
        ("palette.png", "palette_twin.png"),
        ("rgba.png", "rgb.png"),  # alpha dropped: same prediction as the RGB pixels
        ("grey16.png", "grey16_twin.png"),  # 16-bit scaled to 8 bits (>> 8)
        ("rgb16.png", "rgb.png"),
        ("rotated.jpg", "rotated_twin.png"),  # EXIF rotation applied
    ],
)
def test_awkward_inputs_equal_their_8bit_rgb_twins(ade_run, name, twin):
    _, _, _, out = ade_run
    np.testing.assert_array_equal(_labels(out, Path(name).stem), _labels(out, Path(twin).stem))


def test_rotation_cmyk_tiny_and_strip_sizes(ade_run):
    _, _, _, out = ade_run
    assert _labels(out, "rotated").shape == (70, 40)  # stored 70 wide × 40 high, displayed upright
    assert _labels(out, "cmyk").shape == (48, 64)
    assert _labels(out, "tiny").shape == (1, 1)
    record = json.loads((out / "tiny.json").read_text())
    assert len(record["classes"]) == 1 and record["classes"][0]["fraction"] == 1.0
    assert _labels(out, "strip").shape == (50, 20000)


def test_image_io_modes(inputs):
    for name in ("grey.png", "palette.png", "rgba.png", "grey16.png", "rgb16.png", "cmyk.jpg"):
        assert load_image(inputs[name]).mode == "RGB"
    with Image.open(inputs["grey16.png"]) as image:
        assert image.mode.startswith("I")
        np.testing.assert_array_equal(np.array(to_rgb(image))[..., 0], np.array(image).astype(np.int64) >> 8)
    rgba = np.array(load_image(inputs["rgba.png"]))
    np.testing.assert_array_equal(rgba, np.array(Image.open(inputs["rgb.png"])))
    floats = Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), mode="F")
    assert np.array(to_rgb(floats))[-1, -1].tolist() == [255, 255, 255]


def test_missing_model_path_says_what_was_looked_for(tmp_path, inputs, capsys):
    missing = tmp_path / "no-such-model"
    status = main(["predict", str(inputs["rgb.png"]), "--model", str(missing), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert f"model folder not found: {missing}" in err and str(missing / "config.json") in err
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    assert main(["predict", str(inputs["rgb.png"]), "--model", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert f"looked for {empty / 'config.json'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_directories_duplicates_and_generated_palette(tmp_path, custom_model, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    Image.fromarray(_photo(30, 40)).save(first / "scene.png")
    Image.fromarray(_photo(36, 24, seed=5)).save(second / "scene.jpg")
    (first / "readme.txt").write_text("ignored: not an image suffix")
    (second / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    status = main(["predict", str(first), str(second), str(first / "scene.png"), "--model", str(custom_model),
                   "--out", str(out), "--mode", "slide", "--tta", "--scale", "64", "32", "--quiet"])
    stdout = capsys.readouterr().out
    assert status == 1 and str(second / "broken.png") in stdout and "readme" not in stdout
    assert "segmented 2 of 3 image(s)" in stdout  # duplicate argument counted once
    assert sorted(p.name for p in out.iterdir()) == [
        "scene-2.json", "scene-2_labels.png", "scene-2_overlay.png", "scene.json", "scene_labels.png", "scene_overlay.png",
    ]
    record = json.loads((out / "scene-2.json").read_text())
    assert record["image"] == str(second / "scene.jpg") and (record["width"], record["height"]) == (24, 36)
    assert record["palette"] == "generated" and record["mode"] == "slide" and record["tta"] is True
    assert {c["label"] for c in record["classes"]} <= set(CUSTOM_LABELS)
    with Image.open(out / "scene_labels.png") as image:
        colours = np.array(image.getpalette()[:15], dtype=np.uint8).reshape(5, 3)
    np.testing.assert_array_equal(colours, deterministic_palette(5))


def test_all_good_inputs_exit_zero_through_python_m_offseg_hf(tmp_path, custom_model, inputs):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "offseg_hf", "predict", str(inputs["rgb.png"]), "--model", str(custom_model), "--out", str(out), *FAST],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "segmented 1 of 1 image(s)" in completed.stdout
    assert (out / "rgb_labels.png").is_file()
