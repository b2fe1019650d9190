"""``pipeline("image-segmentation")`` with OffSeg: one mask per present class, at the image size (height, width)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import pipeline

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.image_processing_offseg import OffSegImageProcessor

LABELS = ["sky", "tree", "road", "person", "car"]


pytestmark = pytest.mark.torch_threads(1)


@pytest.fixture(scope="module")
def model() -> OffSegForSemanticSegmentation:
    torch.manual_seed(0)
    config = OffSegConfig.from_preset(
        "offseg-t", num_labels=5, id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)}
    )
    return OffSegForSemanticSegmentation(config).eval()


@pytest.fixture(scope="module")
def processor() -> OffSegImageProcessor:
    return OffSegImageProcessor(size={"height": 64, "width": 64})


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
    present = {LABELS[i] for i in np.unique(expected)}
    assert set(labels) == present  # one mask per present class, named by id2label
    coverage = np.zeros((image.height, image.width), dtype=np.int64)
    for annotation in annotations:
        mask = annotation["mask"]
        assert annotation["score"] is None  # the semantic branch (no panoptic/instance post-processing)
        assert mask.mode == "L" and mask.size == image.size  # PIL size is (width, height)
        values = np.array(mask)
        assert set(np.unique(values)) <= {0, 255}
        np.testing.assert_array_equal(values == 255, expected == LABELS.index(annotation["label"]))
        coverage += values == 255
    np.testing.assert_array_equal(coverage, 1)  # masks partition the image


def test_pipeline_from_folder_non_square(folder, model, processor):
    segmenter = pipeline("image-segmentation", model=str(folder))
    assert type(segmenter.image_processor) is OffSegImageProcessor
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
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 5, 16, 16)
    expected = F.interpolate(logits, size=(37, 53), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(_expected_label_map(model, processor, image), expected)
