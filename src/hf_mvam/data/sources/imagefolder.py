"""Image folders with a ``metadata.jsonl`` / ``.csv`` / ``.parquet`` file at the top or in split
subfolders, in the layout of ``load_dataset("imagefolder")``: each row names its image in a
``file_name`` column, relative to the metadata file's folder.

Read here rather than by ``datasets``' imagefolder builder, which fails the whole load on one
``file_name`` that leaves the folder: such an image is skipped (and counted) like any other
unusable image, by the cleaning step's data-root check.
"""

from __future__ import annotations

import glob
import os

import datasets

from .common import check_utf8

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_READERS = {".jsonl": datasets.Dataset.from_json, ".csv": datasets.Dataset.from_csv, ".parquet": datasets.Dataset.from_parquet}


def metadata_files(folder: str) -> list[str]:
    """The ``metadata.*`` files at the top of ``folder`` and in its subfolders, in sorted order."""
    found = []
    for name in METADATA_FILES:
        found += [os.path.join(folder, name)] if os.path.isfile(os.path.join(folder, name)) else []
        found += sorted(glob.glob(os.path.join(glob.escape(folder), "*", name)))
    return found


def has_metadata_file(folder: str) -> bool:
    return bool(metadata_files(folder))


def load_imagefolder(folder: str) -> datasets.DatasetDict:
    """One split per metadata file's folder: the top level is ``train`` (a ``split`` column may
    re-split it), a subfolder is the split it names. The ``file_name`` column becomes ``image``,
    paths joined to the metadata file's folder."""
    by_split: dict[str, list[datasets.Dataset]] = {}
    for path in metadata_files(folder):
        directory = os.path.dirname(path)
        split = "train" if os.path.samefile(directory, folder) else os.path.basename(directory)
        by_split.setdefault(split, []).append(_read_metadata(path))
    return datasets.DatasetDict(
        {
            split: parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            for split, parts in by_split.items()
        }
    )


def _read_metadata(path: str) -> datasets.Dataset:
    extension = os.path.splitext(path)[1]
    if extension != ".parquet":
        check_utf8(path)
    try:
        table = _READERS[extension](path)
    except Exception as error:  # pyarrow, pandas and json errors alike
        raise ValueError(f"cannot read {path}: {type(error).__name__}: {error}") from error
    if "file_name" not in table.column_names:
        raise ValueError(f"{path} has no file_name column (the image of each row); columns: {table.column_names}")
    if "image" in table.column_names:
        raise ValueError(f"{path} has both a file_name and an image column: which one names the image?")
    return table.map(
        _joined_file_names,
        input_columns="file_name",
        fn_kwargs={"directory": os.path.dirname(path)},
        batched=True,
        remove_columns="file_name",
        desc=f"Reading {os.path.basename(path)}",
    )


def _joined_file_names(names: list, directory: str) -> dict[str, list]:
    return {"image": [None if name is None else os.path.join(directory, str(name)) for name in names]}
