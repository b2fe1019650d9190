"""One palette per dataset: synthetic classes drawn in the colours they are named after, the same palette for
ground truth and predictions, legend swatches in the colour the overlay shows."""

import colorsys

import numpy as np
import pytest
from PIL import Image

from offseg_hf.data.synthetic import SyntheticScenes, synthetic_class_names, synthetic_palette
from offseg_hf.inference.visualize import legend_colours, overlay_layout, resolve_palette, save_overlay

HUES = {"red": 0, "orange": 30, "yellow": 60, "lime": 90, "green": 120, "teal": 150, "cyan": 180, "azure": 210,
        "blue": 240, "violet": 270, "purple": 300, "pink": 330}


@pytest.mark.parametrize("num_labels", [4, 8, 12, 19])
def test_synthetic_class_colours_match_their_names(num_labels):
    names = synthetic_class_names(num_labels)
    palette, dataset = resolve_palette(dict(enumerate(names)))
    assert dataset == "synthetic"
    np.testing.assert_array_equal(palette, np.asarray(synthetic_palette(num_labels), dtype=np.uint8))
    scenes = SyntheticScenes(num_labels, 16)
    for k, name in enumerate(names):
        named = HUES[name.rstrip("0123456789-").split("-")[0].rstrip("0123456789")]
        for colour in (palette[k], scenes.class_appearance[k]["colour"]):  # display colour and drawn colour
            hue = 360 * colorsys.rgb_to_hsv(*(np.asarray(colour, dtype=float) / 255))[0]
            distance = min(abs(hue - named), 360 - abs(hue - named))
            assert distance <= 30, (name, colour, hue)


def test_legend_swatches_show_the_overlay_colour(tmp_path):
    image = Image.new("RGB", (80, 60), (100, 100, 100))
    label_map = np.zeros((60, 80), dtype=np.int64)
    label_map[:, 40:] = 1
    palette = np.array([[255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    fractions = [{"id": 0, "label": "red thing", "pixels": 2400, "fraction": 0.5},
                 {"id": 1, "label": "blue thing", "pixels": 2400, "fraction": 0.5}]
    path = tmp_path / "overlay.png"
    layout = save_overlay(image, label_map, palette, fractions, path, alpha=0.5)
    swatches = legend_colours(np.full((60, 80, 3), 100.0), label_map, palette, [0, 1], 0.5)
    np.testing.assert_allclose(swatches, [[177.5, 50, 50], [50, 50, 177.5]])
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    top, left = layout.legend_origin
    legend = pixels[top:, left:].reshape(-1, 3)
    for swatch, pure in zip(np.round(swatches).astype(int), palette.astype(int)):
        assert (np.abs(legend - swatch).max(axis=1) <= 2).sum() > 20  # the swatch is drawn in the overlay colour
        assert not (np.abs(legend - pure).max(axis=1) <= 2).any()  # and nowhere in the undimmed palette colour
    prediction = pixels[layout.prediction_origin[0]:layout.prediction_origin[0] + 10,
                        layout.prediction_origin[1]:layout.prediction_origin[1] + 10]
    assert np.abs(prediction - np.round(swatches[0])).max() <= 2
