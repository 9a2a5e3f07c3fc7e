"""Turning an image–caption split into training batches.

A split (as :func:`hf_mvam.data.sources.load_image_caption_dataset` or
:func:`hf_mvam.data.synthetic.generate_synthetic_benchmark` return it) has one row per image and a
``captions`` list per row. Training pairs image ``i`` with one caption ``c``; a *pair index* numbers
every (image, caption) pair of the split, images in order, captions in order within an image.

- :class:`ImageCaptionPairs` — the map-style dataset of all pairs (pair index -> image + caption).
- :class:`CaptionPairSampler` — which pairs an epoch visits, in which order: every image once with
  one caption drawn per image (the default; a batch never holds the same image twice, so it has no
  false negatives), or every pair once (``all_pairs``). Deterministic from the seed and the epoch,
  so a resumed run sees exactly the batches it would have seen.
- :class:`ImageCaptionCollator` — runs the processor on a list of pairs (and on their hard
  negative captions, when asked).
- :func:`flatten_captions` — every caption of a split and the image each belongs to, for evaluation.
- :func:`stack_region_features` — precomputed ``[R, F]`` region features of a batch as ``[B, R, F]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = [
    "CaptionPairSampler",
    "ImageCaptionCollator",
    "ImageCaptionPairs",
    "check_region_counts",
    "flatten_captions",
    "stack_region_features",
]


def flatten_captions(split) -> tuple[list[str], torch.Tensor]:
    """Every caption of ``split`` and, for each, the index of its image.

    Returns:
        ``captions`` (``num_texts`` strings, image 0's captions first) and ``text_to_image``
        (``[num_texts]`` long tensor), the layout :func:`hf_mvam.metrics.retrieval_metrics` takes.
    """
    per_image = split["captions"]
    captions = [caption for image_captions in per_image for caption in image_captions]
    counts = torch.tensor([len(image_captions) for image_captions in per_image], dtype=torch.long)  # [N]
    return captions, torch.repeat_interleave(torch.arange(len(per_image)), counts)  # [num_texts]


def check_region_counts(counts) -> None:
    """Raise a clear error unless every image has the same number of regions.

    Precomputed features may hold a different number of regions per image (the loaders allow
    ``Array2D((None, F))``), but the model takes ``[B, R, F]``: one ``R`` for all images.

    Args:
        counts: the number of regions of each image (any iterable of ints).

    Raises:
        ValueError: more than one distinct count; the message lists them.
    """
    counts = sorted(set(counts))
    if len(counts) > 1:
        raise ValueError(
            f"precomputed image_features have different numbers of regions per image "
            f"({{{', '.join(map(str, counts))}}}): every image needs the same number of regions "
            "(pad or subsample them when preparing the data)"
        )


def stack_region_features(features) -> torch.Tensor:
    """The ``[R, F]`` region features of each image (numpy arrays or tensors) as one ``[B, R, F]``
    tensor, after :func:`check_region_counts`. A ``[B, R, F]`` tensor (what a torch-formatted
    dataset gives when every image has the same count) is returned as it is."""
    if isinstance(features, torch.Tensor):
        return features
    check_region_counts(len(image_features) for image_features in features)
    return torch.as_tensor(np.stack([np.asarray(image_features) for image_features in features]))  # [B, R, F]


class ImageCaptionPairs(Dataset):
    """All (image, caption) pairs of a split, as ``{"image" or "image_features": ..., "caption": str}``.

    Args:
        split: a ``datasets.Dataset`` with ``captions`` and ``image`` (anything the processor takes) or
            ``image_features`` (``[R, F]`` arrays) columns.
    """

    def __init__(self, split):
        self.image_column = "image_features" if "image_features" in split.column_names else "image"
        self.split = split.select_columns([self.image_column])
        if self.image_column == "image_features":
            self.split = self.split.with_format("numpy")
        self.captions, text_to_image = flatten_captions(split)
        self.pair_to_image = text_to_image.numpy()  # [num_pairs]
        self.captions_per_image = np.bincount(self.pair_to_image, minlength=len(split))  # [N]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch of pairs, reading the images of the batch in one call."""
        images = self.split[self.pair_to_image[indices].tolist()][self.image_column]
        return [{self.image_column: image, "caption": self.captions[i]} for image, i in zip(images, indices)]


class CaptionPairSampler(Sampler[int]):
    """The pair indices of one epoch, shuffled with a generator seeded by ``(seed, epoch)``.

    Every process of a distributed run iterates the same order (accelerate then hands each process
    its own batches), and a run resumed in the middle of an epoch sees the same order again. Call
    :meth:`set_epoch` before iterating.

    Args:
        captions_per_image: ``[N]`` number of captions of each image (every entry >= 1).
        seed: the run's seed.
        all_pairs: visit every (image, caption) pair once per epoch, instead of every image once
            with one of its captions drawn at random.
    """

    def __init__(self, captions_per_image: np.ndarray, seed: int, all_pairs: bool = False):
        self.captions_per_image = np.asarray(captions_per_image, dtype=np.int64)  # [N]
        self.first_pair = np.cumsum(self.captions_per_image) - self.captions_per_image  # [N]
        self.seed = seed
        self.all_pairs = all_pairs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.captions_per_image.sum()) if self.all_pairs else len(self.captions_per_image)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self))  # [len]
        if not self.all_pairs:
            # One caption per image, drawn for every image at once: [N] -> pair index of image `order[k]`.
            chosen_caption = rng.integers(0, self.captions_per_image)  # [N]
            order = self.first_pair[order] + chosen_caption[order]
        return iter(order.tolist())


class ImageCaptionCollator:
    """Processes a list of pairs into a model batch: ``input_ids``, ``attention_mask`` and
    ``pixel_values`` [B, 3, S, S] (or ``image_features`` [B, R, F] for precomputed features), and
    with ``hard_negatives`` also ``negative_input_ids`` / ``negative_attention_mask`` [B, L']: the
    hard negative caption of each pair (row b belongs to image b).

    Args:
        processor: an [`MVAMProcessor`] or [`UARDAProcessor`].
        hard_negatives: a :class:`~hf_mvam.data.hard_negatives.HardNegativeGenerator`, or ``None``.
    """

    def __init__(self, processor, hard_negatives=None):
        self.processor = processor
        self.hard_negatives = hard_negatives

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        captions = [pair["caption"] for pair in pairs]
        if "image_features" in pairs[0]:
            batch = dict(self.processor(text=captions, return_tensors="pt"))
            batch["image_features"] = stack_region_features([pair["image_features"] for pair in pairs])  # [B, R, F]
        else:
            batch = dict(self.processor(text=captions, images=[pair["image"] for pair in pairs], return_tensors="pt"))
        if self.hard_negatives is not None:
            negatives = self.processor(text=[self.hard_negatives(caption) for caption in captions], return_tensors="pt")
            batch["negative_input_ids"] = negatives["input_ids"]
            batch["negative_attention_mask"] = negatives["attention_mask"]
        return batch
