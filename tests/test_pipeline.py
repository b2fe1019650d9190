"""``pipeline("image-segmentation")`` with OffSeg folders.

* A converted ADE20K folder (the golden OffSeg-T weights of tests/fixtures) loads without the "run the custom
  code?" prompt, in a fresh interpreter with stdin closed, with ``import offseg_hf`` (``trust_remote_code`` unset)
  and without it (``trust_remote_code=True``, the folder's own code).
* Its result equals :func:`offseg_hf.segment` (``mode="whole"``, ADE20K protocol) pixel for pixel on a 683×512
  image; for images the keep-ratio resize changes, the network input and the logits are identical (see
  :func:`test_resized_images_give_the_same_network_input_and_logits_as_segment` for what differs).
* A tiny random model: one mask per present class at the image size, in memory and from a folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import SegformerImageProcessor, pipeline

import offseg_hf
from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, build_image_processor, segment
from offseg_hf.inference.segment import rescale_size

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Do you wish to run the custom code"
LABELS = ["sky", "tree", "road", "person", "car"]

pytestmark = pytest.mark.torch_threads(1)


def _scene(height: int, width: int, seed: int = 0) -> Image.Image:
    """A deterministic picture with smooth regions, edges and texture (so that the model predicts several classes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([80 + 120 * x, 140 + 80 * y, 220 - 160 * y], -1)
    image[y > 0.45] = [90, 130, 60]  # a green band
    image[(x - 0.6) ** 2 + (y - 0.3) ** 2 < 0.02] = [200, 60, 40]  # a red disc
    image[y > 0.6] = [110, 110, 115]  # a grey floor
    image += rng.normal(0, 12, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _label_map(annotations, label2id: dict[str, int], image: Image.Image) -> np.ndarray:
    """The pipeline's masks (one per present class) as one ``(H, W)`` label map; checks that they partition the image."""
    label_map = np.full((image.height, image.width), -1, dtype=np.int64)
    for annotation in annotations:
        mask = np.array(annotation["mask"])
        assert annotation["mask"].size == image.size and set(np.unique(mask)) <= {0, 255}
        assert (label_map[mask > 0] == -1).all(), "masks overlap"
        label_map[mask > 0] = label2id[annotation["label"]]
    assert (label_map >= 0).all(), "masks do not cover the image"
    return label_map


# ------------------------------------------------------------------------------------ converted golden OffSeg-T


@pytest.fixture(scope="module")
def ade20k_folder(fixtures_dir, tmp_path_factory) -> Path:
    """The golden OffSeg-T weights in the official checkpoint layout, converted like ``offseg convert`` does."""
    from offseg_hf.conversion.convert import convert_checkpoint
    from offseg_hf.data.registry import get_dataset_info

    root = tmp_path_factory.mktemp("golden")
    checkpoint = root / "offseg-t_ade20k.pth"
    meta = {"dataset_meta": {"classes": tuple(get_dataset_info("ade20k").class_names)}}
    torch.save({"state_dict": load_file(fixtures_dir / "offseg-t_official.safetensors"), "meta": meta}, checkpoint)
    return convert_checkpoint(checkpoint, root / "offseg-t-ade20k").output_dir


@pytest.fixture(scope="module")
def segmenter(ade20k_folder):
    return pipeline("image-segmentation", model=str(ade20k_folder))


def test_converted_folder_carries_a_built_in_processor(ade20k_folder, segmenter):
    import json

    saved = json.loads((ade20k_folder / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "SegformerImageProcessor" and "auto_map" not in saved
    assert not (ade20k_folder / "image_processing_offseg.py").exists()
    assert type(segmenter.image_processor) is SegformerImageProcessor
    assert segmenter.image_processor.to_dict() == build_image_processor("ade20k").to_dict()


FRESH_PROCESS = r"""
import sys
import numpy as np
from PIL import Image

folder, image_path, out_path, mode = sys.argv[1:5]
if mode == "import":
    import offseg_hf  # activates OffSeg with the Auto classes; trust_remote_code stays unset
import torch
from transformers import pipeline

torch.set_num_threads(1)  # the parent test's arithmetic (the thread count changes float rounding of the logits)
kwargs = {"trust_remote_code": True} if mode == "remote-code" else {}
segmenter = pipeline("image-segmentation", model=folder, **kwargs)
image = Image.open(image_path)
label_map = np.full((image.height, image.width), -1, dtype=np.int64)
for annotation in segmenter(image):
    label_map[np.array(annotation["mask"]) > 0] = segmenter.model.config.label2id[annotation["label"]]
np.save(out_path, label_map)
print("RESULT", type(segmenter.image_processor).__name__, type(segmenter.model).__module__.split(".")[0],
      "offseg_hf" in sys.modules)
"""


@pytest.mark.parametrize("mode", ["import", "remote-code"])
def test_pipeline_without_prompt_in_a_fresh_process(mode, ade20k_folder, segmenter, tmp_path):
    """stdin closed (no terminal): a prompt would print and wait ``TIME_OUT_REMOTE_CODE`` seconds, then fail or go on."""
    image = _scene(512, 683)
    image.save(tmp_path / "scene.png")
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(ade20k_folder), str(tmp_path / "scene.png"), str(tmp_path / "out.npy"), mode],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
    )
    output = completed.stdout + completed.stderr
    assert PROMPT not in output, output[-3000:]
    assert completed.returncode == 0, output[-3000:]
    processor_name, model_package, offseg_imported = completed.stdout.strip().splitlines()[-1].split()[1:]
    assert processor_name == "SegformerImageProcessor"
    if mode == "import":
        assert (model_package, offseg_imported) == ("offseg_hf", "True")
    else:  # the folder's remote code, and nothing of offseg_hf
        assert (model_package, offseg_imported) == ("transformers_modules", "False")
    expected = segment(segmenter.model, segmenter.image_processor, Image.open(tmp_path / "scene.png"), mode="whole")[0]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected.label_map.numpy())


def test_the_prompt_check_sees_the_old_auto_map(ade20k_folder, tmp_path):
    """Control for the test above: the same folder with the processor config that offseg-hf 0.1 wrote (class
    OffSegImageProcessor + ``auto_map``) makes Transformers invent an AutoVideoProcessor entry and print the prompt,
    even with ``import offseg_hf.models`` (re-saving the processor migrates such folders, see test_image_processing)."""
    import json
    import shutil

    from test_image_processing import LEGACY_CONFIG

    old = tmp_path / "old-folder"
    shutil.copytree(ade20k_folder, old)
    (old / "preprocessor_config.json").write_text(json.dumps(LEGACY_CONFIG))
    _scene(64, 96).save(tmp_path / "scene.png")
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(old), str(tmp_path / "scene.png"), str(tmp_path / "out.npy"), "import"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert PROMPT in completed.stdout + completed.stderr


class _Inputs:
    """Records the ``pixel_values`` and logits of every forward pass of a model."""

    def __init__(self, model):
        self.pixel_values, self.logits = [], []
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(lambda module, args, kwargs, output: self.logits.append(output.logits), with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        self.pixel_values.append(kwargs["pixel_values"] if "pixel_values" in kwargs else args[0])

    def close(self):
        for handle in self.handles:
            handle.remove()


def test_pipeline_equals_segment_whole_on_683x512(segmenter):
    """ADE20K's typical image size: the protocol resize is the identity, and the label maps agree pixel for pixel."""
    image = _scene(512, 683)
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    model, processor = segmenter.model, segmenter.image_processor
    recorder = _Inputs(model)
    try:
        ours = _label_map(segmenter(image), model.config.label2id, image)
        reference = segment(model, processor, image, mode="whole", protocol="ade20k")[0].label_map.numpy()
    finally:
        recorder.close()
    assert len(np.unique(reference)) >= 3  # several classes: the masks really split the image
    assert tuple(recorder.pixel_values[0].shape) == (1, 3, 512, 683)
    torch.testing.assert_close(recorder.pixel_values[0], recorder.pixel_values[1], rtol=0, atol=0)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("height, width", [(256, 384), (1024, 1536)])
def test_resized_images_give_the_same_network_input_and_logits_as_segment(segmenter, height, width):
    """Short side 256 (upscaled) and 1024 (downscaled) → 768×512 in both: the network input and the logits are
    identical. The label maps then differ only by where the logits are upsampled: the pipeline resizes them once
    to the image size, ``segment`` (mmsegmentation) to the network input size first and then to the image size."""
    image = _scene(height, width, seed=1)
    model, processor = segmenter.model, segmenter.image_processor
    recorder = _Inputs(model)
    try:
        ours = _label_map(segmenter(image), model.config.label2id, image)
        reference = segment(model, processor, image, mode="whole", protocol="ade20k")[0].label_map.numpy()
    finally:
        recorder.close()
    ours_input, reference_input = recorder.pixel_values
    assert tuple(ours_input.shape) == tuple(reference_input.shape) == (1, 3, 512, 768)
    torch.testing.assert_close(ours_input, reference_input, rtol=0, atol=0)
    torch.testing.assert_close(recorder.logits[0], recorder.logits[1], rtol=0, atol=0)
    logits = recorder.logits[0].float()
    once = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(ours, once)
    twice = F.interpolate(
        F.interpolate(logits, size=(512, 768), mode="bilinear", align_corners=False),
        size=(height, width), mode="bilinear", align_corners=False,
    )[0].argmax(0).numpy()
    np.testing.assert_array_equal(reference, twice)
    assert (ours == reference).mean() > 0.98


def test_four_by_three_images_differ_by_the_long_side_rounding(segmenter):
    """400×300: mmcv (``segment``) rounds the long side 682.67 up to 683, Transformers truncates it to 682."""
    recorder = _Inputs(segmenter.model)
    image = _scene(300, 400, seed=2)
    try:
        segmenter(image)
        segment(segmenter.model, segmenter.image_processor, image, mode="whole", protocol="ade20k")
    finally:
        recorder.close()
    assert [tuple(p.shape[-2:]) for p in recorder.pixel_values] == [(512, 682), (512, 683)]


# ------------------------------------------------------------------------------------ tiny random model


@pytest.fixture(scope="module")
def model() -> OffSegForSemanticSegmentation:
    torch.manual_seed(0)
    config = OffSegConfig.from_preset(
        "offseg-t", num_labels=5, id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)}
    )
    return OffSegForSemanticSegmentation(config).eval()


@pytest.fixture(scope="module")
def processor() -> SegformerImageProcessor:
    return build_image_processor("synthetic", scale=(64, 64))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, processor):
    path = tmp_path_factory.mktemp("offseg-tiny")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _image(height: int = 37, width: int = 53) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, rng.integers(0, 256, (height, width))], -1)
    return Image.fromarray(array.astype(np.uint8))


def _expected_label_map(model, processor, image: Image.Image) -> np.ndarray:
    """Label map computed by hand: processor → model → post-processing to (height, width)."""
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0].numpy()


def _check_annotations(annotations, image: Image.Image, expected: np.ndarray):
    labels = [annotation["label"] for annotation in annotations]
    assert len(labels) == len(set(labels)) >= 1
    assert set(labels) == {LABELS[i] for i in np.unique(expected)}  # one mask per present class, named by id2label
    assert all(annotation["score"] is None for annotation in annotations)  # the semantic branch
    np.testing.assert_array_equal(_label_map(annotations, {name: i for i, name in enumerate(LABELS)}, image), expected)


def test_pipeline_from_folder_non_square(folder, model, processor):
    segmenter = pipeline("image-segmentation", model=str(folder))
    assert type(segmenter.image_processor) is SegformerImageProcessor
    image = _image(37, 53)
    annotations = segmenter(image)
    assert len(annotations) >= 2  # several classes present: the masks really split the image
    _check_annotations(annotations, image, _expected_label_map(model, processor, image))


def test_pipeline_in_memory_model_and_processor(model, processor, tmp_path):
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor)
    tall, wide = _image(61, 23), _image(19, 80)
    results = segmenter([tall, wide])
    assert len(results) == 2
    _check_annotations(results[0], tall, _expected_label_map(model, processor, tall))
    _check_annotations(results[1], wide, _expected_label_map(model, processor, wide))

    # a file path goes through transformers' loader (EXIF transpose, RGB conversion)
    path = tmp_path / "grey.png"
    wide.convert("L").save(path)
    from_file = segmenter(str(path))
    _check_annotations(from_file, wide, _expected_label_map(model, processor, wide.convert("L").convert("RGB")))


def test_post_processing_upsamples_bilinearly_to_height_width(model, processor):
    image = _image(37, 53)
    inputs = processor(image, return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 3, 45, 64)  # keep ratio: long side capped at 64, short 37·64/53 = 44.7
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 5, 12, 16)
    expected = F.interpolate(logits, size=(37, 53), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(_expected_label_map(model, processor, image), expected)


def test_offseg_hf_exports_the_builder():
    assert offseg_hf.build_image_processor is build_image_processor
