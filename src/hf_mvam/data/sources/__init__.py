"""Loading a user's image–caption data into one common format, through ``datasets``.

:func:`load_image_caption_dataset` accepts, tried in this order (one module each):

1. a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``saved``);
2. an image folder with ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet`` (at the top
   or in split subfolders), in ``load_dataset("imagefolder")``'s layout (``imagefolder``);
3. a Karpathy split JSON file (``dataset_flickr30k.json``, ``dataset_coco.json``) with the images
   under ``image_root`` (``karpathy``);
4. a folder in SCAN's precomputed-feature layout: ``{split}_ims.npy`` (N x R x D region features)
   and ``{split}_caps.txt`` (captions, one per line, the same number per image, consecutive)
   (``scan``);
5. any other folder of data files ``datasets`` can read, or a Hub dataset id (``data_files``).

Every split comes out with the columns

``image``           ``datasets.Image(decode=False)``: ``{"bytes", "path"}`` dicts, decoded by
                    :func:`hf_mvam.image_loading.load_image` where they are used (the processor,
                    the collator, the figures), never by ``datasets``; or for precomputed features
``image_features``  ``Array2D((R, D), "float32")`` region features of one image, and
``captions``        list of non-empty, stripped strings (one or more per image).

Bad data never stops loading: images whose path leaves the data root (``paths``), unreadable or
missing images, images with NaN/inf features and images left without any caption are skipped,
empty captions are dropped, and all of it is reported in the statistics dictionary returned
beside the data, for the caller to log (:func:`data_warnings` phrases it). Data that cannot be
read at all (a file that is not UTF-8, an empty ``.npy``, an unreachable Hub id, splits of
different feature widths) raises a one-line ``ValueError`` before anything is trained.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

from .cleaning import drop_bad_examples
from .common import CAPTION_COLUMNS, SPLIT_ORDER, to_common_columns
from .data_files import hub_download_folders, load_data_files, load_hub, looks_like_local_path
from .imagefolder import has_metadata_file, load_imagefolder
from .karpathy import load_karpathy
from .paths import OUTSIDE_DATA_ROOT, DataRoot
from .saved import is_saved_dataset, load_saved
from .scan import load_scan, scan_splits

__all__ = ["CAPTION_COLUMNS", "OUTSIDE_DATA_ROOT", "data_warnings", "load_image_caption_dataset"]


def load_image_caption_dataset(
    data: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    allow_paths_outside_data_root: bool = False,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Load image–caption data from a local folder or file, or from the Hub.

    Args:
        data: a ``save_to_disk`` folder, an image folder with ``metadata.*``, a Karpathy split
            JSON file, a SCAN precomputed-feature folder, another folder of data files, or a Hub
            dataset id (see the module docstring for the order of detection).
        image_root: folder holding the images named in a Karpathy JSON (required there); for
            datasets whose images are file paths, the folder relative paths are relative to
            (by default the folder of ``data``). It is also the data root.
        image_column: the image column of a saved, image-folder or Hub dataset (ignored for
            Karpathy and SCAN files); by default ``image``, else the first column with the
            ``Image`` feature, else ``image_features``. It may hold images, file paths or
            R x D region features.
        caption_column: the caption column of a saved or Hub dataset; by default the first of
            ``caption``, ``captions``, ``sentences``, ``raw``, ``text``. It may hold one string
            (rows of the same image file are then merged) or a list of strings per row.
        allow_paths_outside_data_root: read image files wherever their paths point. By default
            a path is resolved (``os.path.realpath``, so symlinks count where they lead) and
            refused before it is read unless it lies inside the data root: ``image_root`` when
            given, else the folder of ``data`` (for a Hub id, the caches ``datasets`` downloads
            to). A refused image is skipped with the reason "outside the data root".

    Returns:
        ``(splits, stats)``. ``splits`` is a ``DatasetDict`` of the splits found, ordered
        ``train``, ``validation``, ``test``, then any others (train/restval -> train,
        val/dev -> validation; a ``split`` column is turned into separate splits; a single
        unsplit dataset is ``train``), each with the columns ``image`` (or ``image_features``)
        and ``captions``. ``stats`` holds:

        - ``source``: which loader was used (``load_from_disk``, ``imagefolder``,
          ``karpathy_json``, ``scan_precomputed``, ``data_files`` or ``hub``);
        - ``num_images`` and ``num_captions``: per split, what was kept;
        - ``skipped_images``: ``(split, path or name, reason)`` of every image left out;
        - ``skipped_captions``: how many empty captions were dropped;
        - ``unknown_splits``: split names other than train, validation and test, which are kept
          but which training and evaluation do not use;
        - ``duplicate_images``: ``(split, path or name, path or name of the first copy)`` of every
          image whose encoded bytes equal an earlier image's of the same split (kept: they count
          as two images, and in one batch one is the other's false negative);
        - ``train_eval_overlap``: ``(train path or name, split, path or name)`` of every image of
          ``train`` whose bytes are also an image of ``validation`` or ``test`` (kept: the
          evaluation then measures memorisation).

        Image comparisons use the sha256 of the encoded bytes, so they find identical files,
        not re-encoded copies; precomputed features are not compared.

    Raises:
        FileNotFoundError: ``data`` looks like a local path but does not exist, or ``image_root``
            does not exist.
        ValueError: the data has no usable image or caption column (the message names the
            available columns), a Karpathy JSON without ``image_root``, a metadata, JSON or
            caption file that is not UTF-8, an empty or unreadable ``.npy`` file, SCAN captions
            that do not divide evenly among the images, splits whose feature widths differ, a
            Hub id that cannot be loaded, or a file/folder of an unsupported kind.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(data)))
    if image_root is not None:
        image_root = os.path.abspath(os.path.expanduser(os.fspath(image_root)))
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"image_root {image_root} is not an existing folder")
    skipped_images: list[tuple[str, str, str]] = []  # filled by loaders that skip entries early

    # 1. Detect the kind of source and read it.
    root_folder, hub_folders = image_root or os.path.dirname(path), ()
    if os.path.isdir(path):
        root_folder = image_root or path
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
        source, raw = "hub", load_hub(os.fspath(data))
        root_folder, hub_folders = image_root, () if image_root else hub_download_folders()
    root = DataRoot(root_folder, hub_folders, allow_outside=allow_paths_outside_data_root)

    # 2. Bring it to the common columns, and refuse splits that cannot be used together.
    if source not in ("karpathy_json", "scan_precomputed"):  # these are built in the common format
        raw = to_common_columns(raw, image_column, caption_column)
    _check_splits_agree(raw)

    # 3. Clean every split, then compare the images that are left.
    splits: dict[str, datasets.Dataset] = {}
    hashes: dict[str, list[tuple[str, str]]] = {}
    skipped_captions = 0
    for split, dataset in raw.items():
        dataset, problems, dropped, hashes[split] = drop_bad_examples(dataset, split, root)
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
        "unknown_splits": [split for split in splits if split not in SPLIT_ORDER],
        "duplicate_images": _duplicates(hashes),
        "train_eval_overlap": _train_eval_overlap(hashes),
    }
    return datasets.DatasetDict(splits), stats


def data_warnings(stats: dict[str, Any], max_listed: int = 5) -> list[str]:
    """One warning line per kind of problem the statistics of :func:`load_image_caption_dataset`
    record, naming its first ``max_listed`` cases (for a training script's log)."""

    def listed(cases: list[str]) -> str:
        more = len(cases) - max_listed
        return "; ".join(cases[:max_listed]) + (f"; ... ({more} more)" if more > 0 else "")

    lines = []
    if skipped := stats["skipped_images"]:
        lines.append(
            f"skipped {len(skipped)} unusable image(s): "
            + listed([f"[{split}] {name}: {reason}" for split, name, reason in skipped])
        )
    if stats["skipped_captions"]:
        lines.append(f"dropped {stats['skipped_captions']} empty caption(s)")
    if stats["unknown_splits"]:
        lines.append(
            f"split(s) {', '.join(stats['unknown_splits'])} are not train, validation or test: "
            "kept, but training and evaluation do not use them"
        )
    if duplicates := stats["duplicate_images"]:
        lines.append(
            f"{len(duplicates)} image(s) repeat an earlier image of their split (same bytes; each "
            "copy counts as an image): "
            + listed([f"[{split}] {name} = {first}" for split, name, first in duplicates])
        )
    if overlap := stats["train_eval_overlap"]:
        lines.append(
            f"{len(overlap)} train image(s) are also in an evaluation split (same bytes): "
            + listed([f"{name} = [{split}] {other}" for name, split, other in overlap])
        )
    return lines


def _check_splits_agree(raw: datasets.DatasetDict) -> None:
    """Every split holds images, or every split region features of one width D."""
    kinds = {split: "image_features" if "image_features" in d.column_names else "image" for split, d in raw.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            "some splits hold images and others precomputed image_features ("
            + ", ".join(f"{split}: {kind}" for split, kind in kinds.items())
            + "): every split needs the same kind"
        )
    widths = {
        split: dataset.features["image_features"].shape[1]
        for split, dataset in raw.items()
        if "image_features" in dataset.column_names
    }
    if len(set(widths.values())) > 1:
        raise ValueError(
            "the splits' image_features widths differ ("
            + ", ".join(f"{split}: {width}" for split, width in widths.items())
            + "): every split needs region features of the same size D"
        )


def _duplicates(hashes: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str, str]]:
    found = []
    for split, named in hashes.items():
        first: dict[str, str] = {}
        for name, digest in named:
            if digest in first:
                found.append((split, name, first[digest]))
            else:
                first[digest] = name
    return found


def _train_eval_overlap(hashes: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str, str]]:
    evaluated = {
        digest: (split, name)
        for split in ("validation", "test")
        for name, digest in reversed(hashes.get(split, []))  # the first of equal images wins
    }
    return [(name, *evaluated[digest]) for name, digest in hashes.get("train", []) if digest in evaluated]
