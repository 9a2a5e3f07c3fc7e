"""The one function that turns whatever a user or a dataset passes as "an image" into an RGB
``PIL.Image``: the processors, the data loaders and the figures all decode through it, so an image
gives the same pixels whichever way it arrives.

Copied into every saved model folder (remote code), so it imports only third-party packages.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from transformers.image_utils import load_image as transformers_load_image

def load_image(image: Any, *, name: str | None = None) -> Image.Image:
    """Return ``image`` as an upright RGB ``PIL.Image``.

    Built on ``transformers.image_utils.load_image``, which fetches URLs and turns every image
    upright by its EXIF orientation, as transformers' pipelines and processors do. Images it would
    convert wrongly keep this project's handling on top: 16-bit and float images are scaled
    instead of clipped at 255, transparency is composited on white instead of dropped, and numpy
    arrays are checked for their value range.

    Args:
        image: a ``PIL.Image`` in any mode (grayscale, RGBA, palette, ...), a local path, an
            ``http(s)://`` URL, a base64 string or ``data:image/...`` URI, raw encoded bytes, a
            ``{"bytes": ..., "path": ...}`` dict as ``datasets.Image(decode=False)`` gives, or an
            ``H x W``, ``H x W x C`` (C in 1, 3, 4) numpy array. Array values: uint8 as they are;
            uint16 scaled from 0..65535 to 0..255; other integer types must lie in [0, 255]
            (8-bit); floats must lie in [0, 1]; booleans are black and white. 16-bit (``I;16*``),
            32-bit integer (``I``) and float (``F``) PIL images follow the same rules. An image
            fetched from a URL is decoded by transformers alone (8-bit RGB).
        name: how to refer to the image in error messages (defaults to its path when it has one).

    Raises:
        ValueError: the image cannot be read, fetched or decoded, or has an unusable shape, data
            type or value range; the message names it.
    """
    if isinstance(image, dict):  # datasets' undecoded Image feature
        name = name or image.get("path")
        image = image.get("bytes") or image.get("path")
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            return _load_url(image, name or image)
        if os.path.isfile(image):
            name = name or image
            image = _open(image, name)
        elif (data := _decode_base64_image(image)) is not None:
            image = _open(io.BytesIO(data), name or "<base64 image>")
        elif image.startswith("data:"):
            raise ValueError(f"cannot read image {name or '<data URI>'}: not a base64-encoded image")
        else:
            raise ValueError(f"image file not found: {name or image}")
    elif isinstance(image, (bytes, bytearray)):
        image = _open(io.BytesIO(image), name or "<bytes>")
    elif isinstance(image, np.ndarray):
        image = _from_array(image, name or "<array>")
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"cannot use {name or 'image'} of type {type(image).__name__}: expected a PIL image, "
            "a path, a URL, encoded bytes or a numpy array"
        )
    return _upright_rgb(image, name or "<image>")


def _decode_base64_image(text: str) -> bytes | None:
    """The bytes of a base64 string or ``data:image/...;base64,`` URI, if they hold an image.

    Strict decoding plus a header check, so that a missing file's name (base64's alphabet has
    letters, digits and "/") is reported as missing, not as a broken image.
    """
    payload = text.split(",", 1)[-1] if text.startswith("data:image/") else text
    try:
        data = base64.b64decode(payload, validate=True)
        Image.open(io.BytesIO(data))  # reads the header only
    except Exception:  # binascii.Error, UnidentifiedImageError, ...
        return None
    return data


def _load_url(url: str, name: str) -> Image.Image:
    try:
        return transformers_load_image(url)  # fetched, decoded, EXIF-upright, 8-bit RGB
    except Exception as error:  # network, HTTP and Pillow errors alike
        raise ValueError(f"cannot read image {name}: {error}") from error


def _open(source: Any, name: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()  # decode now so a truncated file fails here, not later in a batch
    except Exception as error:  # Pillow's decoders raise many types on corrupt data
        # (UnidentifiedImageError, OSError, DecompressionBombError, struct.error, IndexError, ...)
        raise ValueError(f"cannot read image {name}: {error}") from error
    return image


def _upright_rgb(image: Image.Image, name: str) -> Image.Image:
    deep = image.mode.startswith("I;16") or image.mode in ("I", "F")
    transparent = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
    try:
        if not (deep or transparent):
            return transformers_load_image(image)  # EXIF orientation, then convert("RGB")
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # a corrupt EXIF block
        raise ValueError(f"cannot read image {name}: {error}") from error
    if deep:
        # convert("RGB") would clip these at 255 (a 16-bit image comes out almost white).
        return _from_array(np.asarray(image), name).convert("RGB")
    # Composited on white rather than dropping alpha onto whatever colour transparent pixels hold.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


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
