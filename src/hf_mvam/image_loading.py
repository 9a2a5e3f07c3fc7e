"""Turning whatever a user passes as "an image" into an RGB ``PIL.Image``.

Shared by both processors and by the data loaders, and copied into every saved model folder
(remote code), so it imports only third-party packages.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image


def load_image(image: Any, *, name: str | None = None) -> Image.Image:
    """Return ``image`` as an RGB ``PIL.Image``.

    Args:
        image: a ``PIL.Image`` in any mode (grayscale, RGBA, palette, ...), a path, raw encoded
            bytes, a ``{"bytes": ..., "path": ...}`` dict as ``datasets.Image(decode=False)`` gives,
            or an ``H x W``, ``H x W x C`` (C in 1, 3, 4) numpy array. Array values: uint8 as they
            are; uint16 scaled from 0..65535 to 0..255; other integer types must lie in [0, 255]
            (8-bit); floats must lie in [0, 1]; booleans are black and white. 16-bit
            (``I;16*``), 32-bit integer (``I``) and float (``F``) PIL images follow the same rules.
        name: how to refer to the image in error messages (defaults to its path when it has one).

    Raises:
        ValueError: the image cannot be read or decoded, or has an unusable shape, data type or
            value range; the message names it.
    """
    if isinstance(image, dict):  # datasets' undecoded Image feature
        name = name or image.get("path")
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (str, os.PathLike)):
        name = name or os.fspath(image)
        if not os.path.isfile(image):
            raise ValueError(f"image file not found: {name}")
        image = _open(image, name)
    elif isinstance(image, (bytes, bytearray)):
        image = _open(io.BytesIO(image), name or "<bytes>")
    elif isinstance(image, np.ndarray):
        image = _from_array(image, name or "<array>")
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"cannot use {name or 'image'} of type {type(image).__name__}: expected a PIL image, "
            "a path, encoded bytes or a numpy array"
        )
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # convert("RGB") would clip these at 255 (a 16-bit image comes out almost white).
        image = _from_array(np.asarray(image), name or "<image>")
    if image.mode != "RGB":
        # RGBA and LA are composited on white rather than dropping alpha onto black.
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
    return image


def _open(source: Any, name: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()  # decode now so a truncated file fails here, not later in a batch
    except Exception as error:  # Pillow's decoders raise many types on corrupt data
        # (UnidentifiedImageError, OSError, DecompressionBombError, struct.error, IndexError, ...)
        raise ValueError(f"cannot read image {name}: {error}") from error
    return image


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"cannot use {name} with shape {tuple(array.shape)}: expected H x W or H x W x C "
            "with C in (1, 3, 4) (channels last)"
        )
    if array.dtype.type != np.uint8:
        array = _to_uint8(array, name)
    return Image.fromarray(array)


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """8-bit values of a non-uint8 array, by the rules in :func:`load_image`'s docstring."""
    kind = array.dtype.kind
    if array.dtype.type == np.uint16:  # also big-endian ">u2" (PIL's I;16B)
        return np.round(array * (255 / 65535)).astype(np.uint8)
    if kind == "b":  # black and white
        return array.astype(np.uint8) * 255
    if kind in "iu":
        # Taken as 8-bit values; anything else (a 0/1 mask, 12-bit data) would be a guess.
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"cannot use {name}: {array.dtype} images must lie in [0, 255] (8-bit values; "
                f"only uint16 is scaled, from [0, 65535]); got values in "
                f"[{array.min()}, {array.max()}]"
            )
        return array.astype(np.uint8)
    if kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"cannot use {name}: it contains NaN or infinite values")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(
                f"cannot use {name}: float images must lie in [0, 1]; got values in "
                f"[{array.min()}, {array.max()}]"
            )
        return np.round(array * 255).astype(np.uint8)
    raise ValueError(
        f"cannot use {name} of data type {array.dtype}: expected integers (uint8, uint16, or "
        "others in [0, 255]) or floats in [0, 1]"
    )
