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

``image``           ``datasets.Image(decode=False)``: ``{"bytes", "path"}`` dicts, decoded by
                    :func:`hf_mvam.image_loading.load_image` where they are used (the processor,
                    the collator, the figures), never by ``datasets``; or for precomputed features
``image_features``  ``Array2D((R, D), "float32")`` region features of one image, and
``captions``        list of non-empty, stripped strings (one or more per image).

Bad data never stops loading: unreadable or missing images, images with NaN/inf features and
images left without any caption are skipped, empty captions are dropped, and all of it is
reported in the statistics dictionary returned beside the data, for the caller to log.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

from .cleaning import drop_bad_examples
from .common import CAPTION_COLUMNS, to_common_columns
from .data_files import load_data_files, load_hub, looks_like_local_path
from .imagefolder import has_metadata_file, load_imagefolder
from .karpathy import load_karpathy
from .saved import is_saved_dataset, load_saved
from .scan import load_scan, scan_splits

__all__ = ["CAPTION_COLUMNS", "load_image_caption_dataset"]


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
        if is_saved_dataset(path):
            source, raw = "load_from_disk", load_saved(path)
        elif has_metadata_file(path):
            source, raw = "imagefolder", load_imagefolder(path)
        elif found_scan_splits := scan_splits(path):
            source, raw = "scan_precomputed", load_scan(path, found_scan_splits)
        else:
            source, raw = "data_files", load_data_files(path)
    elif os.path.isfile(path):
        if not path.lower().endswith(".json"):
            raise ValueError(
                f"unsupported file {path}: expected a Karpathy split JSON file (.json), or a folder"
            )
        source, raw = "karpathy_json", load_karpathy(path, image_root, skipped_images)
    elif looks_like_local_path(os.fspath(data)):
        raise FileNotFoundError(
            f"{os.fspath(data)} does not exist (it looks like a local path, so it was not looked "
            "up on the Hub)"
        )
    else:
        source, raw = "hub", load_hub(path)

    if source not in ("karpathy_json", "scan_precomputed"):  # these are built in the common format
        raw = to_common_columns(raw, image_column, caption_column, image_root)

    splits: dict[str, datasets.Dataset] = {}
    skipped_captions = 0
    for split, dataset in raw.items():
        dataset, problems, dropped = drop_bad_examples(dataset, split)
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
