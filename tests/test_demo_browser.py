"""``offseg demo`` served on 127.0.0.1 and driven in a real headless Chromium (Debian's ``chromium`` + Playwright).

The page must show what ``offseg predict`` writes for the same image and model: the overlay is compared
pixel-exactly (tolerance 0: both are lossless PNGs of the same drawing, and the pixels are read back from the
browser's own decoding through a canvas), the label map likewise, and the class table must list exactly the
classes of the label map with predict's pixel counts. A truncated upload and a text file must give a message
in the page, and the next good upload must still work. The server runs with an audit hook that records every
connection or name lookup it makes: it must reach nothing but the loopback address. The browser must request
nothing but the app's own address.

Needs ``pip install ".[dev,demo]"`` and ``/usr/bin/chromium`` (``.ci/run`` installs both); elsewhere the tests
are skipped with the reason (under ``CI=true`` a missing piece is a failure).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offseg_hf.cli import main

CHROMIUM = os.environ.get("OFFSEG_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
SCALE = ["--scale", "128", "64"]  # short side 64: fast on CPU; the same for demo and predict


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


pytestmark = pytest.mark.slow


# Audit hook run inside the server process: every outgoing connection / name lookup to anything but loopback is
# printed as a NETWORK line (the test asserts there is none).
_SERVER = r"""
import ipaddress, sys

def _hook(event, args):
    if event == "socket.connect":
        address = args[1]
        host = address[0] if isinstance(address, tuple) else str(address)
    elif event == "socket.getaddrinfo":
        host = args[0]
    else:
        return
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "", "localhost"):
        return
    try:
        if ipaddress.ip_address(str(host).split("%")[0]).is_loopback:
            return
    except ValueError:
        pass
    sys.stderr.write(f"NETWORK {event} {host}\n")
    sys.stderr.flush()

sys.addaudithook(_hook)
from offseg_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight OffSeg with the 8 class names of the synthetic dataset."""
    import torch
    from test_training import tiny_config

    from offseg_hf import OffSegForSemanticSegmentation
    from offseg_hf.data.synthetic import synthetic_class_names

    names = synthetic_class_names(8)
    config = tiny_config(8)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: index for index, name in enumerate(names)}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("demo-model")
    OffSegForSemanticSegmentation(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    from offseg_hf.data.synthetic import SyntheticScenes

    folder = tmp_path_factory.mktemp("demo-images")
    scenes = SyntheticScenes(num_labels=8, image_size=(96, 160), seed=3)
    files = {}
    for index, name in enumerate(("scene_a.png", "scene_b.png")):
        image, _ = scenes.generate(index, "test")
        files[name] = folder / name
        Image.fromarray(image).save(files[name])
    good = files["scene_a.png"].read_bytes()
    files["truncated.png"] = folder / "truncated.png"
    files["truncated.png"].write_bytes(good[: len(good) // 2])
    files["notes.png"] = folder / "notes.png"
    files["notes.png"].write_text("not an image\n")
    return files


@pytest.fixture(scope="module")
def predicted(model_dir, images, tmp_path_factory) -> Path:
    """What ``offseg predict`` writes for the good images."""
    out = tmp_path_factory.mktemp("predict-out")
    status = main(["predict", str(images["scene_a.png"]), str(images["scene_b.png"]), "--model", str(model_dir),
                   "--out", str(out), *SCALE, "--quiet"])
    assert status == 0
    return out


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    _require(_has("gradio"), 'Gradio is not installed: pip install "offseg-hf[demo]"')
    port = _free_port()
    log_path = tmp_path_factory.mktemp("demo-server") / "server.log"
    # Neither GRADIO_ANALYTICS_ENABLED nor HF_HUB_OFFLINE is set: the demo itself must keep off the network.
    env = {key: value for key, value in os.environ.items() if key not in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, "demo", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", str(port), *SCALE, "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"offseg demo did not start:\n{log_path.read_text()}")
        time.sleep(0.5)
    yield {"url": url, "log": log_path, "process": process}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def browser():
    _require(_has("playwright"), 'Playwright is not installed: pip install -e ".[dev]"')
    _require(Path(CHROMIUM).is_file(), f"{CHROMIUM} not found: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server["url"], wait_until="load")
    page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
    yield page
    context.close()
    foreign = sorted({url for url in requests if not url.startswith(server["url"]) and not url.startswith("data:")
                      and not url.startswith("blob:")})
    assert not foreign, f"the page requested other servers: {foreign}"
    network = [line for line in server["log"].read_text().splitlines() if line.startswith("NETWORK")]
    assert not network, f"the demo server reached out: {network}"


def _shown_pixels(page, selector: str) -> np.ndarray:
    """The pixels of the image shown at ``selector`` as the browser decoded them (drawn into a canvas)."""
    data_url = page.eval_on_selector(
        selector,
        """async (img) => {
            if (!img.complete) await new Promise(r => img.addEventListener('load', r, {once: true}));
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            const context = canvas.getContext('2d', {colorSpace: 'srgb'});
            context.drawImage(img, 0, 0);
            return canvas.toDataURL('image/png');
        }""",
    )
    with Image.open(BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as image:
        return np.array(image.convert("RGB"))


def _served_file(page, selector: str) -> Image.Image:
    """The file behind the image at ``selector``, fetched as served (for its palette indices)."""
    src = page.get_attribute(selector, "src")
    response = page.request.get(src)
    assert response.ok, src
    return Image.open(BytesIO(response.body()))


def _upload(page, path: Path, previous_status: str | None = None, timeout: float = 120_000) -> str:
    """Upload ``path`` and wait until the status line changes (a result or an error); returns the new status."""
    before = page.inner_text("#status") if previous_status is None else previous_status
    page.set_input_files("#input-image input[type=file]", str(path))
    page.wait_for_function(
        "([before, name]) => { const s = document.querySelector('#status'); const t = s ? s.innerText : '';"
        " return t !== before && (t.includes('Model time') || t.includes(name)); }",
        arg=[before, path.name], timeout=timeout,
    )
    page.wait_for_timeout(300)  # let the other outputs of the same event render
    return page.inner_text("#status")


def _table_rows(page) -> list[tuple[int, str, int]]:
    rows = page.eval_on_selector_all(
        "#class-table tbody tr",
        "rows => rows.map(r => [...r.querySelectorAll('td')].map(td => td.innerText.trim()))",
    )
    return [(int(row[1]), row[2], int(row[3])) for row in rows]


def _check_result(page, image_name: str, predicted: Path) -> None:
    stem = Path(image_name).stem
    expected_overlay = np.array(Image.open(predicted / f"{stem}_overlay.png").convert("RGB"))
    page.wait_for_selector("#overlay img", timeout=60_000)
    shown = _shown_pixels(page, "#overlay img")
    assert shown.shape == expected_overlay.shape
    assert np.array_equal(shown, expected_overlay), f"overlay differs in {(shown != expected_overlay).any(-1).sum()} pixels"

    expected_labels_image = Image.open(predicted / f"{stem}_labels.png")
    expected_labels = np.array(expected_labels_image)
    served = _served_file(page, "#label-map img")
    assert served.mode == "P"
    assert np.array_equal(np.array(served), expected_labels)
    assert served.getpalette()[: 3 * 8] == expected_labels_image.getpalette()[: 3 * 8]
    assert np.array_equal(_shown_pixels(page, "#label-map img"), np.array(expected_labels_image.convert("RGB")))

    record = json.loads((predicted / f"{stem}.json").read_text())
    rows = _table_rows(page)
    assert {row[0] for row in rows} == {int(v) for v in np.unique(expected_labels)}
    assert rows == [(entry["id"], entry["label"], entry["pixels"]) for entry in record["classes"]]


def test_upload_shows_what_offseg_predict_writes(page, images, predicted, tmp_path):
    status = _upload(page, images["scene_a.png"])
    assert "Model time" in status and "whole" in status and "160×96" in status
    _check_result(page, "scene_a.png", predicted)
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'demo.png'}")


def test_bad_uploads_give_a_message_and_the_server_keeps_serving(page, images, predicted, tmp_path):
    status = _upload(page, images["truncated.png"])
    assert "Cannot read truncated.png" in status and "cannot decode image" in status, status
    assert page.locator("#class-table tbody tr").count() == 0
    page.screenshot(path=str(tmp_path / "demo-error.png"), full_page=True)

    status = _upload(page, images["notes.png"], previous_status=status)
    assert "Cannot read notes.png" in status and "not an image file" in status, status

    status = _upload(page, images["scene_b.png"], previous_status=status)
    assert "Model time" in status, status
    _check_result(page, "scene_b.png", predicted)


def test_opacity_and_highlight_redraw_the_overlay(page, images, model_dir):
    from offseg_hf.inference.image_io import load_image
    from offseg_hf.inference.predict import load_model, overlay_title, predict_image, prediction_settings
    from offseg_hf.inference.visualize import render_overlay

    _upload(page, images["scene_a.png"])
    model, processor = load_model(str(model_dir), device="cpu")
    settings = prediction_settings(model, scale=(128, 64))
    image = load_image(images["scene_a.png"])
    prediction = predict_image(image, model, processor, settings)

    def expected(alpha, highlight=None):
        return render_overlay(image, prediction.label_map, settings.palette, prediction.fractions, alpha=alpha,
                              title=overlay_title("whole", False), highlight=highlight)[0]

    before = page.get_attribute("#overlay img", "src")
    box = page.locator("#opacity input[type=number]")
    box.fill("0.8")
    box.press("Enter")
    page.wait_for_function("before => { const i = document.querySelector('#overlay img'); return i && i.src !== before; }",
                           arg=before, timeout=60_000)
    page.wait_for_timeout(300)
    assert np.array_equal(_shown_pixels(page, "#overlay img"), expected(0.8))

    second = prediction.fractions[1]  # highlight the second-largest class through the drop-down
    before = page.get_attribute("#overlay img", "src")
    page.click("#highlight input")
    page.get_by_role("option", name=second["label"], exact=True).click()
    page.wait_for_function("before => { const i = document.querySelector('#overlay img'); return i && i.src !== before; }",
                           arg=before, timeout=60_000)
    page.wait_for_timeout(300)
    assert np.array_equal(_shown_pixels(page, "#overlay img"), expected(0.8, highlight=second["id"]))
