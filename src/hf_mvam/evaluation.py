"""Retrieval evaluation of any hf-mvam model on an image–caption split.

Shared by ``training/run.py``, ``training/check_folder.py`` and the benchmarks. Every image and
every caption of the split is encoded once (in batches, without gradients), the full
``[num_images, num_texts]`` score matrix is computed, and the metrics follow the field's protocol
(see ``hf_mvam.metrics``): Recall@1/5/10 in both directions, rSum, the COCO 5-fold 1K numbers when
the split has 5,000 images, and the minimal-pair accuracy when the split has ``variant_of`` /
``changed`` columns (the synthetic benchmark).

The model is used only through the retrieval contract every hf-mvam model implements (also when
loaded with ``AutoModel.from_pretrained(..., trust_remote_code=True)``):
``encode_images(pixel_values=... | image_features=...)``, ``encode_texts(input_ids,
attention_mask)`` and ``score(image_encoding, text_encoding)``. What an encoding holds is the
model's business: a ``ModelOutput`` of batch-first tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

from .data.collate import check_region_counts, flatten_captions, stack_region_features
from .metrics import minimal_pair_accuracy, retrieval_metrics

__all__ = ["EncodedSplit", "concatenate_encodings", "encode_split", "evaluate_split", "score_split"]


@dataclass
class EncodedSplit:
    """Every image and caption of a split, encoded.

    Attributes:
        images: the model's encoding of every image (``encode_images``).
        texts: the model's encoding of every caption (``encode_texts``).
        text_to_image: ``[N_t]`` index of each caption's image.
    """

    images: ModelOutput
    texts: ModelOutput
    text_to_image: torch.Tensor


def concatenate_encodings(encodings: list[ModelOutput]) -> ModelOutput:
    """Encodings of consecutive batches as one: every tensor field concatenated along the batch
    dimension. Batches of captions differ in length: a field whose second dimension differs
    between batches is padded with zeros there (zero marks padding in masks). Other fields (e.g.
    a grid size) are taken from the first batch."""
    first = encodings[0]
    fields = {}
    for key, value in first.items():
        if not isinstance(value, torch.Tensor):
            fields[key] = value
            continue
        parts = [encoding[key] for encoding in encodings]
        if value.dim() >= 2:
            length = max(part.shape[1] for part in parts)
            # pad dim 1 of [b, L_b, ...] to [b, L, ...]: F.pad's pairs run from the last dimension
            parts = [F.pad(part, (0, 0) * (part.dim() - 2) + (0, length - part.shape[1])) for part in parts]
        fields[key] = torch.cat(parts)
    return type(first)(**fields)


@contextmanager
def _eval_mode(model):
    """Run a block with ``model`` in eval mode (no dropout; UARDA's retrieval scoring), then
    restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def encode_split(model, processor, split, batch_size: int = 256, progress: bool = False) -> EncodedSplit:
    """Encode every image (``image`` or ``image_features`` column) and every caption of ``split``.

    Args:
        model: an hf-mvam model (run in eval mode; its mode is restored afterwards).
        processor: the model's processor.
        split: a ``datasets.Dataset`` with ``captions`` and ``image`` or ``image_features``.
        batch_size: images or captions per forward pass.
        progress: show tqdm bars.
    """
    device = next(model.parameters()).device
    with _eval_mode(model):
        captions, text_to_image = flatten_captions(split)
        image_column = "image_features" if "image_features" in split.column_names else "image"
        images = split.select_columns([image_column])
        if image_column == "image_features":
            images = images.with_format("torch")

        image_batches, region_counts = [], set()
        for start in tqdm(range(0, len(images), batch_size), desc="encoding images", disable=not progress):
            chunk = images[start : start + batch_size][image_column]
            if image_column == "image_features":
                features = stack_region_features(chunk)  # [b, R, F]
                region_counts.add(features.shape[1])
                check_region_counts(region_counts)  # batches are concatenated: one R for all
                inputs = {"image_features": features.to(device)}
            else:
                inputs = {"pixel_values": processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)}
            image_batches.append(model.encode_images(**inputs))

        text_batches = []
        for start in tqdm(range(0, len(captions), batch_size), desc="encoding captions", disable=not progress):
            tokens = processor(text=captions[start : start + batch_size], return_tensors="pt").to(device)
            text_batches.append(model.encode_texts(tokens["input_ids"], tokens["attention_mask"]))
        return EncodedSplit(concatenate_encodings(image_batches), concatenate_encodings(text_batches), text_to_image)


@torch.no_grad()
def score_split(model, encoded: EncodedSplit, progress: bool = False) -> torch.Tensor:
    """The ``[N_i, N_t]`` score matrix of an encoded split (float32, on the CPU), scored in eval
    mode (UARDA: its retrieval form, where skipped word queries are not computed)."""
    with _eval_mode(model):
        scores = model.score(encoded.images, encoded.texts, progress=progress)  # [N_i, N_t]
    return scores.float().cpu()


def evaluate_split(model, processor, split, batch_size: int = 256, progress: bool = False) -> dict[str, float]:
    """Encode, score and measure a split.

    Returns:
        ``i2t_R@1`` ... ``t2i_R@10``, ``rsum`` (percent; ``coco1k_*`` too for 5,000 images) and, for
        splits with minimal pairs, ``t2i_pair_acc/<attribute>`` and ``i2t_pair_acc/<attribute>``
        (``.../all`` over every pair).
    """
    encoded = encode_split(model, processor, split, batch_size=batch_size, progress=progress)
    scores = score_split(model, encoded, progress=progress)
    results = retrieval_metrics(scores, encoded.text_to_image)
    if {"variant_of", "changed"} <= set(split.column_names) and any(v >= 0 for v in split["variant_of"]):
        results.update(minimal_pair_accuracy(scores, encoded.text_to_image, split["variant_of"], split["changed"]))
    return results
