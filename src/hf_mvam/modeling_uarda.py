"""UARDA: Unified Adaptive Relevance Distinguishable Attention for image-text matching
(Zhang et al., IEEE TMM 24 (2022) 1320–1332, doi 10.1109/TMM.2022.3141603).

Words and image regions are projected to a shared space; every (image, caption) pair is scored
by SCAN's word–region cross attention (`cross_attention.py`), where UARDA replaces SCAN's fixed
zero relevance threshold with one learned from the data: the boundary between the distributions
of relevant (matched) and irrelevant (lowest-scoring negative) word–region similarities. Fragments below
the threshold take no part in the positive attention, and word queries with no region above it skip
it and are penalised instead (NAAF's negative–positive branches, beside SCAN's relevance scores).
``threshold_mode="scan"`` gives the SCAN baseline with the same class.

Read top to bottom: pretrained base -> model -> output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .backbones import (
    backbone_hidden_size,
    build_backbone,
    check_image_features,
    check_pixel_values,
    check_text_inputs,
    text_token_states,
    vision_token_states,
)
from .configuration_uarda import UARDAConfig
from .cross_attention import RelevanceThreshold, cross_attention_scores, relevance_samples, word_region_attention
from .losses import triplet_loss


class UARDAPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by UARDA models."""

    config_class = UARDAConfig
    base_model_prefix = "uarda"
    main_input_name = "input_ids"


@dataclass
class UARDAOutput(ModelOutput):
    """Output of [`UARDAModel`].

    Args:
        loss: triplet loss over in-batch negatives (with ``return_loss``).
        logits_per_image: [N_images, N_texts] cross-attention scores.
        logits_per_text: [N_texts, N_images], the transpose.
        threshold: the relevance threshold these scores used (0-d): the learned one before this
            call's update in uarda mode, SCAN's 0 in scan mode.
        image_fragments: [N_images, R, D] unit-norm region fragments.
        text_fragments: [N_texts, L, D] unit-norm word fragments.
        text_mask: [N_texts, L] real-word mask.
    """

    loss: Optional[torch.FloatTensor] = None
    logits_per_image: Optional[torch.FloatTensor] = None
    logits_per_text: Optional[torch.FloatTensor] = None
    threshold: Optional[torch.FloatTensor] = None
    image_fragments: Optional[torch.FloatTensor] = None
    text_fragments: Optional[torch.FloatTensor] = None
    text_mask: Optional[torch.Tensor] = None


@dataclass
class UARDAImageEncoding(ModelOutput):
    """Encoded images, what [`UARDAModel.score`] takes.

    Args:
        image_fragments: [N, R, D] unit-norm region fragments.
        grid_size: (h, w) of the regions when they come from a vision backbone's grid.
    """

    image_fragments: Optional[torch.FloatTensor] = None
    grid_size: Optional[tuple] = None


@dataclass
class UARDATextEncoding(ModelOutput):
    """Encoded captions, what [`UARDAModel.score`] takes.

    Args:
        text_fragments: [N, L, D] unit-norm word fragments (padding slots included).
        text_mask: [N, L] real-word mask (0 on padding).
    """

    text_fragments: Optional[torch.FloatTensor] = None
    text_mask: Optional[torch.Tensor] = None


class UARDAModel(UARDAPreTrainedModel):
    """The UARDA matcher (and, with ``threshold_mode="scan"``, the SCAN baseline).

    Retrieval: encode every image and caption once (``encode_images`` / ``encode_texts``), then
    ``score`` the whole gallery in memory-bounded chunks; ``forward`` computes exactly the same
    scores for a batch.
    """

    def __init__(self, config: UARDAConfig):
        super().__init__(config)
        if config.image_feature_dim is None:
            self.vision_model = build_backbone(config.vision_config)
            region_width = backbone_hidden_size(config.vision_config)
        else:  # precomputed region features: only a projection
            self.vision_model = None
            region_width = config.image_feature_dim
        self.text_model = build_backbone(config.text_config)
        self.region_projection = nn.Linear(region_width, config.embed_dim)
        self.word_projection = nn.Linear(backbone_hidden_size(config.text_config), config.embed_dim)
        self.relevance_threshold = RelevanceThreshold(
            alpha=config.threshold_alpha,
            update_weight=config.threshold_momentum,
            min_samples=config.threshold_min_samples,
            capacity=max(2048, config.threshold_min_samples),
            init_threshold=config.initial_threshold,
        )
        self.post_init()

    # --- encoding -------------------------------------------------------------------------------

    def encode_images(
        self, pixel_values: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None
    ) -> UARDAImageEncoding:
        """Region fragments [N, R, D], unit norm: from pixels [N, 3, S, S] (the backbone's grid
        tokens; a ViT's CLS token is dropped) or from precomputed features [N, R, F]."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        grid = None
        if image_features is not None:
            regions = check_image_features(image_features, self.config.image_feature_dim)  # [N, R, F]
            regions = regions.to(self.region_projection.weight.dtype)
        else:
            if self.vision_model is None:
                raise ValueError(
                    f"this model takes precomputed image_features of width {self.config.image_feature_dim}, not pixel_values"
                )
            check_pixel_values(pixel_values, self.config.vision_config)
            regions, grid = vision_token_states(self.vision_model, pixel_values)  # [N, T, H]
            regions = regions[:, -grid[0] * grid[1]:]  # [N, R=h*w, H]: grid tokens only
        return UARDAImageEncoding(image_fragments=F.normalize(self.region_projection(regions), dim=-1), grid_size=grid)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> UARDATextEncoding:
        """Word fragments [N, L, D] (unit norm) and the real-word mask [N, L]."""
        attention_mask = check_text_inputs(input_ids, attention_mask, self.config.text_config)
        states = text_token_states(self.text_model, input_ids, attention_mask)  # [N, L, H]
        return UARDATextEncoding(
            text_fragments=F.normalize(self.word_projection(states), dim=-1), text_mask=attention_mask.bool()
        )

    # --- scoring --------------------------------------------------------------------------------

    def score(
        self,
        image_encoding: UARDAImageEncoding,
        text_encoding: UARDATextEncoding,
        memory_budget_mb: float = 512.0,
        progress: bool = False,
        return_stats: bool = False,
    ):
        """[N_images, N_texts] scores of every pair, vectorised and chunked so that the working
        memory stays within ``memory_budget_mb``; equal to ``forward``'s scores for the same pairs.

        In ``uarda`` mode, word queries with no region above the threshold are skipped: in eval
        mode (retrieval) they score only their penalty (best similarity − threshold) and nothing
        else is computed for them; in training mode they also keep SCAN's relevance-score branch,
        as NAAF trains (see ``cross_attention_scores``)."""
        return cross_attention_scores(
            image_encoding.image_fragments,
            text_encoding.text_fragments,
            text_encoding.text_mask,
            direction=self.config.direction,
            aggregation=self.config.aggregation,
            lambda_softmax=self.config.lambda_softmax,
            lambda_lse=self.config.lambda_lse,
            threshold_mode=self.config.threshold_mode,
            threshold=self.relevance_threshold.threshold,
            skip_irrelevant_queries=not self.training,
            memory_budget_mb=memory_budget_mb,
            progress=progress,
            return_stats=return_stats,
        )

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        image_features: Optional[torch.FloatTensor] = None,
        return_loss: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """Score every image against every caption.

        Args:
            input_ids, attention_mask: [N_texts, L] captions.
            pixel_values: [N_images, 3, S, S], or image_features: [N_images, R, F] (exactly one).
            return_loss: triplet loss over in-batch negatives (see ``max_violation``); needs paired inputs
                (image i with caption i). In training mode it also updates the relevance
                threshold from the batch's relevant and lowest-scoring-negative similarities (NAAF).
        """
        if input_ids is None:
            raise ValueError("UARDAModel.forward needs input_ids")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        images = self.encode_images(pixel_values, image_features)
        texts = self.encode_texts(input_ids, attention_mask)
        image_fragments, text_fragments, text_mask = images.image_fragments, texts.text_fragments, texts.text_mask
        if return_loss and image_fragments.shape[0] != text_fragments.shape[0]:
            raise ValueError(
                f"return_loss=True needs paired inputs (image i with caption i), got {image_fragments.shape[0]} "
                f"images and {text_fragments.shape[0]} captions"
            )
        scores = self.score(images, texts)  # [N_i, N_t]
        # The threshold these scores used, before this batch updates it (scan mode: SCAN's 0).
        threshold = self.relevance_threshold.threshold.clone()
        if self.config.threshold_mode == "scan":
            threshold.zero_()
        loss = None
        if return_loss:
            loss = triplet_loss(scores, self.config.margin, self.config.max_violation)
            if self.training and scores.shape[0] > 1:
                # NAAF's irrelevant samples: words against the lowest-scoring image of the batch.
                relevant, irrelevant = relevance_samples(image_fragments, text_fragments, text_mask, scores)
                self.relevance_threshold.update(relevant, irrelevant)
        output = UARDAOutput(
            loss=loss,
            logits_per_image=scores,
            logits_per_text=scores.t(),
            threshold=threshold,
            image_fragments=image_fragments,
            text_fragments=text_fragments,
            text_mask=text_mask,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def word_region_attention(self, image_fragments: torch.Tensor, text_fragments: torch.Tensor, text_mask=None):
        """For one pair ([R, D] regions, [L, D] words): the text-to-image attention [L, R] that
        scoring uses, and the [L, R] mask of relevant fragments (s > threshold; all True in scan mode)."""
        return word_region_attention(
            image_fragments,
            text_fragments,
            text_mask,
            lambda_softmax=self.config.lambda_softmax,
            threshold_mode=self.config.threshold_mode,
            threshold=self.relevance_threshold.threshold,
        )


__all__ = ["UARDAModel", "UARDAPreTrainedModel", "UARDAImageEncoding", "UARDATextEncoding", "UARDAOutput"]
