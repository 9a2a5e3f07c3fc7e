"""The common format every loader produces (``image`` or ``image_features``, and ``captions``),
split names, and the conversion of a loaded ``DatasetDict`` with arbitrary columns into it."""

from __future__ import annotations

import codecs
import hashlib

import datasets
import numpy as np

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

CAPTIONS_FEATURE = datasets.List(datasets.Value("string"))


def as_dataset_dict(loaded: datasets.Dataset | datasets.DatasetDict) -> datasets.DatasetDict:
    """A single ``Dataset`` becomes the ``train`` split (a ``split`` column may re-split it)."""
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"expected a Dataset or DatasetDict, got {type(loaded).__name__}")
    return loaded


def to_common_columns(
    raw: datasets.DatasetDict, image_column: str | None, caption_column: str | None
) -> datasets.DatasetDict:
    """Rename, re-split and convert a loaded ``DatasetDict`` to ``image``/``captions`` columns."""
    first = next(iter(raw.values()))
    if "split" in first.column_names and "split" not in (image_column, caption_column):
        raw = _split_by_column(raw, "split")
    else:
        raw = _normalise_split_names(raw)
    return datasets.DatasetDict(
        {
            split: _common_columns(dataset, split, image_column, caption_column)
            for split, dataset in raw.items()
        }
    )


def _split_by_column(raw: datasets.DatasetDict, column: str) -> datasets.DatasetDict:
    """Turn the values of a ``split`` column (train/restval/val/test, ...) into splits."""
    whole = datasets.concatenate_datasets(list(raw.values()))
    by_name: dict[str, list] = {}
    for value in whole.unique(column):
        by_name.setdefault(split_name(str(value)), []).append(value)
    return datasets.DatasetDict(
        {
            name: whole.filter(
                _value_in,
                fn_kwargs={"values": by_name[name]},
                input_columns=column,
                batched=True,
                desc=f"Selecting the {name} split",
            ).remove_columns(column)
            for name in ordered_splits(by_name)
        }
    )


def _value_in(column: list, values: list) -> list[bool]:
    return [value in values for value in column]


def _normalise_split_names(raw: datasets.DatasetDict) -> datasets.DatasetDict:
    """Rename splits (val -> validation, ...), concatenating those that map to the same name."""
    by_name: dict[str, list[datasets.Dataset]] = {}
    for split, dataset in raw.items():
        by_name.setdefault(split_name(split), []).append(dataset)
    return datasets.DatasetDict(
        {
            name: by_name[name][0]
            if len(by_name[name]) == 1
            else datasets.concatenate_datasets(by_name[name])
            for name in ordered_splits(by_name)
        }
    )


def _common_columns(
    dataset: datasets.Dataset, split: str, image_column: str | None, caption_column: str | None
) -> datasets.Dataset:
    """One split as ``image`` (``Image(decode=False)``) or ``image_features``, and ``captions``.

    Captions are raw lists here (not yet stripped or filtered); rows of the same image file with
    one caption each are merged. File paths stay as written: the cleaning step resolves them
    against the data root.
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
        features=datasets.Features({image_column: image_feature, "captions": CAPTIONS_FEATURE}),
        desc=f"Reading {split} captions",
    )
    if isinstance(image_feature, datasets.Image) or _is_string_feature(image_feature):  # or file paths
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
        .add_column("captions", list(captions_of.values()), feature=CAPTIONS_FEATURE)
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


# --- Small helpers ----------------------------------------------------------------------------


def check_utf8(path: str) -> None:
    """Raise a one-line ValueError naming ``path`` unless it is UTF-8 text (read in 1 MiB chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as file:
        while True:
            chunk = file.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:  # error.object: bytes held from before + chunk
                position = offset - (len(error.object) - len(chunk)) + error.start
                raise ValueError(
                    f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                    f"{position}): save it as UTF-8"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def split_name(name: str) -> str:
    return SPLIT_NAMES.get(name.lower(), name)


def ordered_splits(names) -> list[str]:
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
