"""Training objectives shared by MVAM and UARDA: the CLIP contrastive loss, the VSE++ hardest-negative
triplet loss, the views' diversity term, and a differentiable gather for negatives from every process.

Remote code (imported by the modeling files), so only torch is imported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] from every process along dim 0 -> [world * B, ...], in rank
    order, keeping the autograd graph: the backward pass sends each process the gradient of its
    own slice summed over all processes (as open_clip's ``gather_with_grad``). A no-op outside
    torch.distributed or with one process. Every process must pass the same shape."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather  # the autograd-enabled collective

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def _rank_offset(local_batch: int) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() * local_batch
    return 0


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    gather_distributed: bool = False,
    negative_text_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) where image ``i`` matches text ``i``.

    Args:
        image_embeds: [B, E] unit-norm image embeddings (local batch).
        text_embeds: [B, E] unit-norm text embeddings.
        logit_scale: scalar, log of the inverse temperature.
        gather_distributed: use the other processes' embeddings as extra negatives (with gradient).
            Each process scores its own rows against the global batch (open_clip's ``local_loss``);
            the mean over processes equals the single-process loss on the global batch, and so do
            the gradients after DDP averages them.
        negative_text_embeds: [B', E] hard negative captions (NegCLIP): extra columns of every
            image's softmax over the captions (gathered like the captions); they are never queries.
    """
    scale = logit_scale.exp()
    gather = gather_with_grad if gather_distributed else (lambda embeds: embeds)
    all_images = gather(image_embeds)  # [W*B, E]
    all_texts = gather(text_embeds)  # [W*B, E]
    if negative_text_embeds is not None:
        all_texts = torch.cat([all_texts, gather(negative_text_embeds)])  # [W*B + W*B', E]
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device)
    if gather_distributed:
        labels = labels + _rank_offset(image_embeds.shape[0])
    logits_per_image = scale * image_embeds @ all_texts.t()  # [B, W*B (+ W*B')]
    logits_per_text = scale * text_embeds @ all_images.t()  # [B, W*B]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def triplet_loss(
    scores: torch.Tensor, margin: float, max_violation: bool = True, negative_scores: torch.Tensor | None = None
) -> torch.Tensor:
    """VSE++ hinge triplet loss over in-batch negatives, in both directions.

    Args:
        scores: [B, B] image-by-text scores where image ``i`` matches text ``i``.
        margin: the hinge margin (0.2 in SCAN/VSE++).
        max_violation: only the hardest negative of each query counts (VSE++/SCAN's
            ``max_violation``); otherwise the hinge costs of all negatives are summed. Hardest-only
            stalls when both towers start from random weights; the sum gets them off the ground.
        negative_scores: [B, B'] image-by-hard-negative-caption scores (NegCLIP): more caption
            negatives for every image; they are never queries.
    Returns: the cost summed over negatives (or the hardest one), averaged over the batch.
    """
    positives = scores.diag()  # [B]
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_text = F.relu(margin + scores - positives[:, None]).masked_fill(eye, 0)  # [B, B] per image, each caption
    cost_image = F.relu(margin + scores - positives[None, :]).masked_fill(eye, 0)  # [B, B] per caption, each image
    if negative_scores is not None:
        cost_text = torch.cat([cost_text, F.relu(margin + negative_scores - positives[:, None])], dim=1)  # [B, B + B']
    if max_violation:
        return (cost_text.max(dim=1).values + cost_image.max(dim=0).values).mean()
    return (cost_text.sum() + cost_image.sum()) / scores.shape[0]


def attention_overlap(attention: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared cosine similarity between the views' attention distributions, per example.

    This is CAMERA's ||ÂᵀÂ - I||²_F restricted to off-diagonal entries and divided by K(K-1),
    where Â is the token-by-view attention with unit-norm columns: 0 when the views attend to
    disjoint tokens, 1 when they attend identically (whatever the distribution).

    Args:
        attention: [B, K, T] attention of each of K views over T tokens (rows sum to 1).
        token_mask: optional [B, T], 1 for real tokens (padding carries no attention anyway).
    Returns: [B]; zeros when K == 1.
    """
    batch, num_views, _ = attention.shape
    if num_views == 1:
        return attention.new_zeros(batch)
    if token_mask is not None:
        attention = attention * token_mask[:, None, :].to(attention.dtype)
    unit = F.normalize(attention, dim=-1)  # [B, K, T]
    squared = (unit @ unit.transpose(1, 2)).pow(2)  # [B, K, K] squared cosines
    # Off-diagonal sum as total minus trace (a boolean mask index would read values: a host sync).
    off_diagonal = squared.sum(dim=(1, 2)) - squared.diagonal(dim1=1, dim2=2).sum(dim=-1)  # [B]
    return off_diagonal / (num_views * (num_views - 1))
