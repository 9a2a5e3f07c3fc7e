"""MVAM: Multi-View Attention Method for fine-grained image-text matching (arXiv 2402.17237).

A two-stream dual encoder: images and captions are encoded independently (retrieval stays a dot
product over precomputed vectors). Each tower's token states are pooled by K attention heads, each
with its own learned view code, into K unit-norm views; the views are concatenated (scaled by
1/sqrt(K), so the similarity of two embeddings is the mean of the per-view cosines). A diversity
objective keeps the views' attention distributions apart.

Read top to bottom: building block (view pooling) -> pretrained base -> outputs -> model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .backbones import (
    backbone_hidden_size,
    build_backbone,
    check_image_features,
    check_pixel_values,
    check_text_inputs,
    from_vision_text_pretrained,
    text_backbone_outputs,
    vision_backbone_outputs,
)
from .configuration_mvam import MVAMConfig
from .losses import attention_overlap, contrastive_loss

# CLIP's cap on the contrastive inverse temperature exp(logit_scale): 100. An unbounded
# temperature makes the contrastive loss unstable (CLIP and open_clip clamp it too).
MAX_LOGIT_SCALE = math.log(100)


class MultiViewAttentionPooling(nn.Module):
    """K attention heads, one per view: view code k is a learned query that attends over the token
    states; the pooled vector is projected (one projection per view) and L2-normalised.

    Args:
        hidden_size: width H of the backbone's token states.
        num_views: K.
        projection_dim: width P of each view vector.
    """

    def __init__(self, hidden_size: int, num_views: int, projection_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.view_codes = nn.Parameter(torch.empty(num_views, hidden_size))  # [K, H]
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.view_projection = nn.Parameter(torch.empty(num_views, hidden_size, projection_dim))  # [K, H, P]
        self.view_projection_bias = nn.Parameter(torch.zeros(num_views, projection_dim))  # [K, P]
        self.reset_view_parameters()

    @torch.no_grad()
    def reset_view_parameters(self):
        """Distinct random view codes (so the views start apart) and per-view projections."""
        nn.init.normal_(self.view_codes, std=1.0)
        nn.init.normal_(self.view_projection, std=self.view_projection.shape[1] ** -0.5)
        nn.init.zeros_(self.view_projection_bias)

    def forward(self, token_states: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        """
        Args:
            token_states: [B, T, H].
            token_mask: [B, T], 1 for real tokens, 0 for padding (never attended).
        Returns:
            views: [B, K, P], unit norm per view.
            attention: [B, K, T], each view's attention over the tokens (rows sum to 1).
        """
        states = self.norm(token_states)
        keys = self.key(states)  # [B, T, H]
        logits = torch.einsum("kh,bth->bkt", self.view_codes, keys) / math.sqrt(keys.shape[-1])  # [B, K, T]
        if token_mask is not None:
            logits = logits.masked_fill(~token_mask[:, None, :].bool(), torch.finfo(logits.dtype).min)
        attention = logits.softmax(dim=-1)  # [B, K, T]
        pooled = attention @ self.value(states)  # [B, K, H]
        views = torch.einsum("bkh,khp->bkp", pooled, self.view_projection) + self.view_projection_bias  # [B, K, P]
        return F.normalize(views, dim=-1), attention


def concatenate_views(views: torch.Tensor) -> torch.Tensor:
    """[B, K, P] unit views -> [B, K*P] unit embedding whose dot products are mean per-view cosines."""
    batch, num_views, dim = views.shape
    return views.reshape(batch, num_views * dim) / math.sqrt(num_views)  # [B, K*P]


class MVAMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by MVAM models."""

    config_class = MVAMConfig
    base_model_prefix = "mvam"
    main_input_name = "input_ids"
    # Delegated to the towers: gradient_checkpointing_enable() and attn_implementation= reach
    # every backbone that supports them (the view heads have neither).
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        from transformers import initialization as init

        if isinstance(module, MultiViewAttentionPooling):
            init.normal_(module.view_codes, std=1.0)  # as reset_view_parameters; skips loaded tensors
            init.normal_(module.view_projection, std=module.view_projection.shape[1] ** -0.5)
            init.zeros_(module.view_projection_bias)
        elif isinstance(module, MVAMModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


@dataclass
class MVAMEncoderOutput(ModelOutput):
    """One tower's encoding, what [`MVAMModel.score`] takes.

    Args:
        pooler_output: [N, K*P] concatenated unit-norm embedding used for retrieval (as
            transformers 5.x ``CLIPModel.get_*_features`` return it).
        view_embeds: [N, K, P] per-view unit vectors.
        view_attentions: [N, K, T] each view's attention over the tokens (with ``output_attentions``).
        last_hidden_state: [N, T, H] the tokens the views attend over (with ``output_hidden_states``).
        hidden_states: the backbone's per-layer outputs (with ``output_hidden_states``; none for
            precomputed image features).
        grid_size: (h, w) of an image's spatial tokens (images from pixels only).
    """

    pooler_output: Optional[torch.FloatTensor] = None
    view_embeds: Optional[torch.FloatTensor] = None
    view_attentions: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple] = None
    grid_size: Optional[tuple] = None


@dataclass
class MVAMOutput(ModelOutput):
    """Output of [`MVAMModel`].

    Args:
        loss: total training loss (contrastive + diversity_weight * diversity), when ``return_loss``.
        contrastive_loss: the symmetric InfoNCE part, with the negatives of every process.
        diversity_loss: mean view overlap of both modalities (0 for one view).
        logits_per_image: [N_images, N_texts] scaled similarities.
        logits_per_text: [N_texts, N_images], the transpose.
        image_embeds: [N_images, K*P] concatenated unit-norm embedding used for retrieval.
        text_embeds: [N_texts, K*P].
        image_view_embeds: [N_images, K, P] per-view unit vectors.
        text_view_embeds: [N_texts, K, P].
        image_view_attentions: [N_images, K, T_img] each view's attention over image tokens
            (with ``output_attentions``).
        text_view_attentions: [N_texts, K, L] each view's attention over words.
        logit_scale: the inverse temperature exp(logit_scale) the logits use (capped at 100).
        text_model_output: as CLIPOutput's: ``last_hidden_state`` [N_texts, L, H] the word states
            the views pool, ``pooler_output`` the embedding, ``hidden_states`` the backbone's
            per-layer outputs with ``output_hidden_states``.
        vision_model_output: the same for the images ([N_images, T, H] tokens or regions).
    """

    loss: Optional[torch.FloatTensor] = None
    contrastive_loss: Optional[torch.FloatTensor] = None
    diversity_loss: Optional[torch.FloatTensor] = None
    logits_per_image: Optional[torch.FloatTensor] = None
    logits_per_text: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    image_view_embeds: Optional[torch.FloatTensor] = None
    text_view_embeds: Optional[torch.FloatTensor] = None
    image_view_attentions: Optional[torch.FloatTensor] = None
    text_view_attentions: Optional[torch.FloatTensor] = None
    logit_scale: Optional[torch.FloatTensor] = None
    text_model_output: Optional[BaseModelOutputWithPooling] = None
    vision_model_output: Optional[BaseModelOutputWithPooling] = None

    def to_tuple(self) -> tuple:
        """As CLIPOutput.to_tuple: the towers' outputs become tuples too."""
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


def _tower_output(encoding: "MVAMEncoderOutput") -> BaseModelOutputWithPooling:
    return BaseModelOutputWithPooling(
        last_hidden_state=encoding.last_hidden_state, pooler_output=encoding.pooler_output,
        hidden_states=encoding.hidden_states,
    )


class MVAMModel(MVAMPreTrainedModel):
    """The MVAM dual encoder. See [`MVAMConfig`] for the options.

    Retrieval, as for every hf-mvam model: ``encode_images`` and ``encode_texts`` once per item,
    then ``score`` every image against every caption (here a chunked dot product).

    Example:
        >>> model = MVAMModel(MVAMConfig(num_views=4))
        >>> out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
        >>> out.loss.backward()
    """

    def __init__(self, config: MVAMConfig):
        super().__init__(config)
        if config.image_feature_dim is None:
            self.vision_model = build_backbone(config.vision_config)
            image_width = backbone_hidden_size(config.vision_config)
        else:  # precomputed region features: the views attend over the regions directly
            self.vision_model = None
            image_width = config.image_feature_dim
        self.text_model = build_backbone(config.text_config)
        self.image_views = MultiViewAttentionPooling(image_width, config.num_views, config.projection_dim)
        self.text_views = MultiViewAttentionPooling(
            backbone_hidden_size(config.text_config), config.num_views, config.projection_dim
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    # --- encoding -------------------------------------------------------------------------------

    def encode_images(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> MVAMEncoderOutput:
        """Pixels [N, 3, S, S] (the backbone's tokens) or precomputed region features [N, R, F]
        (with ``image_feature_dim``) -> embedding [N, K*P], views [N, K, P], attention [N, K, T]."""
        states, grid, hidden_states = self._image_states(pixel_values, image_features, output_hidden_states)
        views, attention = self.image_views(states)
        return MVAMEncoderOutput(
            pooler_output=concatenate_views(views),
            view_embeds=views,
            view_attentions=attention if output_attentions else None,
            last_hidden_state=states if output_hidden_states else None,
            hidden_states=hidden_states,
            grid_size=grid,
        )

    def encode_texts(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> MVAMEncoderOutput:
        """input_ids [N, L] (+ mask) -> embedding [N, K*P], views [N, K, P], attention [N, K, L]."""
        attention_mask = check_text_inputs(input_ids, attention_mask, self.config.text_config)
        states, hidden_states = text_backbone_outputs(
            self.text_model, input_ids, attention_mask, output_hidden_states
        )  # [N, L, H]
        views, attention = self.text_views(states, attention_mask)
        return MVAMEncoderOutput(
            pooler_output=concatenate_views(views),
            view_embeds=views,
            view_attentions=attention if output_attentions else None,
            last_hidden_state=states if output_hidden_states else None,
            hidden_states=hidden_states,
        )

    def _image_states(self, pixel_values, image_features, output_hidden_states: bool):
        """The [N, T, H] tokens (or [N, R, F] regions) the image views pool, the grid and the
        backbone's per-layer outputs (with ``output_hidden_states``)."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        if image_features is not None:
            return check_image_features(image_features, self.config.image_feature_dim), None, None  # [N, R, F]
        if self.vision_model is None:
            raise ValueError(
                f"this model takes precomputed image_features of width {self.config.image_feature_dim}, not pixel_values"
            )
        check_pixel_values(pixel_values, self.config.vision_config)
        return vision_backbone_outputs(self.vision_model, pixel_values, output_hidden_states)  # [N, T, H]

    def get_image_features(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """As transformers 5.x ``CLIPModel.get_image_features``: ``pooler_output`` is the
        [N, config.embedding_dim] retrieval embedding, ``last_hidden_state`` the [N, T, H] tokens
        the views pool; the backbone's ``hidden_states`` with ``output_hidden_states``; a tuple
        with ``return_dict=False``."""
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        states, _, hidden_states = self._image_states(pixel_values, image_features, output_hidden_states)
        views, _ = self.image_views(states)
        output = BaseModelOutputWithPooling(
            last_hidden_state=states, pooler_output=concatenate_views(views), hidden_states=hidden_states
        )
        return output if (return_dict if return_dict is not None else self.config.return_dict) else output.to_tuple()

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """As transformers 5.x ``CLIPModel.get_text_features``: ``pooler_output`` is
        [N, config.embedding_dim]; ``hidden_states`` and tuples as :meth:`get_image_features`."""
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        attention_mask = check_text_inputs(input_ids, attention_mask, self.config.text_config)
        states, hidden_states = text_backbone_outputs(self.text_model, input_ids, attention_mask, output_hidden_states)
        views, _ = self.text_views(states, attention_mask)
        output = BaseModelOutputWithPooling(
            last_hidden_state=states, pooler_output=concatenate_views(views), hidden_states=hidden_states
        )
        return output if (return_dict if return_dict is not None else self.config.return_dict) else output.to_tuple()

    def get_input_embeddings(self) -> nn.Module:
        """The text backbone's token embeddings (what transformers' embedding utilities resize or hook)."""
        return self.text_model.get_input_embeddings()

    # --- matching -------------------------------------------------------------------------------

    @torch.no_grad()
    def score(
        self,
        image_encoding: MVAMEncoderOutput,
        text_encoding: MVAMEncoderOutput,
        memory_budget_mb: float = 512.0,
        progress: bool = False,
    ) -> torch.Tensor:
        """[N_images, N_texts] similarities (mean per-view cosines, without the logit scale) of
        every encoded image against every encoded caption, computed in row chunks whose output
        stays within ``memory_budget_mb``."""
        images, texts = image_encoding.pooler_output, text_encoding.pooler_output  # [N_i, E], [N_t, E]
        if not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
        rows = max(1, int(memory_budget_mb * 2**20) // (texts.shape[0] * texts.element_size()))
        chunks = range(0, images.shape[0], rows)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="scoring", unit="chunk")
        return torch.cat([images[start : start + rows] @ texts.t() for start in chunks])  # [N_i, N_t]

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        image_features: Optional[torch.FloatTensor] = None,
        negative_input_ids: Optional[torch.LongTensor] = None,
        negative_attention_mask: Optional[torch.Tensor] = None,
        return_loss: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """Encode both modalities and score every image against every text.

        Args:
            input_ids: [N_texts, L] token ids; attention_mask: [N_texts, L] (1 = real token).
            pixel_values: [N_images, 3, S, S], or image_features: [N_images, R, F] (exactly one).
            return_loss: compute the training loss; needs paired inputs (image i matches text i),
                so N_images must equal N_texts. Under torch.distributed the contrastive term takes
                its negatives from every process's batch (with gradients), so W processes with
                batch B train like one process with batch W*B.
            negative_input_ids, negative_attention_mask: [N', L'] hard negative captions (NegCLIP;
                see ``hf_mvam.data.hard_negatives``): with ``return_loss``, extra captions in every
                image's softmax (gathered like the captions), never queries; not in the logits.
            output_attentions: also return each view's attention maps.
            output_hidden_states: also return ``text_model_output`` and ``vision_model_output``
                (the token states and the backbones' per-layer outputs), as CLIPModel does.
            return_dict: ``False`` gives a tuple of the fields that are set, in order.
        """
        if input_ids is None:
            raise ValueError("MVAMModel.forward needs input_ids")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states)
        images = self.encode_images(pixel_values, image_features, True, output_hidden_states)
        texts = self.encode_texts(input_ids, attention_mask, True, output_hidden_states)
        if return_loss and images.pooler_output.shape[0] != texts.pooler_output.shape[0]:
            raise ValueError(
                f"return_loss=True needs paired inputs (image i with caption i), got {images.pooler_output.shape[0]} "
                f"images and {texts.pooler_output.shape[0]} captions"
            )

        logit_scale = self.logit_scale.clamp(0, MAX_LOGIT_SCALE)
        logits_per_image = logit_scale.exp() * images.pooler_output @ texts.pooler_output.t()  # [N_i, N_t]
        loss = contrastive = diversity = None
        if return_loss:
            # In float32 whatever the autocast dtype: the softmax over the global batch needs it.
            negatives = None
            if negative_input_ids is not None:
                negatives = self.encode_texts(negative_input_ids, negative_attention_mask).pooler_output.float()
            contrastive = contrastive_loss(
                images.pooler_output.float(), texts.pooler_output.float(), logit_scale, gather_distributed=True,
                negative_text_embeds=negatives,
            )
            text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            diversity = self.diversity_loss(images.view_attentions, texts.view_attentions, text_mask).float()
            loss = contrastive + self.config.diversity_weight * diversity

        output = MVAMOutput(
            loss=loss,
            contrastive_loss=contrastive,
            diversity_loss=diversity,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=images.pooler_output,
            text_embeds=texts.pooler_output,
            image_view_embeds=images.view_embeds,
            text_view_embeds=texts.view_embeds,
            image_view_attentions=images.view_attentions if output_attentions else None,
            text_view_attentions=texts.view_attentions if output_attentions else None,
            logit_scale=logit_scale.exp().detach(),
            text_model_output=_tower_output(texts) if output_hidden_states else None,
            vision_model_output=_tower_output(images) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    def diversity_loss(
        self, image_attention: torch.Tensor, text_attention: torch.Tensor, text_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Mean view overlap of the image views and of the text views (both modalities, equal weight)."""
        return (attention_overlap(image_attention).mean() + attention_overlap(text_attention, text_mask).mean()) / 2

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As ``PreTrainedModel.save_pretrained``; a registered model also maps
        ``AutoModelForZeroShotImageClassification`` to this class, which the zero-shot pipeline needs."""
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModelForZeroShotImageClassification": f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    # --- building on pretrained backbones -------------------------------------------------------

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: Optional[str] = None, text_model_name_or_path: Optional[str] = None,
        **config_kwargs,
    ) -> "MVAMModel":
        """Build MVAM on pretrained backbones (Hub ids or local folders), e.g.
        ``MVAMModel.from_vision_text_pretrained("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32")``.
        For a composite checkpoint (CLIP, SigLIP) the vision or text tower is taken out of it;
        either may be omitted (a from-scratch ``vision_config``/``text_config``, or
        ``image_feature_dim``). The view heads and logit scale are freshly initialised;
        ``config_kwargs`` go to [`MVAMConfig`]."""
        return from_vision_text_pretrained(cls, vision_model_name_or_path, text_model_name_or_path, **config_kwargs)


__all__ = ["MVAMModel", "MVAMPreTrainedModel", "MultiViewAttentionPooling", "MVAMEncoderOutput", "MVAMOutput"]
