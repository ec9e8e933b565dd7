"""Turning any decodable image into the 8-bit RGB picture CLIP's processor expects.

- EXIF orientation is applied (`ImageOps.exif_transpose`), as the `datasets` Image feature does.
- High bit depth is scaled to 8 bits, never clipped: 16-bit grayscale (`I;16*`, e.g. 16-bit PNG/TIFF) is
  divided by 257; 32-bit integer (`I`) is read as 16-bit when its values fit in 0..65535 (how Pillow
  opens 16-bit files) and otherwise stretched from its min to its max; float (`F`, e.g. float TIFF) is
  read as 0..1 when its values lie there, and otherwise stretched from its min to its max (NaN -> 0).
- Transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) is composited on white,
  like transformers' `convert_to_rgb`.
- Everything else (L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX, ...) goes through Pillow's `convert("RGB")`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def _gray8(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _stretch(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.zeros_like(values) if hi <= lo else (values - lo) * (255.0 / (hi - lo))


def high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16"):
        return _gray8(np.asarray(image).astype(np.float64) / 257.0)
    values = np.asarray(image).astype(np.float64)
    if mode == "I":
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _gray8(values / 257.0 if values.max() > 255 else values)
        return _gray8(_stretch(values)) if values.size else _gray8(values)
    # "F": float samples
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return _gray8(values * 255.0)
    return _gray8(_stretch(values)) if values.size else _gray8(values)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image` (already opened; decoding errors propagate to the caller)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = high_bit_depth_to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
