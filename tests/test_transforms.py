"""Augmentation invariants: alignment, crop category ratio, ignore padding, determinism."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from offseg_hf.data.pipeline import ExampleTransform, collate_segmentation
from offseg_hf.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotoMetricDistortion,
    RandomCropCatMax,
    build_test_transform,
    build_train_transform,
    keep_ratio_size,
)


def _blocks(height=64, width=64, block=16, num_labels=4, seed=0):
    """Image whose red channel encodes the class of a blocky label map (class * 60)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_labels, (height // block + 1, width // block + 1))
    label = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint8)
    image = np.zeros((3, height, width), dtype=np.uint8)
    image[0] = label * 60
    image[1] = 100
    return tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(label))


def _denormalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


def test_keep_ratio_size_follows_rescale_rule():
    assert keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
    assert keep_ratio_size(1024, 2048, (2048, 512)) == (512, 1024)  # short side limits
    assert keep_ratio_size(100, 1000, (2048, 512)) == (205, 2048)  # long side limits


def test_train_transform_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    transform = build_train_transform(48, scale=(128, 64), photometric=False)
    for seed in range(5):
        image, mask = _blocks(seed=seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48)
        assert isinstance(out_mask, tv_tensors.Mask) and out_mask.dtype == torch.uint8
        red = _denormalise(out_image)[0]
        valid = out_mask != 255
        decoded = torch.round(red / 60).to(torch.uint8)
        agreement = (decoded[valid] == out_mask[valid]).float().mean()
        assert agreement > 0.9, f"image and mask misaligned ({agreement:.2f})"


def test_flip_moves_image_and_mask_together():
    image, mask = _blocks()
    transform = build_train_transform(64, scale=(64, 64), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                                      flip_prob=1.0, photometric=False)
    out_image, out_mask = transform(image, mask)
    torch.testing.assert_close(out_mask, torch.flip(mask, dims=[-1]).as_subclass(torch.Tensor), check_dtype=False)
    red = torch.round(_denormalise(out_image)[0])
    torch.testing.assert_close(red, torch.flip(image[0].float(), dims=[-1]))


def test_crop_honours_cat_max_ratio():
    label = np.zeros((64, 64), dtype=np.uint8)
    label[:, 32:] = 1
    label[:4, :4] = 255  # ignored pixels are left out of the ratio
    mask = tv_tensors.Mask(torch.from_numpy(label))
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    crop = RandomCropCatMax(32, cat_max_ratio=0.75)
    for seed in range(30):
        torch.manual_seed(seed)
        _, out = crop(image, mask)
        values = out[out != 255]
        share = torch.bincount(values.long()).max().item() / values.numel()
        assert out.shape == (32, 32) and share < 0.75


def test_crop_gives_up_after_max_tries():
    mask = tv_tensors.Mask(torch.zeros(40, 40, dtype=torch.uint8))  # one class: no window is acceptable
    image = tv_tensors.Image(torch.zeros(3, 40, 40, dtype=torch.uint8))
    _, out = RandomCropCatMax(16)(image, mask)
    assert out.shape == (16, 16)


def test_small_image_is_padded_with_zero_and_ignore():
    image = tv_tensors.Image(torch.full((3, 30, 20), 200, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(30, 20, dtype=torch.uint8))
    transform = build_train_transform(48, scale=(30, 20), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 48, 48)
    assert (out_mask[:30, :20] == 1).all()
    assert (out_mask[30:, :] == 255).all() and (out_mask[:, 20:] == 255).all()
    assert (out_image[:, 30:, :] == 0).all() and (out_image[:, :, 20:] == 0).all()


def test_photometric_distortion_changes_image_only():
    image, mask = _blocks()
    distortion = PhotoMetricDistortion()
    params = {"brightness": 10.0, "contrast_first": True, "contrast": 1.2, "saturation": 0.7, "hue": 9}
    out = distortion.transform(image, params)
    assert out.dtype == torch.uint8 and isinstance(out, tv_tensors.Image) and not torch.equal(out, image)
    assert distortion.transform(mask, params) is mask
    # with every step off the image is unchanged; a zero hue shift and saturation 1 change it by ≤ 1 level
    off = {"brightness": None, "contrast_first": False, "contrast": None, "saturation": None, "hue": None}
    assert torch.equal(distortion.transform(image, off), image)
    near = dict(off, saturation=1.0, hue=0)
    assert (distortion.transform(image, near).int() - image.int()).abs().max() <= 1


def test_test_transform_keeps_label_size():
    image, mask = _blocks(height=64, width=96)
    out_image, out_mask = build_test_transform((64, 32))(image, mask)
    assert out_image.shape == (3, 32, 48) and out_mask.shape == (64, 96)


def test_seeded_example_transform_is_reproducible_per_epoch():
    from PIL import Image

    image, mask = _blocks()
    pil_image = Image.fromarray(image.permute(1, 2, 0).numpy())
    pil_label = Image.fromarray(mask.numpy())
    example = ExampleTransform(build_train_transform(32, scale=(64, 64)), seed=7)
    first = example.one(pil_image, pil_label, index=3)
    torch.manual_seed(123)  # global RNG must not matter
    again = example.one(pil_image, pil_label, index=3)
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(first["labels"], again["labels"])
    example.epoch = 1
    other = example.one(pil_image, pil_label, index=3)
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    batch = collate_segmentation([first, other])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match="batch mixes"):
        collate_segmentation([first, {"pixel_values": torch.zeros(3, 8, 8), "labels": torch.zeros(8, 8)}])
