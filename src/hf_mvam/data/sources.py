"""Loading a user's image–caption data into one common format, through ``datasets``.

:func:`load_image_caption_dataset` accepts, tried in this order:

1. a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
2. an image folder with ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet`` (at the top
   or in split subfolders), read with ``load_dataset("imagefolder", data_dir=...)``;
3. a Karpathy split JSON file (``dataset_flickr30k.json``, ``dataset_coco.json``) with the images
   under ``image_root``;
4. a folder in SCAN's precomputed-feature layout: ``{split}_ims.npy`` (N x R x D region features)
   and ``{split}_caps.txt`` (captions, one per line, the same number per image, consecutive);
5. any other folder of data files ``datasets`` can read, or a Hub dataset id.

Every split comes out with the columns

``image``           ``datasets.Image()`` (decodes to a PIL image), or for precomputed features
``image_features``  ``Array2D((R, D), "float32")`` region features of one image, and
``captions``        list of non-empty, stripped strings (one or more per image).

Bad data never stops loading: unreadable or missing images, images with NaN/inf features and
images left without any caption are skipped, empty captions are dropped, and all of it is
reported in the statistics dictionary returned beside the data, for the caller to log.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

import datasets
import numpy as np

from ..image_loading import load_image

__all__ = ["CAPTION_COLUMNS", "load_image_caption_dataset"]

# Caption columns looked for, in this order, when none is given.
CAPTION_COLUMNS = ("caption", "captions", "sentences", "raw", "text")
# How split names found in the wild map onto ours; unknown names are kept as they are.
SPLIT_NAMES = {
    "train": "train",
    "restval": "train",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "validation": "validation",
    "test": "test",
}
SPLIT_ORDER = ("train", "validation", "test")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# SCAN's precomputed splits ("testall" is its 5K MSCOCO test set).
SCAN_SPLITS = ("train", "dev", "test", "testall")
# A string ending like this is a local file, never a Hub id.
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".npy", ".txt", ".tsv")

_CAPTIONS_FEATURE = datasets.List(datasets.Value("string"))


def load_image_caption_dataset(
    data: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Load image–caption data from a local folder or file, or from the Hub.

    Args:
        data: a ``save_to_disk`` folder, an image folder with ``metadata.*``, a Karpathy split
            JSON file, a SCAN precomputed-feature folder, another folder of data files, or a Hub
            dataset id (see the module docstring for the order of detection).
        image_root: folder holding the images named in a Karpathy JSON (required there); for
            datasets whose image column holds relative file paths, the folder they are relative to.
        image_column: the image column of a saved, image-folder or Hub dataset (ignored for
            Karpathy and SCAN files); by default ``image``, else the first column with the
            ``Image`` feature, else ``image_features``. It may hold images, file paths or
            R x D region features.
        caption_column: the caption column of a saved or Hub dataset; by default the first of
            ``caption``, ``captions``, ``sentences``, ``raw``, ``text``. It may hold one string
            (rows of the same image file are then merged) or a list of strings per row.

    Returns:
        ``(splits, stats)``. ``splits`` is a ``DatasetDict`` of the splits found, ordered
        ``train``, ``validation``, ``test``, then any others (train/restval -> train,
        val/dev -> validation; a ``split`` column is turned into separate splits; a single
        unsplit dataset is ``train``), each with the columns ``image`` (or ``image_features``)
        and ``captions``. ``stats`` holds ``source`` (which loader was used),
        ``skipped_images`` (a list of ``(split, path or name, reason)``), ``skipped_captions``
        (how many empty captions were dropped), ``num_images`` and ``num_captions`` per split.

    Raises:
        FileNotFoundError: ``data`` looks like a local path but does not exist, or ``image_root``
            does not exist.
        ValueError: the data has no usable image or caption column (the message names the
            available columns), a Karpathy JSON without ``image_root``, SCAN captions that do not
            divide evenly among the images, or a file/folder of an unsupported kind.
    """
    path = os.path.expanduser(os.fspath(data))
    image_root = None if image_root is None else os.path.expanduser(os.fspath(image_root))
    skipped_images: list[tuple[str, str, str]] = []  # filled by loaders that skip entries early

    if os.path.isdir(path):
        if _is_saved_dataset(path):
            source, raw = "load_from_disk", _as_dataset_dict(datasets.load_from_disk(path))
        elif _has_metadata_file(path):
            source, raw = "imagefolder", datasets.load_dataset("imagefolder", data_dir=path)
        elif scan_splits := _scan_splits(path):
            source, raw = "scan_precomputed", _load_scan(path, scan_splits)
        else:
            source, raw = "data_files", _load_other_folder(path)
    elif os.path.isfile(path):
        if not path.lower().endswith(".json"):
            raise ValueError(
                f"unsupported file {path}: expected a Karpathy split JSON file (.json), or a folder"
            )
        source, raw = "karpathy_json", _load_karpathy(path, image_root, skipped_images)
    elif _looks_like_local_path(os.fspath(data)):
        raise FileNotFoundError(
            f"{os.fspath(data)} does not exist (it looks like a local path, so it was not looked "
            "up on the Hub)"
        )
    else:
        source, raw = "hub", _as_dataset_dict(datasets.load_dataset(path))

    if source not in ("karpathy_json", "scan_precomputed"):  # these are built in the common format
        raw = _to_common_columns(raw, image_column, caption_column, image_root)

    splits: dict[str, datasets.Dataset] = {}
    skipped_captions = 0
    for split, dataset in raw.items():
        dataset, problems, dropped = _drop_bad_examples(dataset, split)
        splits[split] = dataset
        skipped_images += problems
        skipped_captions += dropped
    stats = {
        "source": source,
        "skipped_images": skipped_images,
        "skipped_captions": skipped_captions,
        "num_images": {split: len(dataset) for split, dataset in splits.items()},
        "num_captions": {
            split: sum(len(captions) for captions in dataset["captions"])
            for split, dataset in splits.items()
        },
    }
    return datasets.DatasetDict(splits), stats


# --- Detecting the kind of source -------------------------------------------------------------


def _is_saved_dataset(folder: str) -> bool:
    return any(
        os.path.isfile(os.path.join(folder, name)) for name in ("dataset_dict.json", "state.json")
    )


def _has_metadata_file(folder: str) -> bool:
    """A ``metadata.*`` file at the top of ``folder`` or in one of its split subfolders."""
    for name in METADATA_FILES:
        if os.path.isfile(os.path.join(folder, name)) or glob.glob(os.path.join(folder, "*", name)):
            return True
    return False


def _scan_splits(folder: str) -> list[str]:
    """SCAN splits with an ``_ims.npy`` file in ``folder`` (their captions are checked later)."""
    return [s for s in SCAN_SPLITS if os.path.isfile(os.path.join(folder, f"{s}_ims.npy"))]


def _looks_like_local_path(data: str) -> bool:
    """True for strings that cannot be a Hub id (``owner/name`` or ``name``)."""
    return (
        os.path.isabs(data)
        or data.startswith((".", "~"))
        or "\\" in data
        or data.count("/") > 1
        or data.lower().endswith(LOCAL_SUFFIXES)
    )


def _as_dataset_dict(loaded: datasets.Dataset | datasets.DatasetDict) -> datasets.DatasetDict:
    """A single ``Dataset`` becomes the ``train`` split (a ``split`` column may re-split it)."""
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"expected a Dataset or DatasetDict, got {type(loaded).__name__}")
    return loaded


def _load_other_folder(folder: str) -> datasets.DatasetDict:
    """A folder in none of our layouts: let ``datasets`` infer its format (parquet, csv, ...)."""
    try:
        return _as_dataset_dict(datasets.load_dataset(folder))
    except Exception as error:  # datasets raises many kinds here; add what we looked for
        raise ValueError(
            f"cannot read the folder {folder}: it is not a save_to_disk folder (dataset_dict.json "
            f"or state.json), an image folder with one of {', '.join(METADATA_FILES)}, a SCAN "
            "folder ({split}_ims.npy + {split}_caps.txt), nor data files datasets can read "
            f"({type(error).__name__}: {error})"
        ) from error


# --- Karpathy split JSON ----------------------------------------------------------------------


def _load_karpathy(
    json_path: str, image_root: str | None, skipped_images: list[tuple[str, str, str]]
) -> datasets.DatasetDict:
    """Read ``images[].{filepath, filename, split, sentences[].raw}`` into common-format splits.

    Entries that are not objects or lack a string filename are skipped into ``skipped_images``;
    a sentence may also be a plain string, or give only its ``tokens``.
    """
    if image_root is None:
        raise ValueError(
            f"{json_path} is read as a Karpathy split JSON, whose images live elsewhere: pass "
            "image_root= (the folder holding the image files, or their filepath subfolders)"
        )
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root {image_root} is not an existing folder")
    with open(json_path, encoding="utf-8") as file:
        try:
            content = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{json_path} is not valid JSON: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(
            f"{json_path} is not a Karpathy split JSON: it needs a top-level 'images' list"
        )

    columns: dict[str, dict[str, list]] = {}
    for index, entry in enumerate(content["images"]):
        if not isinstance(entry, dict):
            # Its split is unknown: reported under the default one.
            reason = f"the JSON entry is a {type(entry).__name__}, not an object"
            skipped_images.append(("train", f"images[{index}]", reason))
            continue
        split = _split_name(str(entry.get("split", "train")))
        filename, filepath = entry.get("filename"), entry.get("filepath") or ""
        reason = ""
        if not filename:
            reason = "no filename in the JSON entry"
        elif not isinstance(filename, str):
            reason = f"filename {filename!r} in the JSON entry is not a string"
        elif not isinstance(filepath, str):
            reason = f"filepath {filepath!r} in the JSON entry is not a string"
        if reason:
            skipped_images.append((split, f"images[{index}]", reason))
            continue
        path = os.path.join(image_root, filepath, filename)
        sentences = entry.get("sentences") or []
        if not isinstance(sentences, list):  # a single sentence
            sentences = [sentences]
        captions = [_karpathy_caption(sentence) for sentence in sentences]
        split_columns = columns.setdefault(split, {"image": [], "captions": []})
        split_columns["image"].append(path)
        split_columns["captions"].append(captions)

    features = datasets.Features(
        {"image": datasets.Image(decode=False), "captions": _CAPTIONS_FEATURE}
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(columns[split], features=features)
            for split in _ordered(columns)
        }
    )


def _karpathy_caption(sentence: Any) -> str:
    """A sentence's text: the sentence itself if it is a string, else its ``raw`` string, else
    its ``tokens`` joined. Anything else is ``""``: dropped (and counted) with the empty captions.
    """
    if isinstance(sentence, str):
        return sentence
    if not isinstance(sentence, dict):
        return ""
    raw, tokens = sentence.get("raw"), sentence.get("tokens")
    if isinstance(raw, str) and raw.strip():
        return raw
    if isinstance(tokens, list) and all(isinstance(token, str) for token in tokens):
        return " ".join(tokens)
    return ""


# --- SCAN precomputed features ----------------------------------------------------------------


def _load_scan(folder: str, splits: list[str]) -> datasets.DatasetDict:
    """Read ``{split}_ims.npy`` + ``{split}_caps.txt`` pairs into common-format splits.

    The features are memory-mapped and written through ``Dataset.from_generator`` (cached by
    ``datasets``), so a multi-GB training split never sits in memory at once.
    """
    loaded = {}
    for scan_split in splits:
        ims_path = os.path.join(folder, f"{scan_split}_ims.npy")
        caps_path = os.path.join(folder, f"{scan_split}_caps.txt")
        if not os.path.isfile(caps_path):
            raise ValueError(f"{ims_path} has no captions file beside it: expected {caps_path}")
        features = np.load(ims_path, mmap_mode="r")  # [N, R, D] or [N, D]
        if features.ndim not in (2, 3):
            raise ValueError(
                f"{ims_path} must hold N x R x D region features (or N x D); got shape "
                f"{features.shape}"
            )
        num_images = features.shape[0]
        num_regions, dim = (1, features.shape[1]) if features.ndim == 2 else features.shape[1:]
        num_captions = len(_read_caption_lines(caps_path))
        if num_images == 0 or num_captions % num_images:
            raise ValueError(
                f"{caps_path} has {num_captions} captions for the {num_images} images of "
                f"{ims_path}: not the same whole number of captions per image"
            )
        stat = os.stat(ims_path), os.stat(caps_path)
        loaded[_split_name(scan_split)] = datasets.Dataset.from_generator(
            _scan_examples,
            features=datasets.Features(
                {
                    "image_features": datasets.Array2D((num_regions, dim), "float32"),
                    "captions": _CAPTIONS_FEATURE,
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
    return datasets.DatasetDict({split: loaded[split] for split in _ordered(loaded)})


def _scan_examples(ims_path: str, caps_path: str, version: str):
    """Yield one ``{"image_features": [R, D] float32, "captions": [...]}`` per image."""
    del version  # only distinguishes cache entries
    features = np.load(ims_path, mmap_mode="r")  # [N, R, D] or [N, D]
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
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if text.endswith("\n"):
        text = text[:-1]
    return [line.rstrip("\r") for line in text.split("\n")] if text else []


# --- Saved, image-folder and Hub datasets -> common columns -----------------------------------


def _to_common_columns(
    raw: datasets.DatasetDict,
    image_column: str | None,
    caption_column: str | None,
    image_root: str | None,
) -> datasets.DatasetDict:
    """Rename, re-split and convert a loaded ``DatasetDict`` to ``image``/``captions`` columns."""
    first = next(iter(raw.values()))
    if "split" in first.column_names and "split" not in (image_column, caption_column):
        raw = _split_by_column(raw, "split")
    else:
        raw = _normalise_split_names(raw)
    return datasets.DatasetDict(
        {
            split: _common_columns(dataset, split, image_column, caption_column, image_root)
            for split, dataset in raw.items()
        }
    )


def _split_by_column(raw: datasets.DatasetDict, column: str) -> datasets.DatasetDict:
    """Turn the values of a ``split`` column (train/restval/val/test, ...) into splits."""
    whole = datasets.concatenate_datasets(list(raw.values()))
    by_name: dict[str, list] = {}
    for value in whole.unique(column):
        by_name.setdefault(_split_name(str(value)), []).append(value)
    return datasets.DatasetDict(
        {
            name: whole.filter(
                _value_in,
                fn_kwargs={"values": by_name[name]},
                input_columns=column,
                batched=True,
                desc=f"Selecting the {name} split",
            ).remove_columns(column)
            for name in _ordered(by_name)
        }
    )


def _value_in(column: list, values: list) -> list[bool]:
    return [value in values for value in column]


def _normalise_split_names(raw: datasets.DatasetDict) -> datasets.DatasetDict:
    """Rename splits (val -> validation, ...), concatenating those that map to the same name."""
    by_name: dict[str, list[datasets.Dataset]] = {}
    for split, dataset in raw.items():
        by_name.setdefault(_split_name(split), []).append(dataset)
    return datasets.DatasetDict(
        {
            name: by_name[name][0]
            if len(by_name[name]) == 1
            else datasets.concatenate_datasets(by_name[name])
            for name in _ordered(by_name)
        }
    )


def _common_columns(
    dataset: datasets.Dataset,
    split: str,
    image_column: str | None,
    caption_column: str | None,
    image_root: str | None,
) -> datasets.Dataset:
    """One split as ``image`` (``Image(decode=False)``) or ``image_features``, and ``captions``.

    Captions are raw lists here (not yet stripped or filtered); rows of the same image file with
    one caption each are merged.
    """
    image_column = _find_image_column(dataset, split, image_column)
    caption_column = _find_caption_column(dataset, split, caption_column, image_column)
    image_feature = dataset.features[image_column]
    one_caption_per_row = _is_string_feature(dataset.features[caption_column])

    dataset = dataset.map(
        _caption_lists,
        input_columns=caption_column,
        batched=True,
        remove_columns=[name for name in dataset.column_names if name != image_column],
        # Given, so that a first batch without any caption cannot make the type list<null>.
        features=datasets.Features({image_column: image_feature, "captions": _CAPTIONS_FEATURE}),
        desc=f"Reading {split} captions",
    )
    if isinstance(image_feature, datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    elif _is_string_feature(image_feature):  # file paths
        if image_root is not None:
            dataset = dataset.map(
                _join_root,
                fn_kwargs={"root": image_root, "column": image_column},
                input_columns=image_column,
                batched=True,
                desc=f"Resolving {split} image paths",
            )
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    else:
        dataset = dataset.cast_column(image_column, _float32_array_feature(dataset, image_column))
        return dataset.rename_columns(_renaming(image_column, "image_features"))

    dataset = dataset.rename_columns(_renaming(image_column, "image"))
    if one_caption_per_row:
        dataset = _merge_rows_of_the_same_image(dataset, split)
    return dataset


def _find_image_column(dataset: datasets.Dataset, split: str, given: str | None) -> str:
    features = dataset.features
    if given is not None:
        if given not in features:
            raise ValueError(
                f"image column {given!r} not found in the {split} split; available columns: "
                f"{list(features)}"
            )
        feature = features[given]
        if not (
            isinstance(feature, datasets.Image)
            or _is_string_feature(feature)
            or _is_numeric_array_feature(feature)
        ):
            raise ValueError(
                f"image column {given!r} has the feature {feature}: expected datasets.Image, "
                "file paths (strings) or region features (R x D numbers)"
            )
        return given
    image = features.get("image")
    if isinstance(image, datasets.Image) or _is_string_feature(image):
        return "image"
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    if "image_features" in features and _is_numeric_array_feature(features["image_features"]):
        return "image_features"
    raise ValueError(
        f"no image column found in the {split} split (looked for 'image', a column with the "
        f"datasets.Image feature, or 'image_features'); available columns: {list(features)}. "
        "Pass image_column= to choose one."
    )


def _find_caption_column(
    dataset: datasets.Dataset, split: str, given: str | None, image_column: str
) -> str:
    features = dataset.features
    if given is not None:
        if given not in features:
            raise ValueError(
                f"caption column {given!r} not found in the {split} split; available columns: "
                f"{list(features)}"
            )
        found = given
    else:
        candidates = [name for name in CAPTION_COLUMNS if name in features and name != image_column]
        if not candidates:
            raise ValueError(
                f"no caption column found in the {split} split (looked for "
                f"{', '.join(CAPTION_COLUMNS)}); available columns: {list(features)}. Pass "
                "caption_column= to choose one."
            )
        found = candidates[0]
    if found == image_column:
        raise ValueError(f"the image and caption columns are both {found!r}")
    return found


def _caption_lists(values: list) -> dict[str, list[list[str]]]:
    """A batch of caption cells (a string, a list of strings or of ``{"raw": ...}``) as lists.

    Anything that is not text, and a null cell, becomes ``""``: dropped (and counted) with the
    empty captions.
    """
    lists = []
    for value in values:
        if not isinstance(value, list):  # one cell: a string, a dict, a number, None, ...
            value = [value]
        captions = [item.get("raw") if isinstance(item, dict) else item for item in value]
        lists.append([caption if isinstance(caption, str) else "" for caption in captions])
    return {"captions": lists}


def _join_root(paths: list, root: str, column: str) -> dict[str, list]:
    # The returned column replaces the input column of the same name.
    return {column: [p if p is None or os.path.isabs(p) else os.path.join(root, p) for p in paths]}


def _merge_rows_of_the_same_image(dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    """Merge rows that hold the same image (one caption per row, as in a metadata CSV).

    Images stored as files are the same when their paths are; embedded images when their bytes
    are. Rows keep the order of each image's first appearance.
    """
    keys = dataset.map(
        _image_keys,
        input_columns="image",
        batched=True,
        remove_columns=dataset.column_names,
        desc=f"Finding repeated {split} images",
    )["_key"]
    first_row: dict[str, int] = {}
    captions_of: dict[str, list[str]] = {}
    all_captions = dataset["captions"]
    for row, (key, captions) in enumerate(zip(keys, all_captions)):
        key = key if key is not None else f"row {row}"  # a missing image is never merged
        first_row.setdefault(key, row)
        captions_of.setdefault(key, []).extend(captions)
    if len(first_row) == len(dataset):
        return dataset
    return (
        dataset.select(list(first_row.values()))
        .remove_columns("captions")
        .add_column("captions", list(captions_of.values()), feature=_CAPTIONS_FEATURE)
    )


def _image_keys(images: list) -> dict[str, list]:
    keys = []
    for image in images:
        if image is None:
            keys.append(None)
        elif image.get("bytes") is not None:
            keys.append("bytes:" + hashlib.sha1(image["bytes"]).hexdigest())
        else:
            keys.append("path:" + image["path"] if image.get("path") else None)
    return {"_key": keys}


# --- Dropping bad examples --------------------------------------------------------------------


def _drop_bad_examples(
    dataset: datasets.Dataset, split: str
) -> tuple[datasets.Dataset, list[tuple[str, str, str]], int]:
    """Strip captions, drop empty ones and skip images that are unusable or left uncaptioned.

    Returns:
        the cleaned split (``image`` cast back to a decoding ``Image()``), the skipped images as
        ``(split, path or name, reason)``, and the number of dropped captions.
    """
    # Output types given, so that a first batch without any caption cannot make them null.
    features = datasets.Features(
        {
            **dataset.features,
            "captions": _CAPTIONS_FEATURE,
            "_name": datasets.Value("string"),
            "_problem": datasets.Value("string"),
            "_dropped": datasets.Value("int64"),
        }
    )
    if "image_features" in dataset.column_names:
        checked = dataset.with_format(
            "numpy", columns=["image_features"], output_all_columns=True
        ).map(
            _check_features,
            input_columns=["image_features", "captions"],
            with_indices=True,
            batched=True,
            fn_kwargs={"split": split},
            features=features,
            desc=f"Checking {split} features",
        )
        checked = checked.with_format(None)
    else:
        checked = dataset.map(
            _check_images,
            input_columns=["image", "captions"],
            with_indices=True,
            batched=True,
            fn_kwargs={"split": split},
            features=features,
            desc=f"Checking {split} images",
        )
    report = checked.select_columns(["_name", "_problem", "_dropped"]).to_dict()
    problems = [
        (split, name, problem)
        for name, problem in zip(report["_name"], report["_problem"])
        if problem
    ]
    kept = checked.filter(
        _is_empty,
        input_columns="_problem",
        batched=True,
        desc=f"Skipping bad {split} examples",
    ).remove_columns(["_name", "_problem", "_dropped"])
    if "image" in kept.column_names:
        kept = kept.cast_column("image", datasets.Image())
    return kept, problems, sum(report["_dropped"])


def _check_images(images: list, captions: list, indices: list[int], split: str) -> dict[str, list]:
    """For a batch: cleaned captions, and why each image is unusable ("" when it is fine)."""
    out = _clean_captions(captions)
    out["_name"], out["_problem"] = [], []
    for image, kept, index in zip(images, out["captions"], indices):
        name = (image or {}).get("path") or f"{split}[{index}]"
        problem = ""
        try:
            load_image(image, name=name)  # decodes fully: catches corrupt and truncated files
        except ValueError as error:
            problem = str(error)
        if not problem and not kept:
            problem = "no caption left after dropping empty ones"
        out["_name"].append(name)
        out["_problem"].append(problem)
    return out


def _check_features(features, captions: list, indices: list[int], split: str) -> dict[str, list]:
    """For a batch of ``[R, D]`` feature arrays: cleaned captions and why each is unusable."""
    out = _clean_captions(captions)
    out["_name"], out["_problem"] = [], []
    for region_features, kept, index in zip(features, out["captions"], indices):
        problem = ""
        if region_features is None:
            problem = "no image features"
        elif not np.isfinite(np.asarray(region_features, dtype=np.float32)).all():
            problem = "image features contain NaN or infinite values"
        elif not kept:
            problem = "no caption left after dropping empty ones"
        out["_name"].append(f"{split}[{index}]")
        out["_problem"].append(problem)
    return out


def _clean_captions(captions: list[list[str]]) -> dict[str, list]:
    """Strip captions and drop empty ones; ``_dropped`` counts them per example."""
    cleaned = [[c.strip() for c in example if c and c.strip()] for example in captions]
    dropped = [len(example) - len(kept) for example, kept in zip(captions, cleaned)]
    return {"captions": cleaned, "_dropped": dropped}


def _is_empty(problems: list[str]) -> list[bool]:
    return [not problem for problem in problems]


# --- Small helpers ----------------------------------------------------------------------------


def _split_name(name: str) -> str:
    return SPLIT_NAMES.get(name.lower(), name)


def _ordered(names) -> list[str]:
    """train, validation, test first, then any other split names in their given order."""
    names = list(names)
    return [n for n in SPLIT_ORDER if n in names] + [n for n in names if n not in SPLIT_ORDER]


def _renaming(old: str, new: str) -> dict[str, str]:
    return {} if old == new else {old: new}


def _is_string_feature(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _is_numeric_array_feature(feature) -> bool:
    """Array2D, or a list of lists of numbers."""
    if isinstance(feature, (datasets.Array2D,)):
        return True
    inner = getattr(feature, "feature", None)
    inner = getattr(inner, "feature", None)
    return isinstance(inner, datasets.Value) and inner.dtype.startswith(("float", "int", "uint"))


def _float32_array_feature(dataset: datasets.Dataset, column: str) -> datasets.Array2D:
    """``Array2D`` float32 with the column's region-feature size (regions may vary in number)."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.Array2D):
        return datasets.Array2D(feature.shape, "float32")
    first = np.asarray(dataset[0][column], dtype=np.float32) if len(dataset) else np.zeros((0, 0))
    if first.ndim != 2:
        raise ValueError(f"column {column!r} must hold R x D region features; got {first.shape}")
    return datasets.Array2D((None, first.shape[1]), "float32")
