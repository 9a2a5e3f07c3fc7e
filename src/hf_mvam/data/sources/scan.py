"""SCAN's precomputed-feature layout: ``{split}_ims.npy`` (N x R x D region features) beside
``{split}_caps.txt`` (captions, one per line, the same number per image, consecutive)."""

from __future__ import annotations

import os

import datasets
import numpy as np

from .common import CAPTIONS_FEATURE, check_utf8, ordered_splits, split_name

# SCAN's precomputed splits ("testall" is its 5K MSCOCO test set).
SCAN_SPLITS = ("train", "dev", "test", "testall")


def scan_splits(folder: str) -> list[str]:
    """SCAN splits with an ``_ims.npy`` file in ``folder`` (their captions are checked later)."""
    return [s for s in SCAN_SPLITS if os.path.isfile(os.path.join(folder, f"{s}_ims.npy"))]


def load_scan(folder: str, splits: list[str]) -> datasets.DatasetDict:
    """Read ``{split}_ims.npy`` + ``{split}_caps.txt`` pairs into common-format splits.

    Every split's files are checked (readable, shapes, caption counts, one feature width D for
    all splits) before any is converted. The features are memory-mapped and written through
    ``Dataset.from_generator`` (cached by ``datasets``), so a multi-GB training split never sits
    in memory at once.
    """
    shapes = {scan_split: _check_split(folder, scan_split) for scan_split in splits}
    widths = {scan_split: shape[1] for scan_split, shape in shapes.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(
            f"the feature widths of the splits in {folder} differ ("
            + ", ".join(f"{scan_split}_ims.npy: {width}" for scan_split, width in widths.items())
            + "): every split needs region features of the same size D"
        )
    loaded = {}
    for scan_split, (num_regions, dim) in shapes.items():
        ims_path = os.path.join(folder, f"{scan_split}_ims.npy")
        caps_path = os.path.join(folder, f"{scan_split}_caps.txt")
        stat = os.stat(ims_path), os.stat(caps_path)
        loaded[split_name(scan_split)] = datasets.Dataset.from_generator(
            _scan_examples,
            features=datasets.Features(
                {
                    "image_features": datasets.Array2D((num_regions, dim), "float32"),
                    "captions": CAPTIONS_FEATURE,
                }
            ),
            gen_kwargs={
                "ims_path": ims_path,
                "caps_path": caps_path,
                # Part of the cache key: a changed file is read again.
                "version": f"{stat[0].st_size}-{stat[0].st_mtime_ns}-{stat[1].st_size}-"
                f"{stat[1].st_mtime_ns}",
            },
        )
    return datasets.DatasetDict({split: loaded[split] for split in ordered_splits(loaded)})


def _check_split(folder: str, scan_split: str) -> tuple[int, int]:
    """``(R, D)`` of one split after checking its two files; a ValueError names what is wrong."""
    ims_path = os.path.join(folder, f"{scan_split}_ims.npy")
    caps_path = os.path.join(folder, f"{scan_split}_caps.txt")
    if not os.path.isfile(caps_path):
        raise ValueError(f"{ims_path} has no captions file beside it: expected {caps_path}")
    features = _open_features(ims_path)  # [N, R, D] or [N, D]
    if features.ndim not in (2, 3):
        raise ValueError(
            f"{ims_path} must hold N x R x D region features (or N x D); got shape {features.shape}"
        )
    num_images = features.shape[0]
    num_regions, dim = (1, features.shape[1]) if features.ndim == 2 else features.shape[1:]
    num_captions = len(_read_caption_lines(caps_path))
    if num_images == 0 or num_captions % num_images:
        raise ValueError(
            f"{caps_path} has {num_captions} captions for the {num_images} images of "
            f"{ims_path}: not the same whole number of captions per image"
        )
    return num_regions, dim


def _open_features(ims_path: str) -> np.ndarray:
    """The memory-mapped array of an ``_ims.npy`` file (never unpickled)."""
    if os.path.getsize(ims_path) == 0:
        raise ValueError(f"{ims_path} is empty (0 bytes): expected N x R x D region features")
    try:
        return np.load(ims_path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # a truncated or foreign file: ValueError, EOFError, OSError, ...
        raise ValueError(f"cannot read {ims_path} as a .npy array: {type(error).__name__}: {error}") from error


def _scan_examples(ims_path: str, caps_path: str, version: str):
    """Yield one ``{"image_features": [R, D] float32, "captions": [...]}`` per image."""
    del version  # only distinguishes cache entries
    features = _open_features(ims_path)  # [N, R, D] or [N, D]
    captions = _read_caption_lines(caps_path)
    per_image = len(captions) // features.shape[0]
    for index in range(features.shape[0]):
        region_features = np.asarray(features[index], dtype=np.float32).reshape(
            -1, features.shape[-1]
        )  # [R, D]
        yield {
            "image_features": region_features,
            "captions": captions[index * per_image : (index + 1) * per_image],
        }


def _read_caption_lines(path: str) -> list[str]:
    """Lines of a captions file; blank lines are kept so that captions stay aligned."""
    check_utf8(path)
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if text.endswith("\n"):
        text = text[:-1]
    return [line.rstrip("\r") for line in text.split("\n")] if text else []
