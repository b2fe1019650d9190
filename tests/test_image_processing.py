"""OffSeg's image processor: transformers' SegformerImageProcessor as :func:`build_image_processor` configures it.

Checked here: the configuration per dataset, the reference normalisation, the keep-ratio resize (Transformers'
rounding compared with mmcv's, :func:`offseg_hf.inference.segment.rescale_size`), label maps, the bilinear post-processing,
saving as a built-in class (no ``auto_map``, no code), and loading folders saved by the old OffSegImageProcessor.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, SegformerImageProcessor

from offseg_hf.inference.image_processing_offseg import OFFSEG_IMAGE_MEAN, OFFSEG_IMAGE_STD, OffSegImageProcessor, build_image_processor
from offseg_hf.inference.segment import PROTOCOLS, rescale_size

pytestmark = pytest.mark.torch_threads(1)


def _shape(processor, height: int, width: int) -> tuple[int, int]:
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    return tuple(processor(image, return_tensors="pt").pixel_values.shape[-2:])


@pytest.mark.parametrize(
    "dataset, short, long, reduce",
    [("ade20k", 512, 2048, True), ("ADE20K", 512, 2048, True), ("coco-stuff", 512, 2048, False),
     ("cityscapes", 1024, 2048, False), ("pascal-context", 520, 520, True)],
)
def test_one_processor_per_dataset(dataset, short, long, reduce):
    processor = build_image_processor(dataset)
    assert type(processor) is SegformerImageProcessor  # the built-in class, not a subclass
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (short, long)
    assert processor.size.height is None and processor.size.width is None  # keep ratio, no fixed square
    assert processor.do_reduce_labels is reduce and processor.do_convert_rgb is True and processor.do_resize is True
    assert processor.rescale_factor == pytest.approx(1 / 255) and processor.backend == "torchvision"
    np.testing.assert_allclose(np.array(processor.image_mean) * 255, [123.675, 116.28, 103.53], rtol=1e-12)
    np.testing.assert_allclose(np.array(processor.image_std) * 255, [58.395, 57.12, 57.375], rtol=1e-12)
    assert tuple(processor.image_mean) == OFFSEG_IMAGE_MEAN and tuple(processor.image_std) == OFFSEG_IMAGE_STD


def test_build_image_processor_options_and_errors():
    synthetic = build_image_processor("synthetic", scale=(64, 64))
    assert (synthetic.size.shortest_edge, synthetic.size.longest_edge, synthetic.do_reduce_labels) == (64, 64, False)
    custom = build_image_processor("ade20k", scale=(1024, 256), do_reduce_labels=False)
    assert (custom.size.shortest_edge, custom.size.longest_edge, custom.do_reduce_labels) == (256, 1024, False)
    with pytest.raises(ValueError, match="synthetic.*scale"):
        build_image_processor("synthetic")
    with pytest.raises(ValueError, match="unknown test protocol 'voc'"):
        build_image_processor("voc")
    with pytest.raises(ValueError, match="scale must be two positive integers"):
        build_image_processor("ade20k", scale=(512,))


def test_normalisation_matches_reference_formula():
    array = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    pixel_values = build_image_processor()(Image.fromarray(array), do_resize=False, return_tensors="pt").pixel_values
    expected = (array.astype(np.float64) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    assert pixel_values.shape == (1, 3, 17, 23) and pixel_values.dtype == torch.float32
    np.testing.assert_allclose(pixel_values[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


# (height, width) → output of the ADE20K keep-ratio resize with Transformers' rounding (long side truncated)
ADE20K_SIZES = {
    (512, 683): (512, 683),  # already at the protocol scale: unchanged
    (683, 512): (683, 512),
    (256, 384): (512, 768),  # upscaled, exact ratio
    (1024, 1536): (512, 768),  # downscaled, exact ratio
    (300, 400): (512, 682),  # 682.67: mmcv rounds to 683
    (480, 640): (512, 682),
    (1080, 1920): (512, 910),  # 910.2
    (1000, 5000): (410, 2048),  # long side capped at 2048 (short side 409.6 → 410)
    (7, 3000): (5, 2048),
}


def test_keep_ratio_resize_against_mmcv_rounding():
    processor = build_image_processor("ade20k")
    for (height, width), expected in ADE20K_SIZES.items():
        ours = _shape(processor, height, width)
        assert ours == expected, (height, width)
        reference = rescale_size(height, width, PROTOCOLS["ade20k"].scale)  # mmcv imrescale: half up
        short = 0 if height <= width else 1
        assert ours[short] == reference[short], (height, width)  # the short side always agrees
        # the long side: truncated here, rounded half up by mmcv; they differ by one pixel at most
        assert reference[1 - short] - ours[1 - short] in (0, 1), (height, width)
    # Cityscapes' 2048×1024 frames keep their size; Pascal Context's long side becomes 520
    assert _shape(build_image_processor("cityscapes"), 1024, 2048) == (1024, 2048)
    assert _shape(build_image_processor("pascal-context"), 375, 500) == (390, 520)


def test_grey_and_rgba_inputs_become_rgb():
    processor = build_image_processor()
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8))
    pixel_values = processor(grey, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 512, 640)
    restored = pixel_values * torch.tensor(OFFSEG_IMAGE_STD).view(3, 1, 1) + torch.tensor(OFFSEG_IMAGE_MEAN).view(3, 1, 1)
    torch.testing.assert_close(restored[:, 0], restored[:, 2], atol=1e-5, rtol=0)  # grey copied to R, G, B
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 4), dtype=np.uint8), mode="RGBA")
    assert processor(rgba, return_tensors="pt").pixel_values.shape == (1, 3, 512, 640)


def test_label_maps_follow_the_image_nearest_and_reduced():
    """ADE20K raw annotations: resized with the image (nearest: no invented class), 0 → 255, v → v − 1."""
    processor = build_image_processor("ade20k")
    label = np.zeros((40, 60), dtype=np.uint8)
    label[:, 30:] = 7
    label[20:, :] = 150
    encoding = processor(np.zeros((40, 60, 3), np.uint8), label, return_tensors="pt")
    assert encoding["pixel_values"].shape == (1, 3, 512, 768)
    assert encoding["labels"].shape == (1, 512, 768) and encoding["labels"].dtype == torch.int64
    assert set(encoding["labels"].unique().tolist()) == {255, 6, 149}
    assert encoding["labels"][0, 0, 0] == 255 and encoding["labels"][0, 0, -1] == 6 and encoding["labels"][0, -1, 0] == 149
    kept = build_image_processor("coco-stuff")(np.zeros((40, 60, 3), np.uint8), label, return_tensors="pt")
    assert set(kept["labels"].unique().tolist()) == {0, 7, 150}
    # pixel values are never label-reduced
    torch.testing.assert_close(encoding["pixel_values"], kept["pixel_values"])


def test_post_processing_upsamples_bilinearly_to_height_width():
    outputs = SimpleNamespace(logits=torch.randn(2, 5, 8, 12, generator=torch.Generator().manual_seed(0)))
    processor = build_image_processor()
    target_sizes = [(1, 4), (37, 53)]  # (height, width), non-square
    resized = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    assert [tuple(label_map.shape) for label_map in resized] == target_sizes
    expected = F.interpolate(outputs.logits[1:2], size=(37, 53), mode="bilinear", align_corners=False)[0].argmax(0)
    torch.testing.assert_close(resized[1], expected)
    assert not hasattr(processor, "post_process_panoptic_segmentation")  # the pipeline then takes the semantic branch
    assert not hasattr(processor, "post_process_instance_segmentation")


def test_saved_folder_names_the_built_in_class_and_ships_no_code(tmp_path):
    processor = build_image_processor("cityscapes")
    processor.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"preprocessor_config.json"}  # no image_processing_*.py copy
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "SegformerImageProcessor" and "auto_map" not in saved
    assert saved["size"] == {"shortest_edge": 1024, "longest_edge": 2048} and saved["do_reduce_labels"] is False
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SegformerImageProcessor and loaded.to_dict() == processor.to_dict()


# preprocessor_config.json as offseg-hf 0.1's OffSegImageProcessor wrote it (converted ADE20K folder)
LEGACY_CONFIG = {
    "auto_map": {"AutoImageProcessor": "image_processing_offseg.OffSegImageProcessor"},
    "do_convert_rgb": True, "do_normalize": True, "do_reduce_labels": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "OffSegImageProcessor",
    "image_std": [0.229, 0.22399999999999998, 0.225], "resample": 2, "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 2048, "shortest_edge": 512},
}


def test_old_offseg_folders_still_load_and_migrate(tmp_path):
    """With offseg_hf imported, the registered alias resolves an old folder locally (no remote code, no prompt:
    ``trust_remote_code`` is left unset and the folder ships no code here); saving it writes the built-in class."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "preprocessor_config.json").write_text(json.dumps(LEGACY_CONFIG))
    loaded = AutoImageProcessor.from_pretrained(old)
    assert type(loaded) is OffSegImageProcessor and isinstance(loaded, SegformerImageProcessor)
    array = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    torch.testing.assert_close(
        loaded(array, return_tensors="pt").pixel_values, build_image_processor()(array, return_tensors="pt").pixel_values
    )
    loaded.save_pretrained(tmp_path / "migrated")
    migrated = json.loads((tmp_path / "migrated" / "preprocessor_config.json").read_text())
    assert migrated["image_processor_type"] == "SegformerImageProcessor" and "auto_map" not in migrated
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "migrated")) is SegformerImageProcessor


def test_model_config_only_folder_gets_a_processor(tmp_path):
    from offseg_hf.models.configuration_offseg import OffSegConfig

    OffSegConfig.from_preset("offseg-t", num_labels=3).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 40, "width": 40}}))
    loaded = AutoImageProcessor.from_pretrained(tmp_path)  # resolved through the OffSegConfig registration
    assert isinstance(loaded, SegformerImageProcessor) and loaded.size.height == 40


@pytest.mark.parametrize("dataset", ["ade20k", "synthetic"])
def test_trained_folders_save_the_processor_of_converted_folders(dataset, tmp_path):
    """``offseg train`` saves the processor that ``offseg convert`` writes for the same dataset (one builder)."""
    from test_training import tiny_config

    from offseg_hf import OffSegForSemanticSegmentation
    from offseg_hf.training.train import build_trainer, resolve_config

    options = {"dataset": dataset, "output_dir": str(tmp_path / "run"), "max_steps": 1, "num_workers": 0,
               "use_cpu": True}
    if dataset == "ade20k":  # a two-image ADEChallengeData2016 layout
        rng = np.random.default_rng(0)
        for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
            for kind, array in (("images", rng.integers(0, 256, (40, 48, 3))), ("annotations", rng.integers(0, 151, (40, 48)))):
                (tmp_path / "ade" / kind / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array.astype(np.uint8)).save(tmp_path / "ade" / kind / split / f"{stem}.{'jpg' if kind == 'images' else 'png'}")
        options["data_dir"] = str(tmp_path / "ade")
        num_labels, expected = 150, build_image_processor("ade20k")
    else:
        options.update(num_labels=4, image_size=32, train_samples=2, eval_samples=2)
        num_labels, expected = 4, build_image_processor("synthetic", scale=(32, 32))
    OffSegForSemanticSegmentation(tiny_config(num_labels)).save_pretrained(tmp_path / "model")
    options["model"] = str(tmp_path / "model")
    _, processor = build_trainer(resolve_config(options))
    assert type(processor) is SegformerImageProcessor and processor.to_dict() == expected.to_dict()
