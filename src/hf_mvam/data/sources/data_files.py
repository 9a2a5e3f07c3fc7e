"""Any other folder of data files ``datasets`` can read (parquet, csv, json, ...), and Hub dataset
ids."""

from __future__ import annotations

import os

import datasets
import huggingface_hub

from .common import as_dataset_dict, check_utf8
from .imagefolder import METADATA_FILES

# A string ending like this is a local file, never a Hub id.
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".npy", ".txt", ".tsv")
# Data files read as text, which must be UTF-8.
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")


def looks_like_local_path(data: str) -> bool:
    """True for strings that cannot be a Hub id (``owner/name`` or ``name``)."""
    return (
        os.path.isabs(data)
        or data.startswith((".", "~"))
        or "\\" in data
        or data.count("/") > 1
        or data.lower().endswith(LOCAL_SUFFIXES)
    )


def load_data_files(folder: str) -> datasets.DatasetDict:
    """A folder in none of our layouts: let ``datasets`` infer its format (parquet, csv, ...)."""
    for directory, _, names in os.walk(folder):
        for name in sorted(names):
            if name.lower().endswith(TEXT_SUFFIXES):
                check_utf8(os.path.join(directory, name))
    try:
        return as_dataset_dict(datasets.load_dataset(folder))
    except Exception as error:  # datasets raises many kinds here; add what we looked for
        raise ValueError(
            f"cannot read the folder {folder}: it is not a save_to_disk folder (dataset_dict.json "
            f"or state.json), an image folder with one of {', '.join(METADATA_FILES)}, a SCAN "
            "folder ({split}_ims.npy + {split}_caps.txt), nor data files datasets can read "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from error


def load_hub(dataset_id: str) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as error:  # not found, gated, offline, network and HTTP errors alike
        raise ValueError(
            f"cannot load the Hub dataset {dataset_id!r} ({type(error).__name__}: {_first_line(error)})"
        ) from error
    return as_dataset_dict(loaded)


def hub_download_folders() -> tuple[str, ...]:
    """Where ``load_dataset`` puts a Hub dataset's files: image paths may point there."""
    return (datasets.config.HF_DATASETS_CACHE, huggingface_hub.constants.HF_HUB_CACHE)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
