"""Decode stored image/label bytes to arrays and encode class maps as lossless PNG: one implementation for all."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

LABEL_MODES = ("P", "L")


def decode_image(data: bytes) -> np.ndarray:
    """JPEG (or any PIL-readable) bytes -> uint8 HxWx3 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_label(data: bytes) -> np.ndarray:
    """PNG bytes of class indices (palette or single-channel) -> uint8 HxW indices; colours are never mapped."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in LABEL_MODES:
            raise ValueError(f"label PNG mode {image.mode!r}: expected class indices in mode 'P' or 'L'")
        return np.asarray(image)


def encode_label(indices: np.ndarray) -> bytes:
    """uint8 HxW class indices -> single-channel PNG bytes (lossless)."""
    if indices.dtype != np.uint8 or indices.ndim != 2:
        raise ValueError(f"label array {indices.dtype} {indices.shape}: expected uint8 HxW")
    buffer = io.BytesIO()
    Image.fromarray(indices).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
