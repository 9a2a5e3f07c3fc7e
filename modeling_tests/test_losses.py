"""The shared training objectives with NegCLIP-style hard negative captions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_mvam.losses import contrastive_loss, triplet_loss


def test_triplet_loss_with_hard_negatives_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.4, 0.7]])  # image i matches caption i
    negatives = torch.tensor([[0.95, 0.0], [0.1, 0.2], [0.0, 0.6]])  # image i x hard negative j
    # per image, captions then negatives: relu(0.2 + s - s_pos)
    per_image = [[0.1, 0.0, 0.25, 0.0], [0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.1]]
    per_caption = [[0.0, 0.0], [0.5, 0.1], [0.0, 0.1]]  # negatives are never queries
    hardest = sum(max(c) for c in per_image + per_caption) / 3
    summed = sum(sum(c) for c in per_image + per_caption) / 3
    assert triplet_loss(scores, 0.2, True, negatives).item() == pytest.approx(hardest)
    assert triplet_loss(scores, 0.2, False, negatives).item() == pytest.approx(summed)
    assert triplet_loss(scores, 0.2, False).item() == pytest.approx((0.1 + 0.3 + 0.5 + 0.1 + 0.1) / 3)


def test_contrastive_loss_with_hard_negatives_is_clip_with_extra_columns():
    generator = torch.Generator().manual_seed(0)
    images, texts, negatives = (F.normalize(torch.randn(4, 8, generator=generator), dim=-1) for _ in range(3))
    scale = torch.tensor(2.0)
    labels = torch.arange(4)
    image_logits = scale.exp() * images @ torch.cat([texts, negatives]).t()  # [4, 8]
    text_logits = scale.exp() * texts @ images.t()  # [4, 4]: negatives are never queries
    expected = (F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)) / 2
    torch.testing.assert_close(contrastive_loss(images, texts, scale, negative_text_embeds=negatives), expected)
    assert contrastive_loss(images, texts, scale, negative_text_embeds=negatives) > contrastive_loss(images, texts, scale)
