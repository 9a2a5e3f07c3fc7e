"""SCAN's precomputed-feature layout: ``{split}_ims.npy`` (N x R x D region features) beside
``{split}_caps.txt`` (captions, one per line, the same number per image, consecutive).

Three optional files per split, as ``python -m hf_mvam.extract_features`` writes them, become
columns too:

``{split}_boxes.npy``    ``N x R x 4`` region boxes -> ``boxes`` (``[R, 4]`` float32 per image)
``{split}_images.txt``   one line per image (its file) -> ``image_id``
``{split}_meta.jsonl``   one JSON object per image -> one column per key, e.g. the minimal pairs
                         ``variant_of`` (row index of the image this one varies, -1 if none) and
                         ``changed`` that evaluation scores
"""

from __future__ import annotations

import json
import os

import datasets
import numpy as np

from .common import CAPTIONS_FEATURE, check_utf8, ordered_splits, split_name

# SCAN's precomputed splits ("testall" is its 5K MSCOCO test set).
SCAN_SPLITS = ("train", "dev", "test", "testall")
# Columns the layout's own files fill; a _meta.jsonl key may not take one of these names.
LAYOUT_COLUMNS = ("image_features", "captions", "boxes", "image_id")
# JSON value types a _meta.jsonl column may hold, and their datasets types (an int column may
# also hold floats: it becomes float64).
META_TYPES = {bool: "bool", int: "int64", float: "float64", str: "string"}


def scan_splits(folder: str) -> list[str]:
    """SCAN splits with an ``_ims.npy`` file in ``folder`` (their captions are checked later)."""
    return [s for s in SCAN_SPLITS if os.path.isfile(os.path.join(folder, f"{s}_ims.npy"))]


def load_scan(folder: str, splits: list[str]) -> datasets.DatasetDict:
    """Read ``{split}_ims.npy`` + ``{split}_caps.txt`` pairs (and the optional boxes, image ids and
    metadata files) into common-format splits.

    Every split's files are checked (readable, shapes, caption counts, one feature width D for
    all splits) before any is converted. The features are memory-mapped and written through
    ``Dataset.from_generator`` (cached by ``datasets``), so a multi-GB training split never sits
    in memory at once.
    """
    checked = {scan_split: _check_split(folder, scan_split) for scan_split in splits}
    widths = {scan_split: split["dim"] for scan_split, split in checked.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(
            f"the feature widths of the splits in {folder} differ ("
            + ", ".join(f"{scan_split}_ims.npy: {width}" for scan_split, width in widths.items())
            + "): every split needs region features of the same size D"
        )
    loaded = {}
    for scan_split, split in checked.items():
        columns = {
            "image_features": datasets.Array2D((split["num_regions"], split["dim"]), "float32"),
            "captions": CAPTIONS_FEATURE,
        }
        if "boxes" in split["paths"]:
            columns["boxes"] = datasets.Array2D((split["num_regions"], 4), "float32")
        if "image_id" in split["paths"]:
            columns["image_id"] = datasets.Value("string")
        columns.update({name: datasets.Value(kind) for name, kind in split["meta_types"].items()})
        stats = [os.stat(path) for path in split["paths"].values()]
        loaded[split_name(scan_split)] = datasets.Dataset.from_generator(
            _scan_examples,
            features=datasets.Features(columns),
            gen_kwargs={
                "paths": split["paths"],
                # Part of the cache key: a changed file is read again.
                "version": "-".join(f"{stat.st_size}-{stat.st_mtime_ns}" for stat in stats),
            },
        )
    return datasets.DatasetDict({split: loaded[split] for split in ordered_splits(loaded)})


def _check_split(folder: str, scan_split: str) -> dict:
    """The paths of one split's files (``image_features``, ``captions`` and whichever of ``boxes``,
    ``image_id`` and ``meta`` exist), ``num_regions``, ``dim`` and the ``meta_types`` of its
    metadata columns, after checking every file; a ValueError names what is wrong."""
    ims_path = os.path.join(folder, f"{scan_split}_ims.npy")
    caps_path = os.path.join(folder, f"{scan_split}_caps.txt")
    if not os.path.isfile(caps_path):
        raise ValueError(f"{ims_path} has no captions file beside it: expected {caps_path}")
    features = _open_array(ims_path, "N x R x D region features")  # [N, R, D] or [N, D]
    if features.ndim not in (2, 3):
        raise ValueError(
            f"{ims_path} must hold N x R x D region features (or N x D); got shape {features.shape}"
        )
    num_images = features.shape[0]
    num_regions, dim = (1, features.shape[1]) if features.ndim == 2 else features.shape[1:]
    num_captions = len(_read_lines(caps_path))
    if num_images == 0 or num_captions % num_images:
        raise ValueError(
            f"{caps_path} has {num_captions} captions for the {num_images} images of "
            f"{ims_path}: not the same whole number of captions per image"
        )
    paths = {"image_features": ims_path, "captions": caps_path}

    boxes_path = os.path.join(folder, f"{scan_split}_boxes.npy")
    if os.path.isfile(boxes_path):
        boxes = _open_array(boxes_path, "N x R x 4 region boxes")
        if boxes.shape != (num_images, num_regions, 4):
            raise ValueError(
                f"{boxes_path} must hold N x R x 4 boxes for the {num_images} x {num_regions} regions "
                f"of {ims_path}; got shape {boxes.shape}"
            )
        paths["boxes"] = boxes_path
    images_path = os.path.join(folder, f"{scan_split}_images.txt")
    if os.path.isfile(images_path):
        if len(_read_lines(images_path)) != num_images:
            raise ValueError(
                f"{images_path} has {len(_read_lines(images_path))} lines for the {num_images} images of {ims_path}"
            )
        paths["image_id"] = images_path
    meta_path = os.path.join(folder, f"{scan_split}_meta.jsonl")
    meta_types = {}
    if os.path.isfile(meta_path):
        meta_types = _check_meta(meta_path, num_images)
        paths["meta"] = meta_path
    return {"paths": paths, "num_regions": num_regions, "dim": dim, "meta_types": meta_types}


def _check_meta(path: str, num_images: int) -> dict[str, str]:
    """The ``datasets`` value type of each column of a ``_meta.jsonl`` file, after checking that
    it has one JSON object per image, every one with the same keys and scalar values of one type
    per key, and (for ``variant_of``) row indices of other images or -1."""
    rows = _read_meta(path)
    if len(rows) != num_images:
        raise ValueError(f"{path} has {len(rows)} lines for the {num_images} images of its split")
    keys = list(rows[0])
    reserved = sorted(set(keys) & set(LAYOUT_COLUMNS))
    if reserved:
        raise ValueError(f"{path}: the key {reserved[0]!r} names a column of the layout's own files")
    types = {}
    for line, row in enumerate(rows, start=1):
        if list(row) != keys:
            raise ValueError(f"{path} line {line}: keys {list(row)} differ from line 1's {keys}")
        for key, value in row.items():
            kind = type(value)
            if kind not in META_TYPES:
                raise ValueError(f"{path} line {line}: {key!r} is {value!r}; metadata values must be numbers, strings or booleans")
            seen = types.setdefault(key, kind)
            if seen is not kind:
                if {seen, kind} == {int, float}:
                    types[key] = float
                else:
                    raise ValueError(f"{path} line {line}: {key!r} is a {kind.__name__}, line 1's a {seen.__name__}")
    if "variant_of" in types:
        for line, row in enumerate(rows, start=1):
            value = row["variant_of"]
            if types["variant_of"] is not int or not -1 <= value < num_images or value == line - 1:
                raise ValueError(
                    f"{path} line {line}: variant_of must be -1 or the row index of another image "
                    f"(0..{num_images - 1}), got {value!r}"
                )
    return {key: META_TYPES[kind] for key, kind in types.items()}


def _open_array(path: str, expected: str) -> np.ndarray:
    """The memory-mapped array of a ``.npy`` file (never unpickled)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): expected {expected}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # a truncated or foreign file: ValueError, EOFError, OSError, ...
        raise ValueError(f"cannot read {path} as a .npy array: {type(error).__name__}: {error}") from error


def _scan_examples(paths: dict[str, str], version: str):
    """Yield one ``{"image_features": [R, D] float32, "captions": [...], ...}`` per image (with
    ``boxes`` [R, 4], ``image_id`` and the metadata columns when their files exist)."""
    del version  # only distinguishes cache entries
    features = _open_array(paths["image_features"], "")  # [N, R, D] or [N, D]
    captions = _read_lines(paths["captions"])
    per_image = len(captions) // features.shape[0]
    boxes = _open_array(paths["boxes"], "") if "boxes" in paths else None  # [N, R, 4]
    image_ids = _read_lines(paths["image_id"]) if "image_id" in paths else None
    meta = _read_meta(paths["meta"]) if "meta" in paths else None
    for index in range(features.shape[0]):
        example = {
            "image_features": np.asarray(features[index], dtype=np.float32).reshape(-1, features.shape[-1]),  # [R, D]
            "captions": captions[index * per_image : (index + 1) * per_image],
        }
        if boxes is not None:
            example["boxes"] = np.asarray(boxes[index], dtype=np.float32)  # [R, 4]
        if image_ids is not None:
            example["image_id"] = image_ids[index]
        if meta is not None:
            example.update(meta[index])
        yield example


def _read_meta(path: str) -> list[dict]:
    """The JSON objects of a ``_meta.jsonl`` file, one a line; a ValueError names a bad line."""
    rows = []
    for line, text in enumerate(_read_lines(path), start=1):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {line} is not JSON: {error}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {line} is not a JSON object: {text[:80]!r}")
        rows.append(row)
    return rows


def _read_lines(path: str) -> list[str]:
    """Lines of a text file; blank lines are kept so that captions stay aligned."""
    check_utf8(path)
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if text.endswith("\n"):
        text = text[:-1]
    return [line.rstrip("\r") for line in text.split("\n")] if text else []
