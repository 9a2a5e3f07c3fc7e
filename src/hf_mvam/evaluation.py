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

__all__ = [
    "SCORE_BLOCK_IMAGES", "EncodedSplit", "concatenate_encodings", "encode_split", "evaluate_split", "gather_blocks",
    "image_batches", "score_split", "select_images",
]


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


#: Images per block of the score matrix. The matrix is always scored block by block in this fixed
#: size, whatever the number of processes, so that W processes compute exactly the blocks that
#: one process computes (the scorers' internal chunking, and so their rounding, follow the size
#: of what they are given).
SCORE_BLOCK_IMAGES = 256


def _process_group(distributed: bool) -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless ``distributed``."""
    if not distributed:
        return 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group (run under "
            "`accelerate launch` and create an Accelerator or PartialState first)"
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def gather_blocks(blocks: dict, distributed: bool) -> dict:
    """The union of every process's ``{block index: value}`` (values moved to the CPU), on every
    process. Without ``distributed`` the dict itself."""
    _, world = _process_group(distributed)
    if world == 1:
        return blocks
    local = {key: _to_cpu(value) for key, value in blocks.items()}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    return {key: value for part in gathered for key, value in part.items()}


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, ModelOutput):
        return type(value)(**{k: _to_cpu(v) for k, v in value.items()})
    return value


def image_batches(split, processor, batch_size: int, device, batches=None):
    """``(batch index, model inputs)`` of consecutive batches of ``split``'s images (``image`` or
    ``image_features`` column), on ``device``; only the batches in ``batches`` when given."""
    image_column = "image_features" if "image_features" in split.column_names else "image"
    images = split.select_columns([image_column])
    if image_column == "image_features":
        images = images.with_format("torch")
    for index, start in enumerate(range(0, len(images), batch_size)):
        if batches is not None and index not in batches:
            continue
        chunk = images[start : start + batch_size][image_column]
        if image_column == "image_features":
            yield index, {"image_features": stack_region_features(chunk).to(device)}  # [b, R, F]
        else:
            yield index, {"pixel_values": processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)}


@torch.no_grad()
def encode_split(
    model, processor, split, batch_size: int = 256, progress: bool = False, distributed: bool = False
) -> EncodedSplit:
    """Encode every image (``image`` or ``image_features`` column) and every caption of ``split``.

    Args:
        model: an hf-mvam model (run in eval mode; its mode is restored afterwards).
        processor: the model's processor.
        split: a ``datasets.Dataset`` with ``captions`` and ``image`` or ``image_features``.
        batch_size: images or captions per forward pass.
        progress: show tqdm bars.
        distributed: every process of the ``torch.distributed`` group calls this with the same
            arguments; each encodes every ``world_size``-th batch (its shard) and all get the
            whole split's encodings, equal to one process's (the same batches).
    """
    device = next(model.parameters()).device
    rank, world = _process_group(distributed)
    with _eval_mode(model):
        captions, text_to_image = flatten_captions(split)
        num_image_batches = -(-len(split) // batch_size)
        mine = set(range(rank, num_image_batches, world))
        image_blocks, region_counts = {}, set()
        bar = tqdm(total=len(mine), desc="encoding images", disable=not progress)
        for index, inputs in image_batches(split, processor, batch_size, device, mine):
            if "image_features" in inputs:
                region_counts.add(inputs["image_features"].shape[1])
                check_region_counts(region_counts)  # batches are concatenated: one R for all
            image_blocks[index] = model.encode_images(**inputs)
            bar.update()
        bar.close()

        text_blocks = {}
        text_starts = range(0, len(captions), batch_size)
        for index in tqdm(range(rank, len(text_starts), world), desc="encoding captions", disable=not progress):
            start = text_starts[index]
            tokens = processor(text=captions[start : start + batch_size], return_tensors="pt").to(device)
            text_blocks[index] = model.encode_texts(tokens["input_ids"], tokens["attention_mask"])

        # every process's region counts: one R for the whole split
        check_region_counts(set().union(*gather_blocks({rank: region_counts}, distributed).values()))
        image_blocks, text_blocks = gather_blocks(image_blocks, distributed), gather_blocks(text_blocks, distributed)
        images = concatenate_encodings([image_blocks[i] for i in range(num_image_batches)])
        texts = concatenate_encodings([text_blocks[i] for i in range(len(text_starts))])
        return EncodedSplit(_to_device(images, device), _to_device(texts, device), text_to_image)


def _to_device(encoding, device):
    if isinstance(encoding, torch.Tensor):
        return encoding.to(device)
    return type(encoding)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoding.items()})


def select_images(encoding, rows: slice):
    """The encoding of the images ``rows`` (every batch-first tensor field sliced)."""
    if isinstance(encoding, torch.Tensor):
        return encoding[rows]
    return type(encoding)(**{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in encoding.items()})


@torch.no_grad()
def score_split(model, encoded: EncodedSplit, progress: bool = False, distributed: bool = False) -> torch.Tensor:
    """The ``[N_i, N_t]`` score matrix of an encoded split (float32, on the CPU), scored in eval
    mode (UARDA: its retrieval form, where skipped word queries are not computed), in blocks of
    ``SCORE_BLOCK_IMAGES`` images.

    With ``distributed``, every process calls this with the same encodings, scores every
    ``world_size``-th block of rows (as BLIP and ALBEF split their evaluation) and all get the
    whole matrix, equal to one process's.
    """
    rank, world = _process_group(distributed)
    num_images = _num_images(encoded.images)
    starts = range(0, num_images, SCORE_BLOCK_IMAGES)
    blocks = {}
    with _eval_mode(model):
        for index in tqdm(range(rank, len(starts), world), desc="scoring", unit="block", disable=not progress):
            rows = slice(starts[index], starts[index] + SCORE_BLOCK_IMAGES)
            blocks[index] = model.score(select_images(encoded.images, rows), encoded.texts).float().cpu()  # [b, N_t]
    blocks = gather_blocks(blocks, distributed)
    return torch.cat([blocks[i] for i in range(len(starts))])


def _num_images(encoding) -> int:
    if isinstance(encoding, torch.Tensor):
        return encoding.shape[0]
    return next(v for v in encoding.values() if isinstance(v, torch.Tensor)).shape[0]


def evaluate_split(
    model, processor, split, batch_size: int = 256, progress: bool = False, distributed: bool = False
) -> dict[str, float]:
    """Encode, score and measure a split.

    Args:
        distributed: every process of the ``torch.distributed`` group calls this with the same
            arguments (each encodes its shard and scores its rows; see :func:`encode_split` and
            :func:`score_split`); all return the same results, equal to one process's.

    Returns:
        ``i2t_R@1`` ... ``t2i_R@10``, ``rsum`` (percent; ``coco1k_*`` too for 5,000 images) and, for
        splits with minimal pairs, ``t2i_pair_acc/<attribute>`` and ``i2t_pair_acc/<attribute>``
        (``.../all`` over every pair).
    """
    encoded = encode_split(model, processor, split, batch_size=batch_size, progress=progress, distributed=distributed)
    scores = score_split(model, encoded, progress=progress, distributed=distributed)
    results = retrieval_metrics(scores, encoded.text_to_image)
    if {"variant_of", "changed"} <= set(split.column_names) and any(v >= 0 for v in split["variant_of"]):
        results.update(minimal_pair_accuracy(scores, encoded.text_to_image, split["variant_of"], split["changed"]))
    return results
