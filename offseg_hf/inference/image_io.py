"""Reading images the way the segmentation tools expect them: upright, 8-bit, three RGB channels.

Photos and dataset files come in many PIL modes. :func:`to_rgb` turns each into an 8-bit ``RGB`` image
the way the reference loader (OpenCV's ``imread`` in colour mode) reads files:

================  ===========================================================================
PIL mode          conversion
================  ===========================================================================
``RGB``           unchanged
``L``, ``1``      grey value copied to the three channels
``P``, ``PA``     palette looked up; transparency ignored
``RGBA``, ``LA``  alpha channel dropped (not composited)
``CMYK``          PIL's CMYK → RGB conversion
``I;16*``, ``I``  16-bit values shifted right by 8 bits (as OpenCV does), then grey → RGB
``F``             values in [0, 1] scaled by 255, others clipped to [0, 255]
================  ===========================================================================

:func:`load_image` also applies the EXIF orientation tag (phone photos are often stored sideways) and
forces the full decode, so a truncated file fails here with its name rather than later.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_SUFFIXES", "ImageLoadError", "load_image", "to_rgb"]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}
)
"""File suffixes (lower case) treated as images when a directory is scanned."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


class ImageLoadError(OSError):
    """An image file that cannot be read; the message names the file and the reason."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit ``RGB`` (see the module docstring for each mode).

    Args:
        image: a PIL image, any mode.

    Returns:
        An ``RGB`` image of the same size (``image`` itself when it is already ``RGB``).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = np.clip(values, 0, 65535) >> 8
        grey = np.clip(values, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's advice for palettes with transparency; alpha dropped below
    return image.convert("RGB")  # RGBA/LA: drops alpha without compositing; L, 1, P, CMYK, YCbCr: colour conversion


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file upright, fully decoded, as 8-bit ``RGB``.

    Args:
        path: the file to read.

    Returns:
        The ``RGB`` image, rotated/mirrored according to its EXIF orientation tag.

    Raises:
        ImageLoadError: the file does not exist, is not an image PIL recognises, or is truncated/corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated data raises here
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright).copy()
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(f"{path}: not an image file PIL can read") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{path}: cannot decode image ({error})") from error
