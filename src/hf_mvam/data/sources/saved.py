"""Folders written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""

from __future__ import annotations

import os

import datasets

from .common import as_dataset_dict


def is_saved_dataset(folder: str) -> bool:
    return any(
        os.path.isfile(os.path.join(folder, name)) for name in ("dataset_dict.json", "state.json")
    )


def load_saved(folder: str) -> datasets.DatasetDict:
    return as_dataset_dict(datasets.load_from_disk(folder))
