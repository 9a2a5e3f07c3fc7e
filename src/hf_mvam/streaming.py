"""Training on data too large to load: ``--streaming`` reads a Hub dataset or a local folder of
data files (an image folder with ``metadata.*``, parquet, ...) with
``datasets.load_dataset(..., streaming=True)``, so the training split is never whole in memory or
on disk.

- :func:`load_streaming_splits` -- the streamed training pairs (:class:`StreamedPairs`) and the
  evaluation splits, which retrieval needs whole (every image against every caption): they are
  read from the stream into memory, up to ``max_eval_samples`` images each.
- :class:`StreamedPairs` -- one ``{"image", "caption"}`` pair per image per step: the stream is
  shuffled in a buffer (seeded by the seed and the epoch) and one of each image's captions is
  drawn. A mode that needs the whole split (every pair of an epoch: ``--all_pairs``) is refused
  by the arguments.

Image paths are read as those loaders read them: relative to the data folder, and refused
(skipped unread, with a warning) when they resolve outside it (for a Hub dataset: outside the
download caches), unless ``allow_paths_outside_data_root``. Unreadable images and images without
a caption are skipped with a warning, as the loaders of :mod:`hf_mvam.data.sources` skip them.
"""

from __future__ import annotations

import logging
import os

import datasets
import numpy as np
import torch

from .data.sources import CAPTION_COLUMNS, OUTSIDE_DATA_ROOT
from .data.sources.data_files import hub_download_folders
from .data.sources.paths import DataRoot
from .image_loading import load_image

__all__ = ["SHUFFLE_BUFFER_SIZE", "StreamedPairs", "load_streaming_splits"]

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER_SIZE = 1_000  # examples held for shuffling (datasets' default)
_SPLIT_NAMES = {"val": "validation", "valid": "validation", "dev": "validation"}
_SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")


def load_streaming_splits(
    data: str,
    image_column: str | None = None,
    caption_column: str | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    allow_paths_outside_data_root: bool = False,
):
    """Stream ``data`` (a Hub dataset id or a folder of data files).

    ``allow_paths_outside_data_root``: read image files wherever the data's paths point (by
    default a path that leaves the data folder, or a Hub dataset's download caches, is skipped).

    Returns:
        ``(train, evaluation)``: the :class:`StreamedPairs` of the ``train`` split, and a dict of
        the ``validation``/``test`` splits it has, each a ``datasets.Dataset`` with ``image`` and
        ``captions`` columns (the loaders' common format).

    Raises:
        ValueError: data ``--streaming`` cannot read (a file, a ``save_to_disk`` folder), a stream
            without a ``train`` split, or without an image or caption column.
    """
    if os.path.isfile(data):
        raise ValueError(f"--streaming reads a Hub dataset or a folder of data files, not the file {data}; drop --streaming")
    if os.path.isdir(data) and any(os.path.isfile(os.path.join(data, name)) for name in _SAVED_DATASET_FILES):
        raise ValueError(f"{data} is a save_to_disk folder, which is memory-mapped already: drop --streaming")
    local = os.path.isdir(data)
    root = DataRoot(data if local else None, () if local else hub_download_folders(),
                    allow_outside=allow_paths_outside_data_root)
    stream = datasets.load_dataset(data, streaming=True)
    if isinstance(stream, datasets.IterableDataset):
        stream = datasets.IterableDatasetDict({"train": stream})
    splits = {_SPLIT_NAMES.get(name, name): split for name, split in stream.items()}
    if "train" not in splits:
        raise ValueError(f"the streamed data has no train split (it has {sorted(splits)})")
    image, caption = _columns(splits["train"], image_column, caption_column)
    train = splits["train"] if max_train_samples is None else splits["train"].take(max_train_samples)
    evaluation = {
        name: _read_whole(splits[name], name, image, caption, max_eval_samples, root)
        for name in ("validation", "test") if name in splits
    }
    return StreamedPairs(train, image, caption, seed, root), evaluation


class StreamedPairs(torch.utils.data.IterableDataset):
    """``{"image": PIL image, "caption": str}`` pairs from a streamed split: one caption drawn per
    image, in an order shuffled by ``(seed, epoch)`` (call :meth:`set_epoch`), so that the same
    seed gives the same pairs. DataLoader workers each read their own shards of the stream.
    Image paths are read only inside ``root``."""

    def __init__(self, stream: datasets.IterableDataset, image_column: str, caption_column: str, seed: int,
                 root: DataRoot):
        self.stream = _undecoded(stream, image_column)
        self.image_column, self.caption_column, self.seed, self.root = image_column, caption_column, seed, root
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        stream = self.stream.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER_SIZE)
        stream.set_epoch(self.epoch)
        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, worker.id if worker else 0])
        for row in stream:
            example = _usable(row, self.image_column, self.caption_column, self.root)
            if example is not None:
                image, captions = example
                yield {"image": image, "caption": captions[int(rng.integers(len(captions)))]}


def _columns(split: datasets.IterableDataset, image_column: str | None, caption_column: str | None) -> tuple[str, str]:
    """The image column (given, else ``image``, else the first ``datasets.Image`` column) and the
    caption column (given, else the first of :data:`CAPTION_COLUMNS`)."""
    features = split.features or {}
    names = list(features) or list(next(iter(split.take(1)), {}))
    image = image_column or ("image" if "image" in names else next(
        (name for name, feature in features.items() if isinstance(feature, datasets.Image)), None))
    caption = caption_column or next((name for name in CAPTION_COLUMNS if name in names and name != image), None)
    for kind, found, given in (("image", image, image_column), ("caption", caption, caption_column)):
        if found is None or found not in names:
            what = f"{kind} column {given!r} not found" if given else f"no {kind} column found"
            raise ValueError(f"the streamed data: {what}; its columns are {names}. Pass --{kind}_column")
    return image, caption


def _undecoded(split: datasets.IterableDataset, image_column: str) -> datasets.IterableDataset:
    """``split`` with an ``Image`` column left undecoded (``load_image`` decodes it). A stream of
    CSV or JSON files has no features before it is read: its column holds plain values (paths)."""
    if split.features is not None and isinstance(split.features.get(image_column), datasets.Image):
        return split.cast_column(image_column, datasets.Image(decode=False))
    return split


def _usable(row: dict, image_column: str, caption_column: str, root: DataRoot):
    """``(RGB image, non-empty captions)`` of a row, or ``None`` (with a warning) when it has none.
    An image stored as a path is read only when it resolves inside ``root``."""
    value = row[caption_column]
    captions = [c.strip() for c in (value if isinstance(value, list) else [value]) if isinstance(c, str) and c.strip()]
    image = row[image_column]
    if isinstance(image, str):  # a path column
        image = {"bytes": None, "path": image}
    name = image.get("path") if isinstance(image, dict) else None
    if name and not image.get("bytes"):
        name, real = root.locate(name)
        if real is None:
            logger.warning(f"skipped a streamed image: {name}: {OUTSIDE_DATA_ROOT}")
            return None
        image = real
    try:
        image = load_image(image, name=name)
    except ValueError as error:
        logger.warning(f"skipped a streamed image: {error}")
        return None
    if not captions:
        logger.warning(f"skipped a streamed image without a caption: {name or '(no path)'}")
        return None
    return image, captions


def _read_whole(split: datasets.IterableDataset, name: str, image_column: str, caption_column: str,
                max_samples: int | None, root: DataRoot) -> datasets.Dataset:
    """An evaluation split read from the stream into memory (its first ``max_samples`` images)."""
    split = _undecoded(split, image_column)
    if max_samples is not None:
        split = split.take(max_samples)
    images, captions = [], []
    for row in split:
        example = _usable(row, image_column, caption_column, root)
        if example is not None:
            images.append(example[0])
            captions.append(example[1])
    logger.info(f"read the streamed {name} split into memory: {len(images)} images")
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": images, "captions": captions}, features=features)
