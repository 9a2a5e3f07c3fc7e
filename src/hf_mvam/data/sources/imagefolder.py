"""Image folders with a ``metadata.jsonl`` / ``.csv`` / ``.parquet`` file (at the top or in split
subfolders), read with ``load_dataset("imagefolder", data_dir=...)``."""

from __future__ import annotations

import glob
import os

import datasets

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def has_metadata_file(folder: str) -> bool:
    """A ``metadata.*`` file at the top of ``folder`` or in one of its split subfolders."""
    for name in METADATA_FILES:
        if os.path.isfile(os.path.join(folder, name)) or glob.glob(os.path.join(folder, "*", name)):
            return True
    return False


def load_imagefolder(folder: str) -> datasets.DatasetDict:
    return datasets.load_dataset("imagefolder", data_dir=folder)
