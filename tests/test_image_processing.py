"""OffSegImageProcessor, following transformers' SegFormer image-processor tests (shapes, labels, post-processing,
save/load) plus the reference normalisation of the OffSeg code."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from offseg_hf.image_processing_offseg import OFFSEG_IMAGE_MEAN, OFFSEG_IMAGE_STD, OffSegImageProcessor, reduce_labels

SIZE = {"height": 30, "width": 30}
BATCH = 7


def _images(kind: str, equal: bool = False, channels: int = 3, seed: int = 0):
    """Seven random images of sizes 20..60, as PIL / numpy (H, W, C) / torch (C, H, W)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(BATCH):
        height, width = (40, 40) if equal else (20 + 5 * index, 60 - 5 * index)
        array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        if kind == "pil":
            images.append(Image.fromarray(array.squeeze(-1) if channels == 1 else array))
        elif kind == "numpy":
            images.append(array)
        else:
            images.append(torch.from_numpy(array).permute(2, 0, 1))
    return images


def _ade_pair(batched: bool = False, seed: int = 0):
    """Image(s) and ADE20K-style raw label map(s) with values 0..150, as PIL (like the SegFormer fixtures)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(2 if batched else 1):
        image = Image.fromarray(rng.integers(0, 256, (48 + index, 64, 3), dtype=np.uint8))
        label = Image.fromarray(rng.integers(0, 151, (48 + index, 64), dtype=np.uint8))
        pairs.append((image, label))
    if batched:
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return pairs[0]


@pytest.fixture
def processor() -> OffSegImageProcessor:
    return OffSegImageProcessor(size=SIZE)


def test_properties_and_defaults():
    processor = OffSegImageProcessor()
    for name in ("do_resize", "size", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"):
        assert hasattr(processor, name), name
    assert (processor.size.height, processor.size.width) == (512, 512)
    assert processor.do_reduce_labels is False and processor.do_convert_rgb is True
    assert processor.rescale_factor == pytest.approx(1 / 255)
    np.testing.assert_allclose(np.array(processor.image_mean) * 255, [123.675, 116.28, 103.53], rtol=1e-12)
    np.testing.assert_allclose(np.array(processor.image_std) * 255, [58.395, 57.12, 57.375], rtol=1e-12)
    assert processor.backend == "torchvision"
    overridden = OffSegImageProcessor(size={"height": 42, "width": 42}, do_reduce_labels=True)
    assert (overridden.size.height, overridden.size.width) == (42, 42) and overridden.do_reduce_labels


def test_normalisation_matches_reference_formula(processor):
    array = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    pixel_values = processor(Image.fromarray(array), do_resize=False, return_tensors="pt").pixel_values
    expected = (array.astype(np.float64) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    assert pixel_values.shape == (1, 3, 17, 23)
    np.testing.assert_allclose(pixel_values[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["pil", "numpy", "torch"])
def test_call_shapes(processor, kind):
    images = _images(kind)
    single = processor(images[0], return_tensors="pt").pixel_values
    assert single.shape == (1, 3, 30, 30) and single.dtype == torch.float32
    batch = processor(images, return_tensors="pt").pixel_values
    assert batch.shape == (BATCH, 3, 30, 30)
    torch.testing.assert_close(batch[0], single[0])


def test_four_channel_and_grayscale_inputs(processor):
    rgba = _images("numpy", channels=4)
    assert processor(rgba, return_tensors="pt").pixel_values.shape == (BATCH, 3, 30, 30)
    grey = _images("pil", channels=1)
    pixel_values = processor(grey, return_tensors="pt").pixel_values
    assert pixel_values.shape == (BATCH, 3, 30, 30)
    # grey copied to R, G, B: after normalisation the channels differ only by the per-channel statistics
    restored = pixel_values * torch.tensor(OFFSEG_IMAGE_STD).view(3, 1, 1) + torch.tensor(OFFSEG_IMAGE_MEAN).view(3, 1, 1)
    torch.testing.assert_close(restored[:, 0], restored[:, 2], atol=1e-5, rtol=0)


def test_call_segmentation_maps(processor):
    images = _images("torch")
    maps = [torch.zeros(image.shape[-2:], dtype=torch.long) for image in images]
    encoding = processor(images[0], maps[0], return_tensors="pt")
    assert encoding["pixel_values"].shape == (1, 3, 30, 30)
    assert encoding["labels"].shape == (1, 30, 30) and encoding["labels"].dtype == torch.long

    encoding = processor(images, maps, return_tensors="pt")
    assert encoding["pixel_values"].shape == (BATCH, 3, 30, 30)
    assert encoding["labels"].shape == (BATCH, 30, 30) and encoding["labels"].dtype == torch.long
    assert encoding["labels"].min() >= 0 and encoding["labels"].max() <= 255

    image, label = _ade_pair()
    encoding = processor(image, label, return_tensors="pt")
    assert encoding["labels"].shape == (1, 30, 30)
    images, labels = _ade_pair(batched=True)
    encoding = processor(images, labels, return_tensors="pt")
    assert encoding["pixel_values"].shape == (2, 3, 30, 30) and encoding["labels"].shape == (2, 30, 30)


def test_segmentation_maps_are_resized_nearest():
    """Labels keep their values: nearest resizing invents no class (bilinear would create 1.5 between 1 and 2)."""
    label = np.zeros((40, 40), dtype=np.uint8)
    label[:, 20:] = 7
    label[20:, :] = 200
    processor = OffSegImageProcessor(size={"height": 13, "width": 17})
    encoding = processor(np.zeros((40, 40, 3), np.uint8), label, return_tensors="pt")
    assert set(encoding["labels"].unique().tolist()) == {0, 7, 200}
    assert encoding["labels"][0, 0, 0] == 0 and encoding["labels"][0, 0, -1] == 7 and encoding["labels"][0, -1, 0] == 200


def test_reduce_labels(processor):
    image, label = _ade_pair()
    encoding = processor(image, label, return_tensors="pt")
    assert encoding["labels"].min() >= 0 and encoding["labels"].max() <= 150

    processor.do_reduce_labels = True
    encoding = processor(image, label, do_resize=False, return_tensors="pt")
    raw = torch.from_numpy(np.array(label)).long()
    expected = torch.where(raw == 0, 255, raw - 1)
    torch.testing.assert_close(encoding["labels"][0], expected)

    images, labels = _ade_pair(batched=True)
    assert len(processor(images, labels, return_tensors="pt")["labels"]) == len(labels)
    # pixel values are never label-reduced
    torch.testing.assert_close(
        processor(image, return_tensors="pt").pixel_values,
        OffSegImageProcessor(size=SIZE)(image, return_tensors="pt").pixel_values,
    )


def test_reduce_labels_function():
    raw = torch.tensor([[0, 1, 2], [150, 254, 255]], dtype=torch.uint8)
    assert reduce_labels(raw).tolist() == [[255, 0, 1], [149, 253, 255]]
    assert reduce_labels(raw).dtype == torch.uint8
    with pytest.raises(TypeError, match="float"):
        reduce_labels(raw.float())


def _logits(batch: int = BATCH, num_labels: int = 5, height: int = 8, width: int = 12):
    return SimpleNamespace(logits=torch.randn(batch, num_labels, height, width, generator=torch.Generator().manual_seed(0)))


def test_post_process_semantic_segmentation(processor):
    outputs = _logits()
    segmentation = processor.post_process_semantic_segmentation(outputs)
    assert len(segmentation) == BATCH and segmentation[0].shape == (8, 12)
    torch.testing.assert_close(segmentation[3], outputs.logits[3].argmax(0))

    detailed = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True)
    assert torch.equal(detailed[0].segmentation, segmentation[0])
    assert detailed[0].segmentation_scores.shape == (5, 8, 12)


def test_post_process_target_sizes_are_height_width(processor):
    outputs = _logits(batch=2)
    target_sizes = [(1, 4), (37, 53)]  # (height, width), non-square
    resized = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    assert [tuple(label_map.shape) for label_map in resized] == target_sizes
    expected = F.interpolate(outputs.logits[1:2], size=(37, 53), mode="bilinear", align_corners=False)[0].argmax(0)
    torch.testing.assert_close(resized[1], expected)

    detailed = processor.post_process_semantic_segmentation(
        outputs, target_sizes=torch.tensor(target_sizes), return_segmentation_scores=True
    )
    assert torch.equal(detailed[0].segmentation, resized[0])
    assert detailed[1].segmentation_scores.shape == (5, 37, 53)

    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes + [(1, 4)])


def test_only_semantic_post_processing(processor):
    """The image-segmentation pipeline tries panoptic, then instance, then semantic by ``hasattr``."""
    assert not hasattr(processor, "post_process_panoptic_segmentation")
    assert not hasattr(processor, "post_process_instance_segmentation")


def test_to_json_and_save_load_roundtrip(tmp_path):
    processor = OffSegImageProcessor(size={"height": 64, "width": 96}, do_reduce_labels=True)
    as_dict = json.loads(processor.to_json_string())
    assert as_dict["size"] == {"height": 64, "width": 96} and as_dict["do_reduce_labels"] is True
    assert as_dict["image_processor_type"] == "OffSegImageProcessor"

    json_file = tmp_path / "processor.json"
    processor.to_json_file(json_file)
    assert OffSegImageProcessor.from_json_file(json_file).to_dict() == processor.to_dict()

    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 64, "width": 96}
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_offseg.OffSegImageProcessor"
    assert (tmp_path / "saved" / "image_processing_offseg.py").is_file()  # remote-code copy
    loaded = OffSegImageProcessor.from_pretrained(tmp_path / "saved")
    assert loaded.to_dict() == processor.to_dict()


def test_auto_image_processor_resolves_offseg(tmp_path):
    from transformers import AutoImageProcessor

    from offseg_hf.configuration_offseg import OffSegConfig

    OffSegImageProcessor(size={"height": 48, "width": 48}).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is OffSegImageProcessor and loaded.size.height == 48

    # only a model config in the folder: the registration of OffSegConfig picks the processor
    config_only = tmp_path / "config_only"
    OffSegConfig.from_preset("offseg-t", num_labels=3).save_pretrained(config_only)
    (config_only / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 40, "width": 40}}))
    loaded = AutoImageProcessor.from_pretrained(config_only)
    assert type(loaded) is OffSegImageProcessor and loaded.size.height == 40
