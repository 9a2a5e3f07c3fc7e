"""Retrieval evaluation of MVAM and UARDA models on an image–caption split.

Shared by ``training/run.py``, ``training/check_folder.py`` and the benchmarks. Every image and
every caption of the split is encoded once (in batches, without gradients), the full
``[num_images, num_texts]`` score matrix is computed, and the metrics follow the field's protocol
(see ``hf_mvam.metrics``): Recall@1/5/10 in both directions, rSum, the COCO 5-fold 1K numbers when
the split has 5,000 images, and the minimal-pair accuracy when the split has ``variant_of`` /
``changed`` columns (the synthetic benchmark).

The model may be an ``hf_mvam`` class or one loaded with ``AutoModel.from_pretrained(...,
trust_remote_code=True)``: the kind is read from ``model.config.model_type``.

- MVAM: embeddings from ``get_image_features`` / ``get_text_features`` (``pooler_output``,
  ``[N, K*P]``), scores are their dot products.
- UARDA: region fragments ``[N_i, R, D]`` from ``encode_images``, word fragments ``[N_t, L, D]`` and
  their mask from ``encode_texts``, scores from ``model.score`` (chunked cross attention).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.collate import check_region_counts, flatten_captions, stack_region_features
from .metrics import minimal_pair_accuracy, retrieval_metrics

__all__ = ["EncodedSplit", "encode_split", "evaluate_split", "score_split"]

MODEL_TYPES = ("mvam", "uarda")


@dataclass
class EncodedSplit:
    """Every image and caption of a split, encoded.

    Attributes:
        images: MVAM ``[N_i, E]`` embeddings; UARDA ``[N_i, R, D]`` region fragments.
        texts: MVAM ``[N_t, E]`` embeddings; UARDA ``[N_t, L, D]`` word fragments (zero padded).
        text_mask: UARDA ``[N_t, L]`` real-word mask; ``None`` for MVAM.
        text_to_image: ``[N_t]`` index of each caption's image.
    """

    images: torch.Tensor
    texts: torch.Tensor
    text_mask: Optional[torch.Tensor]
    text_to_image: torch.Tensor


def _model_type(model) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"cannot evaluate a model of type {model_type!r}: expected one of {MODEL_TYPES}")
    return model_type


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
        model: an MVAM or UARDA model (run in eval mode; its mode is restored afterwards).
        processor: the model's processor.
        split: a ``datasets.Dataset`` with ``captions`` and ``image`` or ``image_features``.
        batch_size: images or captions per forward pass.
        progress: show tqdm bars.
    """
    model_type = _model_type(model)
    device = next(model.parameters()).device
    with _eval_mode(model):
        captions, text_to_image = flatten_captions(split)
        image_column = "image_features" if "image_features" in split.column_names else "image"
        if image_column == "image_features" and model_type != "uarda":
            raise ValueError("precomputed image_features can only be evaluated with a UARDA model")
        images = split.select_columns([image_column])
        if image_column == "image_features":
            images = images.with_format("torch")

        image_batches = []
        for start in tqdm(range(0, len(images), batch_size), desc="encoding images", disable=not progress):
            chunk = images[start : start + batch_size][image_column]
            if image_column == "image_features":
                features = stack_region_features(chunk)  # [b, R, F]
                if image_batches:  # chunks are concatenated at the end: same count as the first
                    check_region_counts([image_batches[0].shape[1], features.shape[1]])
                image_batches.append(model.encode_images(image_features=features.to(device)))  # [b, R, D]
                continue
            pixel_values = processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)  # [b, 3, S, S]
            if model_type == "mvam":
                image_batches.append(model.get_image_features(pixel_values=pixel_values).pooler_output)  # [b, E]
            else:
                image_batches.append(model.encode_images(pixel_values=pixel_values))  # [b, R, D]

        text_batches, mask_batches = [], []
        for start in tqdm(range(0, len(captions), batch_size), desc="encoding captions", disable=not progress):
            tokens = processor(text=captions[start : start + batch_size], return_tensors="pt").to(device)
            if model_type == "mvam":
                text_batches.append(model.get_text_features(**tokens).pooler_output)  # [b, E]
            else:
                fragments, mask = model.encode_texts(tokens["input_ids"], tokens["attention_mask"])  # [b, L_b, D], [b, L_b]
                text_batches.append(fragments)
                mask_batches.append(mask)

        if model_type == "mvam":
            return EncodedSplit(torch.cat(image_batches), torch.cat(text_batches), None, text_to_image)
        # Captions of different batches have different lengths: pad to the longest with masked zeros.
        length = max(fragments.shape[1] for fragments in text_batches)
        texts = torch.cat([F.pad(f, (0, 0, 0, length - f.shape[1])) for f in text_batches])  # [N_t, L, D]
        mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in mask_batches])  # [N_t, L]
        return EncodedSplit(torch.cat(image_batches), texts, mask, text_to_image)


@torch.no_grad()
def score_split(model, encoded: EncodedSplit, progress: bool = False) -> torch.Tensor:
    """The ``[N_i, N_t]`` score matrix of an encoded split (float32, on the CPU). UARDA scores in
    eval mode, i.e. its retrieval form (skipped word queries are not computed)."""
    if _model_type(model) == "mvam":
        scores = encoded.images @ encoded.texts.t()  # [N_i, N_t]
    else:
        with _eval_mode(model):
            scores = model.score(encoded.images, encoded.texts, encoded.text_mask, progress=progress)  # [N_i, N_t]
    return scores.float().cpu()


def evaluate_split(model, processor, split, batch_size: int = 256, progress: bool = False) -> dict[str, float]:
    """Encode, score and measure a split.

    Returns:
        ``i2t_R@1`` ... ``t2i_R@10``, ``rsum`` (percent; ``coco1k_*`` too for 5,000 images) and, for
        splits with minimal pairs, ``pair_acc/<attribute>`` and ``pair_acc/all``.
    """
    encoded = encode_split(model, processor, split, batch_size=batch_size, progress=progress)
    scores = score_split(model, encoded, progress=progress)
    results = retrieval_metrics(scores, encoded.text_to_image)
    if {"variant_of", "changed"} <= set(split.column_names) and any(v >= 0 for v in split["variant_of"]):
        results.update(minimal_pair_accuracy(scores, encoded.text_to_image, split["variant_of"], split["changed"]))
    return results
