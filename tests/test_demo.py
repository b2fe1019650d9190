"""``offseg demo`` without a browser: the handlers on every model type, the CLI, the missing-Gradio message and
the Hugging Face Space template (its ``app.py`` is imported in a fresh interpreter and builds the app)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offseg_hf.cli import build_parser, main
from offseg_hf.inference.predict import label_map_from_png, load_model, predict_files, prediction_settings

pytestmark = pytest.mark.torch_threads(1)

SCALE = (128, 64)


def _require_gradio() -> None:
    if importlib.util.find_spec("gradio") is not None:
        return
    message = 'Gradio is not installed: pip install "offseg-hf[demo]"'
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI installs it: see .ci/run)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random OffSeg, SegFormer and SegFormer + offset learning folders (5 classes)."""
    from test_training import tiny_config
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from offseg_hf import OffSegForSemanticSegmentation, add_offset_learning

    names = ["sky", "tree", "road", "person", "car"]
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    folders = {}
    torch.manual_seed(0)
    config = tiny_config(5)
    config.id2label, config.label2id = labels["id2label"], labels["label2id"]
    folders["offseg"] = tmp_path_factory.mktemp("offseg")
    OffSegForSemanticSegmentation(config).save_pretrained(folders["offseg"])
    segformer = SegformerForSemanticSegmentation(SegformerConfig(
        hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1], decoder_hidden_size=16,
        num_labels=5, **labels,
    ))
    folders["segformer"] = tmp_path_factory.mktemp("segformer")
    segformer.save_pretrained(folders["segformer"])
    SegformerImageProcessor().save_pretrained(folders["segformer"])
    folders["segformer_offset"] = tmp_path_factory.mktemp("segformer_offset")
    add_offset_learning(segformer).save_pretrained(folders["segformer_offset"])
    SegformerImageProcessor().save_pretrained(folders["segformer_offset"])
    return folders


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from offseg_hf.data.synthetic import SyntheticScenes

    image, _ = SyntheticScenes(num_labels=8, image_size=(80, 112), seed=5).generate(0, "test")
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(image).save(path)
    return path


@pytest.mark.parametrize("kind", ["offseg", "segformer", "segformer_offset"])
def test_handler_matches_offseg_predict_for_every_model_type(kind, model_dirs, scene, tmp_path):
    from offseg_hf.inference.demo import ALL_CLASSES, DemoApp, load_demo_models

    folder = str(model_dirs[kind])
    app = DemoApp(load_demo_models([folder], device="cpu", scale=SCALE))
    result = app.segment(str(scene), folder, mode="slide", tta=False, opacity=0.5, highlight=ALL_CLASSES)
    assert not result.error, result.status
    assert "Model time" in result.status and "slide" in result.status

    model, processor = load_model(folder, device="cpu")
    summary = predict_files([scene], model, processor, tmp_path, mode="slide", scale=SCALE, progress=False)
    assert summary.ok
    paths = summary.written[scene]
    assert np.array_equal(result.overlay, np.array(Image.open(paths["overlay"]).convert("RGB")))
    assert np.array_equal(label_map_from_png(result.label_map_path), label_map_from_png(paths["labels"]))
    present = [int(v) for v in np.unique(label_map_from_png(paths["labels"]))]
    assert sorted(value for _, value in result.choices[1:]) == present
    assert result.table_html.count("<tr data-class-id=") == len(present)

    # the redraw reproduces the first drawing, and another opacity changes it
    assert np.array_equal(app.redraw(result.state, 0.5, ALL_CLASSES), result.overlay)
    assert not np.array_equal(app.redraw(result.state, 0.9, ALL_CLASSES), result.overlay)


def test_handler_reports_bad_files_and_keeps_working(model_dirs, scene, tmp_path):
    from offseg_hf.inference.demo import DemoApp, load_demo_models

    app = DemoApp(load_demo_models([str(model_dirs["offseg"])], device="cpu", scale=SCALE))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(scene.read_bytes()[:200])
    text = tmp_path / "readme.jpg"
    text.write_text("hello\n")
    for path, reason in ((truncated, "cannot decode image"), (text, "not an image file PIL can read"),
                         (tmp_path / "gone.png", "no such file")):
        result = app.segment(str(path), None)
        assert result.error and path.name in result.status and reason in result.status, result.status
        assert result.overlay is None and result.state is None and result.table_html == ""
    assert not app.segment(str(scene), None).error
    assert not app.segment(None, None).error  # cleared input: a hint, no error


def test_highlight_keeps_only_that_class_coloured(model_dirs, scene):
    from offseg_hf.inference.demo import DemoApp, load_demo_models
    from offseg_hf.inference.visualize import overlay_layout

    app = DemoApp(load_demo_models([str(model_dirs["offseg"])], device="cpu", scale=SCALE))
    result = app.segment(str(scene), None, opacity=1.0)
    state = result.state
    target = state["fractions"][0]["id"]
    highlighted = app.redraw(state, 1.0, target)
    layout = overlay_layout(*state["label_map"].shape, len(state["fractions"]))
    (top, left), (height, width) = layout.prediction_origin, layout.panel_size
    panel = highlighted[top : top + height, left : left + width].astype(int)
    image_panel = highlighted[layout.image_origin[0] : top + height, layout.image_origin[1] : layout.image_origin[1] + width]
    labels = np.asarray(Image.fromarray(state["label_map"].astype(np.int32)).resize((width, height), Image.Resampling.NEAREST))
    palette = app.models[str(model_dirs["offseg"])].settings.palette
    assert (panel[labels == target] == palette[target]).all()  # opacity 1: the class colour itself
    others = labels != target
    assert np.abs(panel[others] - image_panel.astype(int)[others] // 2).max() <= 1  # the image at half brightness


def test_demo_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    demo_parser = build_parser()._subparsers._group_actions[0].choices["demo"]
    for action in demo_parser._actions:
        for option in action.option_strings:
            assert option in text
        if action.help and action.dest != "help":
            assert action.help.split()[0] in text
    assert 'pip install "offseg-hf[demo]"' in text


def test_cli_help_does_not_import_gradio():
    code = "import sys; from offseg_hf.cli import build_parser; build_parser().format_help(); print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_without_gradio_the_command_says_how_to_install_it(model_dirs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["demo", "--model", str(model_dirs["offseg"])]) == 2
    assert 'pip install "offseg-hf[demo]"' in capsys.readouterr().err
    assert main(["demo", "--model", "user/repo", "--export-space", "space"]) == 2
    assert 'pip install "offseg-hf[demo]"' in capsys.readouterr().err


def test_bad_arguments_and_missing_model(tmp_path, capsys):
    _require_gradio()
    assert main(["demo", "--model", str(tmp_path / "nothing")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path), "--protocol", "imagenet"]) == 2
    assert main(["demo", "--model", str(tmp_path), "--scale", "0", "5"]) == 2


def test_export_space_app_builds_the_demo(model_dirs, tmp_path, capsys):
    _require_gradio()
    space = tmp_path / "space"
    assert main(["demo", "--export-space", str(space), "--model", "someone/offseg-t-ade20k"]) == 0
    assert "upload_folder" in capsys.readouterr().out
    readme = (space / "README.md").read_text()
    front = readme.split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front and "  - someone/offseg-t-ade20k" in front
    import gradio

    assert f"sdk_version: {gradio.__version__}" in front
    requirements = (space / "requirements.txt").read_text().splitlines()
    names = {line.split(">")[0].split("<")[0].split("=")[0].strip() for line in requirements}
    assert {"torch", "transformers", "gradio", "huggingface_hub", "safetensors"} <= names
    assert "MODELS = ['someone/offseg-t-ade20k']" in (space / "app.py").read_text()
    assert (space / "offseg_hf" / "inference" / "demo.py").is_file() and (space / "offseg_hf" / "data" / "tables").is_dir()
    assert (space / "offseg_hf" / "conversion" / "templates" / "TEMPLATE.md").is_file()

    # A fresh interpreter in the Space folder: app.py must import the copied package and build the Blocks
    # (against a local model folder instead of the Hub repo, and with no network).
    code = (
        "import app, offseg_hf, gradio, sys; "
        "assert isinstance(app.demo, gradio.Blocks); "
        "print(offseg_hf.__file__); print(sorted(app.demo.offseg_app.models))"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OFFSEG_MODELS=str(model_dirs["offseg"]), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=space, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    package_file, models = run.stdout.strip().splitlines()[-2:]
    assert Path(package_file).resolve().is_relative_to(space.resolve())
    assert models == repr([str(model_dirs["offseg"])])


def test_space_requirements_come_from_the_package_metadata():
    _require_gradio()
    from offseg_hf.inference.demo import space_requirements

    requirements = space_requirements()
    assert any(line.startswith("gradio") for line in requirements)
    assert not any(line.startswith(("pytest", "playwright")) for line in requirements)  # dev extra left out


def test_examples_are_generated_scenes(tmp_path):
    from offseg_hf.inference.demo import example_images

    paths = example_images(tmp_path, count=2, size=(48, 64))
    assert [p.name for p in paths] == ["example_1.png", "example_2.png"]
    first = np.array(Image.open(paths[0]))
    assert first.shape == (48, 64, 3) and first.std() > 10
    assert np.array_equal(first, np.array(Image.open(example_images(tmp_path / "again", count=1, size=(48, 64))[0])))


def test_prediction_settings_match_predict_defaults(model_dirs):
    model, _ = load_model(str(model_dirs["offseg"]), device="cpu")
    settings = prediction_settings(model, scale=SCALE)
    assert settings.protocol.scale == SCALE and settings.protocol_record["name"] == "ade20k"
    assert settings.palette.shape == (5, 3)


def test_model_cards_point_to_the_demo_and_the_space():
    from offseg_hf.conversion.model_cards import render_model_card

    card = render_model_card("offseg-t", "ade20k", model_id="someone/offseg-t-ade20k")
    assert 'pip install "offseg-hf[demo]"' in card
    assert "offseg demo --model someone/offseg-t-ade20k" in card
    assert "offseg demo --export-space space --model someone/offseg-t-ade20k" in card and "repo_type='space'" in card


def test_every_event_shares_one_queue_slot_and_models_are_offered(model_dirs):
    _require_gradio()
    from offseg_hf.inference.demo import CONCURRENCY_ID, build_demo

    folders = [str(model_dirs["offseg"]), str(model_dirs["segformer"])]
    demo = build_demo(folders, device="cpu", scale=SCALE, examples=False)
    functions = list(demo.fns.values())
    assert functions and all(f.concurrency_id == CONCURRENCY_ID and f.concurrency_limit == 1 for f in functions)
    assert demo._queue.default_concurrency_limit == 1
    dropdown = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model")
    assert dropdown.visible and [choice[1] for choice in dropdown.choices] == folders
    assert sorted(demo.offseg_app.models) == sorted(folders)


def test_large_upload_keeps_the_page_images_bounded(model_dirs, tmp_path):
    """A 3000×4000 photo: the label map keeps the photo's size (as offseg predict writes it), the overlay shown
    in the page has panels of at most 1024 pixels, and the state keeps one byte per pixel."""
    from offseg_hf.inference.demo import DemoApp, load_demo_models
    from offseg_hf.inference.visualize import overlay_layout

    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), np.ones((100, 100, 1), dtype=np.uint8))
    path = tmp_path / "big.jpg"
    Image.fromarray(photo).save(path, quality=90)
    app = DemoApp(load_demo_models([str(model_dirs["offseg"])], device="cpu", scale=SCALE))
    result = app.segment(str(path), None)
    assert not result.error, result.status
    assert label_map_from_png(result.label_map_path).shape == (3000, 4000)
    layout = overlay_layout(3000, 4000, len(result.state["fractions"]))
    assert layout.panel_size == (768, 1024) and result.overlay.shape == (*layout.figure_size, 3)
    assert result.state["label_map"].dtype == np.uint8 and result.state["label_map"].shape == (3000, 4000)
    assert "image 4000×3000" in result.status


def test_sigterm_stops_the_demo_and_removes_its_temporary_folders(model_dirs, scene, tmp_path):
    """The demo's folders (examples, label maps, Gradio's upload and output cache) live in the temporary
    directory while it serves and are gone after SIGTERM (what ``kill``, ``docker stop`` and a Space restart send)."""
    _require_gradio()
    import signal
    import socket
    import time
    import urllib.request

    from gradio_client import Client, handle_file

    temp = tmp_path / "tmp"
    temp.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(TMPDIR=str(temp), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    log = tmp_path / "server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "offseg_hf", "demo", "--model", str(model_dirs["offseg"]), "--port", str(port),
             "--scale", *map(str, SCALE), "--device", "cpu"],
            stdout=output, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        overlay, labels, _, status, *_ = Client(url, verbose=False, download_files=False).predict(
            handle_file(str(scene)), str(model_dirs["offseg"]), "whole", False, 0.5, -1, api_name="/segment")
        assert "Model time" in (status.get("value") if isinstance(status, dict) else status)
        made = sorted(p.name.rsplit("-", 1)[0] for p in temp.iterdir())
        assert made == ["offseg-demo-cache", "offseg-demo-examples", "offseg-demo-labels"], made
        assert overlay is not None and labels is not None
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
    assert list(temp.iterdir()) == [], log.read_text()
