"""``offseg demo``: a Gradio web app that segments uploaded images, and its Hugging Face Space template.

The page takes an image (upload, paste, or one of the bundled synthetic example scenes) and shows

* the overlay of ``offseg predict`` (image and prediction side by side with a legend, drawn by
  :func:`offseg_hf.inference.visualize.render_overlay`), at the chosen opacity, optionally highlighting one class;
* the label map coloured with the dataset palette (the palette PNG ``offseg predict`` writes as
  ``<name>_labels.png``: pixel values are class indices);
* a table of the classes present with their pixel fractions, and the time the model took.

Segmentation is the code path of ``offseg predict`` (:func:`offseg_hf.inference.predict.predict_image` on
:func:`offseg_hf.inference.image_io.load_image`): the paper's protocol (whole or sliding windows, optional multi-scale +
flip) with bounded memory for large photos. An unreadable upload gives a message in the page and the server
keeps serving. Requests go through Gradio's queue one at a time (``concurrency_limit=1`` shared by every
event), so two visitors never run two models at once.

Serving for days: the files of a request (Gradio's copy of the upload, the images shown) live in a temporary
folder of the process (``GRADIO_TEMP_DIR`` unless set) and are deleted after :data:`CACHE_LIFETIME`; the label
maps of the page are the last 64; every temporary folder is removed when the demo stops (Ctrl-C or SIGTERM).
After each request the memory it freed is handed back to the system (:func:`return_freed_memory`), so the
resident memory levels off instead of growing with every request (``benchmarks/soak_demo.py`` measures it).

Gradio is an optional dependency (``pip install "offseg-hf[demo]"``); it is imported only when the app is
built. Gradio's analytics and version check are switched off (``GRADIO_ANALYTICS_ENABLED=False``), the page
uses system fonts, and no share link is created: the app reaches no server but the model's (a Hub id is
downloaded once by ``from_pretrained``; a local folder needs no network).

:func:`export_space` writes a folder ready for ``huggingface_hub.upload_folder(repo_type="space")``:
``app.py``, ``requirements.txt``, ``README.md`` with the Space front matter, and a copy of this package.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import html
import logging
import os
import shutil
import tempfile
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "CACHE_LIFETIME",
    "INSTALL_HINT",
    "DemoApp",
    "DemoModel",
    "PageResult",
    "DemoUnavailableError",
    "build_demo",
    "class_table_html",
    "example_images",
    "export_space",
    "launch_demo",
    "load_demo_models",
    "return_freed_memory",
    "space_requirements",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "offseg-hf[demo]"'
"""How to install the optional web-demo dependencies."""

ALL_CLASSES = -1
"""Value of the class filter that highlights no single class."""

CONCURRENCY_ID = "offseg-model"
"""Queue slot shared by every event of the page (one request at a time)."""

MAX_FILE_SIZE = "200mb"
"""Default upload limit of :func:`launch_demo`."""

CACHE_LIFETIME = (600, 1200)
"""Gradio's ``delete_cache``: every 10 minutes the uploads and result files older than 20 minutes are deleted,
so the cache holds at most half an hour of requests (a redraw of an older result leaves the page as it is)."""


class DemoUnavailableError(ImportError):
    """Gradio is not installed; the message says how to install it."""


def _gradio():
    """Import Gradio with its analytics off, or raise :class:`DemoUnavailableError` with the install command."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise DemoUnavailableError(f"the web demo needs Gradio, which is not installed: {INSTALL_HINT}") from error
    return gradio


@dataclass
class DemoModel:
    """A loaded model of the demo: ``name`` (as given on the command line), model, processor and settings."""

    name: str
    model: object
    processor: object
    settings: object  # offseg_hf.inference.predict.PredictionSettings


def load_demo_models(
    sources: Sequence[str], device: str = "auto", protocol: str | None = None, scale: tuple[int, int] | None = None
) -> dict[str, DemoModel]:
    """Load every model (folder or Hub id) with :func:`offseg_hf.inference.predict.load_model`.

    Raises:
        offseg_hf.inference.predict.ModelLoadError: naming the model that cannot be loaded.
        ValueError: no model, or an unknown ``protocol``.
    """
    from offseg_hf.inference.predict import load_model, prediction_settings

    if not sources:
        raise ValueError("give at least one model (--model DIR_OR_REPO)")
    models: dict[str, DemoModel] = {}
    for source in sources:
        if source in models:
            continue
        model, processor = load_model(source, device=device)
        models[source] = DemoModel(source, model, processor, prediction_settings(model, protocol, scale))
    return models


def example_images(folder: str | os.PathLike, count: int = 3, size: tuple[int, int] = (192, 256)) -> list[Path]:
    """Write ``count`` scenes of the built-in synthetic dataset (validation split) as PNG files in ``folder``.

    Returns:
        The file paths, ``example_1.png`` … (nothing is downloaded).
    """
    from PIL import Image

    from offseg_hf.data.synthetic import SyntheticScenes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(num_labels=8, image_size=size, seed=0)
    paths = []
    for index in range(count):
        image, _ = scenes.generate(index, "validation")
        path = folder / f"example_{index + 1}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def class_table_html(fractions: list[dict], palette: np.ndarray) -> str:
    """The classes present as an HTML table (colour, id, class, pixels, fraction), largest first."""
    rows = []
    for entry in fractions:
        colour = palette[entry["id"]] if entry["id"] < len(palette) else (0, 0, 0)
        swatch = f'<span class="swatch" style="background: rgb({int(colour[0])}, {int(colour[1])}, {int(colour[2])})"></span>'
        rows.append(
            f'<tr data-class-id="{entry["id"]}"><td>{swatch}</td><td>{entry["id"]}</td>'
            f'<td class="class-name">{html.escape(entry["label"])}</td><td>{entry["pixels"]}</td>'
            f'<td>{100 * entry["fraction"]:.2f} %</td></tr>'
        )
    return (
        '<table id="class-table"><thead><tr><th></th><th>id</th><th>class</th><th>pixels</th><th>fraction</th>'
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


_CSS = """
#class-table { border-collapse: collapse; width: 100%; }
#class-table th, #class-table td { padding: 2px 8px; text-align: left; }
#class-table .swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #555; }
#status.error { color: #b00020; }
"""


def _temporary_folder(prefix: str) -> Path:
    """A new temporary folder removed when the process exits (SIGTERM included once :func:`launch_demo` serves)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _private_gradio_cache() -> None:
    """Point Gradio's upload and output cache (``GRADIO_TEMP_DIR``, read when the app is built and launched) at
    a temporary folder of this process, removed at exit, unless the user chose one. Gradio's own default is a
    ``gradio`` folder shared by every app of the machine and never removed."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        os.environ["GRADIO_TEMP_DIR"] = str(_temporary_folder("offseg-demo-cache-"))


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (macOS, Windows, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the memory a request freed back to the system (glibc ``malloc_trim(0)``; nothing elsewhere).

    A request allocates hundreds of MB in short-lived buffers (the decoded image, the network's activations,
    the overlay figure) from whichever of Gradio's worker threads runs it. glibc keeps freed blocks in per-thread
    arenas and raises its mmap threshold after large frees, so the buffers of later requests come from arenas
    whose free space is fragmented: measured with the quick start's OffSeg-T at the ADE20K protocol, the resident
    memory of 160 requests of the handler on 8 threads rose 1.7 → 2.7 GB without this and stayed at 1.3 GB with
    it; served to 8 ``gradio_client`` clients (``benchmarks/soak_demo.py``), 1.85 GB after 300 requests without,
    1.37 GB after 200 and after 1,000 with it. Cost: about 0.07 s per request on a 2-core CPU.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, ``docker stop``, a Space restart) stops the server as Ctrl-C does: Gradio closes it,
    :func:`launch_demo` returns and the ``atexit`` handlers remove the temporary folders. (Python's default for
    SIGTERM ends the process at once, without ``atexit``.)"""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)


class _LabelFiles:
    """The label-map PNGs shown in the page, in a private temporary folder; only the last ``keep`` are kept."""

    def __init__(self, keep: int = 64):
        self.folder = _temporary_folder("offseg-demo-labels-")
        self.files: deque[Path] = deque()
        self.keep = keep

    def new(self, stem: str) -> Path:
        while len(self.files) >= self.keep:
            self.files.popleft().unlink(missing_ok=True)
        path = self.folder / f"{stem}_{uuid.uuid4().hex[:8]}_labels.png"
        self.files.append(path)
        return path


@dataclass
class PageResult:
    """What one request puts in the page.

    Attributes:
        status: the status line (Markdown): model time and settings, or what went wrong.
        error: whether ``status`` reports a failure (the other outputs are then empty).
        overlay: ``(H, W, 3)`` uint8 overlay figure (:func:`~offseg_hf.inference.visualize.render_overlay`).
        label_map_path: the palette PNG of the label map (as ``offseg predict`` writes it).
        table_html: :func:`class_table_html` of the classes present.
        choices: ``(name, class id)`` of the class filter: "all classes" and the classes present.
        highlight: the class filter's value after this request.
        state: what a redraw needs (image path, model, label map, fractions, mode, TTA).
    """

    status: str
    error: bool = False
    overlay: np.ndarray | None = None
    label_map_path: Path | None = None
    table_html: str = ""
    choices: list[tuple[str, int]] = dataclasses.field(default_factory=lambda: [("all classes", ALL_CLASSES)])
    highlight: int = ALL_CLASSES
    state: dict | None = None


class DemoApp:
    """The demo's request handlers, independent of Gradio: :meth:`segment` runs a model on an uploaded file,
    :meth:`redraw` draws the last result again at another opacity / highlighted class."""

    def __init__(self, models: dict[str, DemoModel]):
        if not models:
            raise ValueError("give at least one model (--model DIR_OR_REPO)")
        self.models = models
        self.names = list(models)
        self.label_files = _LabelFiles()

    def segment(self, path: str | None, model_name: str | None, mode: str = "whole", tta: bool = False,
                opacity: float = 0.5, highlight: int | None = ALL_CLASSES) -> PageResult:
        """Segment the image file ``path`` (an upload) as ``offseg predict`` does; never raises for bad input."""
        from offseg_hf.inference.image_io import ImageLoadError, load_image
        from offseg_hf.inference.predict import predict_image
        from offseg_hf.inference.visualize import save_label_map

        if path is None:
            return PageResult("Upload or paste an image, or pick an example.")
        name = Path(path).name
        entry = self.models.get(model_name) or self.models[self.names[0]]
        try:
            image = load_image(path)
            prediction = predict_image(image, entry.model, entry.processor, entry.settings, mode=mode, tta=bool(tta))
        except ImageLoadError as error:
            reason = str(error).removeprefix(f"{path}: ")
            logger.warning("upload %s: %s", name, reason)
            return PageResult(f"**Cannot read {html.escape(name)}**: {html.escape(reason)}. Upload another image.", error=True)
        except (RuntimeError, ValueError, MemoryError) as error:
            logger.warning("segmentation of %s failed: %s", name, error)
            return PageResult(f"**Segmentation of {html.escape(name)} failed**: {type(error).__name__}: "
                              f"{html.escape(str(error))}", error=True)
        dtype = np.uint8 if len(entry.settings.id2label) <= 256 else np.uint16
        state = {
            "image": str(path), "model": entry.name, "mode": mode, "tta": bool(tta),
            "label_map": prediction.label_map.astype(dtype), "fractions": prediction.fractions,
        }
        labels_path = self.label_files.new(Path(name).stem or "image")
        save_label_map(prediction.label_map, entry.settings.palette, labels_path)
        present = {item["id"] for item in prediction.fractions}
        highlight = highlight if highlight in present else ALL_CLASSES
        protocol_name = entry.settings.protocol_record.get("name") or "custom"
        long_side, short_side = entry.settings.protocol.scale
        status = (
            f"**Model time: {1000 * prediction.seconds:.0f} ms** · {html.escape(entry.name)} · {mode}"
            f"{' + multi-scale/flip TTA' if tta else ''} · protocol {protocol_name} (resize: short side {short_side},"
            f" long side ≤ {long_side}) · image {image.width}×{image.height} · {len(prediction.fractions)} classes present"
        )
        return PageResult(
            status, overlay=self._draw(state, opacity, highlight, image), label_map_path=labels_path,
            table_html=class_table_html(prediction.fractions, entry.settings.palette),
            choices=[("all classes", ALL_CLASSES)] + [(item["label"], item["id"]) for item in prediction.fractions],
            highlight=highlight, state=state,
        )

    def redraw(self, state: dict | None, opacity: float, highlight: int | None) -> np.ndarray | None:
        """The overlay of the last result at ``opacity`` with ``highlight`` singled out (``None``: nothing to draw)."""
        from offseg_hf.inference.image_io import ImageLoadError

        if not state:
            return None
        try:
            return self._draw(state, opacity, highlight)
        except ImageLoadError as error:  # the upload left Gradio's cache
            logger.warning("redraw: %s", error)
            return None

    def _draw(self, state: dict, opacity: float, highlight, image=None) -> np.ndarray:
        from offseg_hf.inference.image_io import load_image
        from offseg_hf.inference.predict import overlay_title
        from offseg_hf.inference.visualize import render_overlay

        entry = self.models[state["model"]]
        image = load_image(state["image"]) if image is None else image
        highlight = None if highlight in (None, ALL_CLASSES) else int(highlight)
        pixels, _ = render_overlay(
            image, state["label_map"], entry.settings.palette, state["fractions"], alpha=float(opacity),
            title=overlay_title(state["mode"], state["tta"]), highlight=highlight,
        )
        return pixels


def build_demo(
    models: Sequence[str] | dict[str, DemoModel],
    *,
    device: str = "auto",
    protocol: str | None = None,
    scale: tuple[int, int] | None = None,
    examples: bool = True,
    title: str = "OffSeg semantic segmentation",
):
    """Build the Gradio app (a queued ``gr.Blocks``; start it with :func:`launch_demo`).

    Args:
        models: model folders / Hub ids (loaded with :func:`load_demo_models`), or already loaded models.
        device, protocol, scale: as for ``offseg predict``.
        examples: offer three generated synthetic scenes as examples.
        title: page title.

    Raises:
        DemoUnavailableError: Gradio is not installed.
        offseg_hf.inference.predict.ModelLoadError: a model cannot be loaded.
    """
    _private_gradio_cache()  # before Gradio is imported: some of its modules read GRADIO_TEMP_DIR at import
    gr = _gradio()
    if not isinstance(models, dict):
        models = load_demo_models(list(models), device=device, protocol=protocol, scale=scale)
    app = DemoApp(models)
    names = app.names
    example_dir = _temporary_folder("offseg-demo-examples-") if examples else None

    def segment(path, model_name, mode, tta, opacity, highlight):
        result = app.segment(path, model_name, mode, tta, opacity, highlight)
        return_freed_memory()
        return (
            result.overlay, None if result.label_map_path is None else str(result.label_map_path), result.table_html,
            gr.update(value=result.status, elem_classes=["error"] if result.error else []),
            gr.update(choices=result.choices, value=result.highlight), result.state,
        )

    def redraw(state, opacity, highlight):
        pixels = app.redraw(state, opacity, highlight)
        return_freed_memory()
        return gr.update() if pixels is None else pixels

    with gr.Blocks(title=title, delete_cache=CACHE_LIFETIME) as demo:
        gr.Markdown(
            f"# {html.escape(title)}\n"
            "OffSeg (ICCV 2025, offset learning for efficient semantic segmentation). Upload or paste an image; "
            "the prediction follows the paper's test protocol, as `offseg predict` does."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image_input = _tolerant_upload(gr.Image(
                    label="image", type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="input-image",
                ))
                model_choice = gr.Dropdown(names, value=names[0], label="model", visible=len(names) > 1, elem_id="model")
                mode = gr.Radio(["whole", "slide"], value="whole", label="protocol mode", elem_id="mode",
                                info="whole image in one pass, or the paper's sliding windows")
                tta = gr.Checkbox(False, label="test-time augmentation (multi-scale 0.5-1.75 + flip)", elem_id="tta")
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="overlay opacity", elem_id="opacity")
                highlight = gr.Dropdown([("all classes", ALL_CLASSES)], value=ALL_CLASSES, label="highlight class",
                                        elem_id="highlight")
                if example_dir is not None:
                    gr.Examples([[str(path)] for path in example_images(example_dir)], inputs=[image_input],
                                label="examples (synthetic scenes)")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload or paste an image, or pick an example.", elem_id="status")
                overlay = gr.Image(label="overlay", show_label=False, type="numpy", format="png", interactive=False,
                                   elem_id="overlay")
                with gr.Row():
                    label_image = gr.Image(label="label map", type="filepath", interactive=False, elem_id="label-map")
                    table = gr.HTML(elem_id="classes")
                gr.Markdown("The label map is the palette PNG `offseg predict` writes (download it: pixel values are "
                            "class indices). Opacity and the highlighted class redraw without running the model again.")
        state = gr.State(None, time_to_live=3600)

        run = dict(fn=segment, inputs=[image_input, model_choice, mode, tta, opacity, highlight],
                   outputs=[overlay, label_image, table, status, highlight, state],
                   concurrency_limit=1, concurrency_id=CONCURRENCY_ID, show_progress="minimal")
        image_input.change(**run)
        for control in (model_choice, mode, tta):
            control.input(**run)
        again = dict(fn=redraw, inputs=[state, opacity, highlight], outputs=[overlay], trigger_mode="always_last",
                     concurrency_limit=1, concurrency_id=CONCURRENCY_ID, show_progress="hidden")
        opacity.change(**again)
        highlight.input(**again)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.offseg_app = app  # the handlers and the loaded models
    return demo


def _tolerant_upload(component):
    """Make an image input's upload preprocessing never fail: a file PIL cannot even open still reaches the
    handler (as its path), which reports it in the page through :func:`offseg_hf.inference.image_io.load_image`.

    (The instance's method is wrapped rather than the class subclassed: Gradio writes a ``.pyi`` stub next to the
    source file of every component class.)"""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except (OSError, ValueError, SyntaxError):
            return None if payload is None or getattr(payload, "path", None) is None else str(payload.path)

    component.preprocess = preprocess
    return component


def launch_demo(demo, host: str | None = "127.0.0.1", port: int | None = None, *, max_file_size: str | int = MAX_FILE_SIZE,
                prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the app (no share link, system fonts, errors shown in the page). Serving in the main thread, SIGTERM
    stops it as Ctrl-C does, so the temporary folders are removed either way.

    ``host``/``port`` ``None`` leave the choice to Gradio (``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``, as on
    a Space).
    """
    gr = _gradio()
    if not prevent_thread_lock:
        _stop_on_sigterm()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "Consolas", "monospace"])
    return demo.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, show_error=True,
        max_file_size=max_file_size, prevent_thread_lock=prevent_thread_lock, quiet=quiet, theme=theme, css=_CSS,
    )


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face Space template

_APP_TEMPLATE = '''"""OffSeg web demo for {models_text} (written by `offseg demo --export-space`).

Run locally with `python app.py`; on a Hugging Face Space it starts by itself. Set OFFSEG_MODELS
(comma-separated folders or Hub ids) to show other models.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from offseg_hf.inference.demo import build_demo, launch_demo  # noqa: E402  (the copy of offseg_hf next to this file)

MODELS = {models!r}

demo = build_demo([m.strip() for m in os.environ.get("OFFSEG_MODELS", ",".join(MODELS)).split(",") if m.strip()])

if __name__ == "__main__":
    launch_demo(demo, host=None, port=None)
'''

_SPACE_README = """---
title: {title}
emoji: 🧩
colorFrom: indigo
colorTo: green
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: apache-2.0
{models_yaml}tags:
  - image-segmentation
  - offseg
---

# {title}

Semantic segmentation with [OffSeg](https://github.com/HVision-NKU/OffSeg) (ICCV 2025, offset learning for
efficient semantic segmentation), ported to Hugging Face Transformers. Upload or paste an image: the page
shows the prediction overlaid on the image with a legend, the label map in the dataset palette, the classes
present with their pixel fractions and the model time. Choose the protocol (whole image or the paper's
sliding windows) and test-time augmentation; highlight one class.

Models: {models_md}.

This Space was written by `offseg demo --export-space`; `offseg_hf/` is a copy of the package that wrote it.
"""


def _package_source_root() -> Path:
    import offseg_hf

    return Path(offseg_hf.__file__).resolve().parent


def space_requirements() -> list[str]:
    """The Space's ``requirements.txt`` lines: the package's install requirements plus its ``demo`` extra.

    Read from ``setup.cfg`` of a source checkout when the package runs from one, else from the installed
    distribution's metadata.
    """
    import configparser

    setup_cfg = _package_source_root().parent / "setup.cfg"
    if setup_cfg.is_file():
        parser = configparser.ConfigParser()
        parser.read(setup_cfg, encoding="utf-8")
        if parser.get("metadata", "name", fallback=None) == "offseg-hf":
            lines = parser.get("options", "install_requires").splitlines()
            lines += parser.get("options.extras_require", "demo", fallback="").splitlines()
            return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    from importlib import metadata

    requirements = []
    for requirement in metadata.requires("offseg-hf") or []:
        spec, _, marker = requirement.partition(";")
        if not marker.strip() or marker.replace(" ", "").replace("'", '"') == 'extra=="demo"':
            requirements.append(spec.strip())
    return requirements


def export_space(directory: str | os.PathLike, models: Sequence[str], title: str | None = None) -> list[Path]:
    """Write a Hugging Face Space for ``models`` into ``directory``.

    The folder holds ``app.py`` (builds the app of :func:`build_demo` for the models), ``requirements.txt``
    (:func:`space_requirements`), ``README.md`` (Space front matter: Gradio SDK, linked models) and a copy of the
    ``offseg_hf`` package, so ``huggingface_hub.upload_folder(repo_id=..., repo_type="space", folder_path=directory)``
    publishes it as it is.

    Returns:
        The files written at the top of ``directory`` (the package copy is ``directory/offseg_hf``).
    """
    gr = _gradio()
    from offseg_hf.inference.predict import HUB_ID

    if not models:
        raise ValueError("give at least one model (--model REPO) for the Space")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    title = title or f"OffSeg: {Path(models[0]).name}"
    hub_ids = [model for model in models if HUB_ID.match(model) and not Path(model).exists()]
    package = directory / "offseg_hf"
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(_package_source_root(), package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    files = {
        "app.py": _APP_TEMPLATE.format(models=list(models), models_text=", ".join(models)),
        "requirements.txt": "\n".join(space_requirements()) + "\n",
        "README.md": _SPACE_README.format(
            title=title, gradio_version=gr.__version__,
            models_yaml="".join(f"models:\n" + "".join(f"  - {model}\n" for model in hub_ids)) if hub_ids else "",
            models_md=", ".join(f"[{model}](https://huggingface.co/{model})" if model in hub_ids else f"`{model}`" for model in models),
        ),
    }
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written

