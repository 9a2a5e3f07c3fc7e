"""Backbones as sub-configs: build any transformers vision or text model from a config dict (or
load a pretrained one), read its token states in one layout, ``[batch, tokens, hidden]``, and
freeze or checkpoint it for training.

Shared by MVAM and UARDA and copied into every saved model folder (remote code), so it imports
only transformers and torch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

# Built-in from-scratch towers: small enough to learn the synthetic benchmark on a 2-core CPU.
# A ViT (not a CNN) because relations ("the star left of the circle") need attention that can
# bind what is where, and a bidirectional text encoder so that every word sees the whole caption.
DEFAULT_VISION_CONFIG = {
    "model_type": "clip_vision_model",
    "image_size": 64,
    "patch_size": 8,  # 8 x 8 grid of patches + CLS = 65 tokens
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
}
DEFAULT_TEXT_CONFIG = {
    "model_type": "bert",
    "vocab_size": 1024,  # replaced by the tokenizer's size when a tokenizer is trained
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}


def resolve_backbone_config(config: PretrainedConfig | dict | None, default: dict, field: str) -> PretrainedConfig:
    """Turn a sub-config given as a config object, a dict with ``model_type``, or ``None`` (the
    built-in default) into a ``PretrainedConfig``; ``field`` names it in error messages."""
    if config is None:
        config = dict(default)
    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, dict):
        raise ValueError(f"{field} must be a PretrainedConfig or a dict, got {type(config).__name__}")
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{field} needs a 'model_type' (e.g. {default['model_type']!r})")
    try:
        return AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as error:
        reason = "not a transformers model type" if "Unrecognized model" in str(error) else str(error)
        raise ValueError(f"{field}: invalid backbone model_type {model_type!r}: {reason}") from error
    except StrictDataclassError as error:  # transformers' own checks of the config's values
        raise ValueError(f"{field}: {' '.join(str(error).split())}") from error


def backbone_hidden_size(config: PretrainedConfig) -> int:
    """Width of the token states a backbone returns (convolutional nets: the last stage's channels)."""
    if getattr(config, "hidden_sizes", None):
        return config.hidden_sizes[-1]
    if getattr(config, "hidden_size", None):
        return config.hidden_size
    raise ValueError(f"cannot tell the hidden size of backbone type {config.model_type!r}")


def build_backbone(config: PretrainedConfig) -> nn.Module:
    """A randomly initialised backbone for ``config``, without a pooling head where the model has
    one (only token states are used, and an unused head would never receive a gradient)."""
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:  # models without a pooling head do not take the argument
        return AutoModel.from_config(config)


# Vision towers of the CLIP family keep their final LayerNorm for the pooled token only: their
# last_hidden_state comes before it, so it is applied to every token here, to put all states on
# the scale the (pretrained) tower was trained to produce. Others that have a post_layernorm
# (SigLIP, BLIP, ...) already apply it to last_hidden_state.
_TOKENS_BEFORE_POST_LAYERNORM = frozenset({
    "clip_vision_model", "altclip_vision_model", "chinese_clip_vision_model", "clipseg_vision_model",
    "kosmos_2_vision_model", "metaclip_2_vision_model", "mlcd_vision_model", "owlv2_vision_model",
    "owlvit_vision_model", "xclip_vision_model",
})


def vision_token_states(backbone: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Run the vision backbone and return its token states and the grid they came from.

    Returns:
        states: ``[B, T, H]``: ViT-like models give patch tokens (+ CLS first); convolutional
            models' ``[B, C, h, w]`` feature maps are flattened to ``[B, h*w, C]``.
        grid: ``(h, w)`` of the spatial tokens (for attention maps).
    """
    states, grid, _ = vision_backbone_outputs(backbone, pixel_values)
    return states, grid


def vision_backbone_outputs(
    backbone: nn.Module, pixel_values: torch.Tensor, output_hidden_states: bool = False
) -> tuple[torch.Tensor, tuple[int, int], Optional[tuple]]:
    """As :func:`vision_token_states`, plus the backbone's ``hidden_states`` (every layer's output,
    as the backbone returns them) with ``output_hidden_states``, else ``None``."""
    outputs = backbone(pixel_values=pixel_values, output_hidden_states=output_hidden_states)
    states = outputs.last_hidden_state
    if backbone.config.model_type in _TOKENS_BEFORE_POST_LAYERNORM:
        states = getattr(backbone, "vision_model", backbone).post_layernorm(states)
    hidden_states = outputs.hidden_states if output_hidden_states else None
    if states.dim() == 4:  # convolutional feature map [B, C, h, w]
        batch, channels, height, width = states.shape
        states = states.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return states, (height, width), hidden_states
    side = int(round((states.shape[1] - 1) ** 0.5))  # ViT: CLS + side*side patches
    if side * side == states.shape[1] - 1:
        return states, (side, side), hidden_states
    side = int(round(states.shape[1] ** 0.5))
    return states, (side, states.shape[1] // max(side, 1)), hidden_states


def text_token_states(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run the text backbone; returns ``[B, L, H]`` token states (padding positions included)."""
    return text_backbone_outputs(backbone, input_ids, attention_mask)[0]


def text_backbone_outputs(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False
) -> tuple[torch.Tensor, Optional[tuple]]:
    """As :func:`text_token_states`, plus the backbone's ``hidden_states`` with ``output_hidden_states``."""
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
    return outputs.last_hidden_state, outputs.hidden_states if output_hidden_states else None


# --------------------------------------------------------------------------- pretrained towers


def load_pretrained_backbone(name_or_path: str, sub_config: str) -> PreTrainedModel:
    """Load a backbone (Hub id or folder); from a composite checkpoint (e.g. CLIP, SigLIP, whose
    config has a ``sub_config`` such as ``vision_config``) take that tower. A folder is recorded
    in the backbone's config (``_name_or_path``) by its name only: the config goes into the
    model's config.json, which is uploaded."""
    config = AutoConfig.from_pretrained(name_or_path)
    if hasattr(config, sub_config):
        config = getattr(config, sub_config)
    backbone = AutoModel.from_pretrained(name_or_path, config=config)
    if os.path.isdir(name_or_path):
        backbone.config._name_or_path = os.path.basename(os.path.normpath(name_or_path))
    return backbone


def from_vision_text_pretrained(
    model_class, vision_model_name_or_path: Optional[str] = None, text_model_name_or_path: Optional[str] = None,
    **config_kwargs,
):
    """An hf-mvam model (MVAM or UARDA: any ``model_class`` whose towers are ``vision_model`` and
    ``text_model``) on pretrained backbones, either or both; the other parts (view heads or
    projections, the logit scale or threshold, a from-scratch tower given as ``vision_config`` /
    ``text_config``) are freshly initialised. ``config_kwargs`` go to ``model_class.config_class``
    (e.g. ``image_feature_dim`` for a text backbone with precomputed region features).

    Raises:
        ValueError: a pretrained backbone lacks weights the tower needs.
    """
    pretrained = {}
    for name, sub_config in ((vision_model_name_or_path, "vision_config"), (text_model_name_or_path, "text_config")):
        if name is not None:
            pretrained[sub_config] = load_pretrained_backbone(name, sub_config)
            config_kwargs[sub_config] = pretrained[sub_config].config
    model = model_class(model_class.config_class(**config_kwargs))
    for sub_config, backbone in pretrained.items():
        tower = getattr(model, sub_config.replace("_config", "_model"))
        if tower is None:  # e.g. a vision backbone beside image_feature_dim
            raise ValueError(f"the model takes precomputed image features: the pretrained {sub_config} would go unused")
        # strict=False only for the pretrained pooling heads we drop; a missing weight is an error.
        missing = tower.load_state_dict(backbone.state_dict(), strict=False).missing_keys
        if missing:
            raise ValueError(f"pretrained {type(backbone).__name__} lacks weights for {missing[:5]}")
    return model


# --------------------------------------------------------------------------- training the towers


def backbone_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a backbone: its ``nn.ModuleList`` with the most parameters (BERT's
    ``encoder.layer``, CLIP's ``encoder.layers``; the stages of a ResNet or ConvNeXt)."""
    lists = [module for module in backbone.modules() if isinstance(module, nn.ModuleList) and len(module)]
    if not lists:
        raise ValueError(f"cannot find the blocks of a {type(backbone).__name__}")
    return max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))


def freeze_backbone(backbone: nn.Module, unfrozen_blocks: int = 0) -> None:
    """Stop training a backbone, except its last ``unfrozen_blocks`` blocks and the parameters
    that come after the blocks (a final norm), as open_clip's ``lock_image(unlocked_groups)``.
    Whatever comes before the blocks (embeddings, a pre-norm) stays frozen."""
    parameters = list(backbone.named_parameters())
    for _, parameter in parameters:
        parameter.requires_grad_(False)
    if unfrozen_blocks == 0:
        return
    blocks = backbone_blocks(backbone)
    if unfrozen_blocks > len(blocks):
        raise ValueError(f"a {type(backbone).__name__} has {len(blocks)} blocks: cannot keep {unfrozen_blocks} trainable")
    for block in blocks[-unfrozen_blocks:]:
        block.requires_grad_(True)
    in_blocks = {id(p) for p in blocks.parameters()}
    last_block_parameter = max(i for i, (_, p) in enumerate(parameters) if id(p) in in_blocks)
    for _, parameter in parameters[last_block_parameter + 1:]:  # registered after the blocks: they follow them
        parameter.requires_grad_(True)


def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Recompute the activations of every tower (``vision_model``, ``text_model``) whose
    transformers model supports it, in the backward pass; returns the towers' names."""
    enabled = []
    for name in ("vision_model", "text_model"):
        tower = getattr(model, name, None)
        if isinstance(tower, PreTrainedModel) and tower.supports_gradient_checkpointing:
            # activation_checkpointing_enable is the newer transformers name of the same call.
            getattr(tower, "activation_checkpointing_enable", tower.gradient_checkpointing_enable)()
            enabled.append(name)
    return enabled


# Models check shapes and types only, as CLIP does: a check that reads tensor values would force a
# host sync on every training step on a GPU. Values are checked where data enters (the processor,
# the collator, the loaders).


def check_pixel_values(pixel_values, vision_config: PretrainedConfig) -> None:
    """Raise a ValueError naming the problem unless ``pixel_values`` is a non-empty
    [B, 3, S, S] tensor at the resolution the backbone was configured for (when it fixes one)."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a [batch, 3, height, width] tensor, got {shape}")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch")
    size = getattr(vision_config, "image_size", None)
    if size is not None and tuple(pixel_values.shape[-2:]) != (size, size):
        raise ValueError(
            f"pixel_values are {tuple(pixel_values.shape[-2:])} but the vision backbone expects {size} x {size}; "
            "use the model's processor to resize"
        )


def check_image_features(image_features, feature_dim: int | None) -> torch.Tensor:
    """Raise a ValueError naming the problem unless ``image_features`` is a non-empty
    [B, R, feature_dim] floating-point tensor and the model takes features (``feature_dim`` set)."""
    if feature_dim is None:
        raise ValueError(
            "this model encodes pixels (it has a vision backbone); image_features needs a model "
            "configured with image_feature_dim"
        )
    if not isinstance(image_features, torch.Tensor) or image_features.dim() != 3 or image_features.shape[-1] != feature_dim:
        shape = tuple(image_features.shape) if isinstance(image_features, torch.Tensor) else type(image_features).__name__
        raise ValueError(f"image_features must be [batch, regions, {feature_dim}], got {shape}")
    if image_features.shape[0] == 0 or image_features.shape[1] == 0:
        raise ValueError(f"image_features is empty: shape {tuple(image_features.shape)}")
    if not image_features.is_floating_point():
        raise ValueError(f"image_features must be floating point, got dtype {image_features.dtype}")
    return image_features


def check_text_inputs(input_ids, attention_mask, text_config: PretrainedConfig) -> torch.Tensor:
    """Validate the shapes and types of [B, L] ``input_ids`` and their mask (all ones when
    ``None``); returns the mask. The ids may be no longer than the backbone's
    ``max_position_embeddings`` (when its config has them), or the embedding lookup fails deep in
    torch. That the ids lie in the vocabulary is the tokenizer's part (the processor's tokenizer
    must match the text backbone)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    max_length = getattr(text_config, "max_position_embeddings", None)
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(
            f"input_ids have {input_ids.shape[1]} tokens but the text backbone takes at most {max_length} "
            "(max_position_embeddings); the model's processor truncates"
        )
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    return attention_mask
