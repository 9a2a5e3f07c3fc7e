"""The second stage of two-stage search: UARDA's cross-attention scores of given (image, caption)
pairs only.

``UARDAModel.score`` scores every image against every caption. A shortlist is a sparse set of
pairs instead: each query with its own ``k`` candidates. :func:`pair_scores` groups the pairs by
query and scores each group with the model's own ``score``, one query against its candidates::

    caption query:  score(candidate images [m, R, D], caption [1, L, D])  ->  [m, 1]
    image query:    score(image [1, R, D], candidate captions [m, L, D])  ->  [1, m]

so the scoring is the model's, with its threshold, directions and pooling, and only the
candidates' fragments are read (from RAM or from a memory-mapped cache).
"""

from __future__ import annotations

import numpy as np
import torch

from ..modeling_uarda import UARDAImageEncoding, UARDATextEncoding

__all__ = ["pair_scores", "take"]


def take(array, indices: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """``array[indices, :length]`` as a contiguous torch tensor, for a tensor or a numpy array /
    memmap (whose rows are then read from disk: only the requested ones)."""
    cut = slice(None) if length is None else slice(0, length)
    if isinstance(array, torch.Tensor):
        return array[:, cut].index_select(0, indices.to(array.device))
    return torch.from_numpy(np.ascontiguousarray(array[indices.cpu().numpy(), cut]))


@torch.no_grad()
def pair_scores(model, image_fragments, text_fragments, text_mask, pair_images, pair_texts) -> torch.Tensor:
    """UARDA scores of the pairs ``(pair_images[p], pair_texts[p])``: ``[P]`` float32 on the CPU,
    equal to ``model.score(...)[pair_images, pair_texts]`` (in the model's current mode).

    Args:
        model: a ``UARDAModel``.
        image_fragments: ``[N_i, R, D]`` region fragments (``UARDAImageEncoding.image_fragments``),
            a tensor or a numpy array (e.g. a memmap: only the images of the pairs are read).
        text_fragments: ``[N_t, L, D]`` word fragments, a tensor or numpy array.
        text_mask: ``[N_t, L]`` real-word mask.
        pair_images, pair_texts: ``[P]`` indices of each pair's image and caption.
    """
    pair_images = torch.as_tensor(pair_images, dtype=torch.long).flatten()
    pair_texts = torch.as_tensor(pair_texts, dtype=torch.long).flatten()
    if pair_images.shape != pair_texts.shape:
        raise ValueError(f"pair_images and pair_texts differ in length: {pair_images.numel()} and {pair_texts.numel()}")
    scores = torch.empty(pair_images.numel(), dtype=torch.float32)
    if pair_images.numel() == 0:
        return scores
    for name, index, size in (("pair_images", pair_images, image_fragments.shape[0]),
                              ("pair_texts", pair_texts, text_mask.shape[0])):
        if int(index.min()) < 0 or int(index.max()) >= size:
            raise ValueError(f"{name} holds indices outside [0, {size})")
    device, dtype = model.device, model.dtype

    def images(indices):
        return UARDAImageEncoding(image_fragments=take(image_fragments, indices).to(device=device, dtype=dtype))

    def texts(indices):
        return UARDATextEncoding(text_fragments=take(text_fragments, indices).to(device=device, dtype=dtype),
                                 text_mask=take(text_mask, indices).to(device))

    # Group by whichever side the pairs name fewer of: the queries (a caption's shortlisted images,
    # or an image's shortlisted captions).
    by_caption = pair_texts.unique().numel() <= pair_images.unique().numel()
    queries, candidates = (pair_texts, pair_images) if by_caption else (pair_images, pair_texts)
    order = torch.argsort(queries, stable=True)  # [P] the pairs, query by query
    _, group_sizes = torch.unique_consecutive(queries[order], return_counts=True)  # [Q]
    for group in torch.split(order, group_sizes.tolist()):  # the pairs of one query
        query, others = queries[group[:1]], candidates[group]  # [1], [m]
        if by_caption:
            block = model.score(images(others), texts(query))[:, 0]  # [m, 1] -> [m]
        else:
            block = model.score(images(query), texts(others))[0]  # [1, m] -> [m]
        scores[group] = block.float().cpu()
    return scores
