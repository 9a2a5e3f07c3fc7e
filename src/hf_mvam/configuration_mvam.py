"""MVAM model configuration."""

from __future__ import annotations

from transformers import PretrainedConfig

from .backbones import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG, resolve_backbone_config
from .config_checks import check_number


class MVAMConfig(PretrainedConfig):
    r"""Configuration of an [`MVAMModel`]: a two-stream (CLIP-like) dual encoder whose image and text
    towers each end in ``num_views`` attention-pooling heads with learned view codes
    (MVAM, arXiv 2402.17237).

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Any transformers vision backbone (CLIP vision tower, ViT, ResNet, ConvNeXt, ...), as a
            config or a dict with ``model_type``. Defaults to a small from-scratch ViT (64 px).
            Ignored when ``image_feature_dim`` is set.
        image_feature_dim (`int`, *optional*):
            Width of precomputed region features (e.g. 36 x 2048 bottom-up-attention arrays per
            image, SCAN's data layout). When set, the model takes ``image_features`` instead of
            ``pixel_values``, has no vision backbone, and the image view codes attend over the
            regions as they would over patches.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Any transformers text encoder (CLIP text tower, BERT-like, ...). Defaults to a small
            from-scratch 2-layer BERT.
        num_views (`int`, defaults to 4):
            K, the number of view codes per modality. ``num_views=1`` with ``diversity_weight=0`` is
            a plain CLIP-style single-vector dual encoder (the baseline).
        projection_dim (`int`, defaults to 128):
            Width of *each view* vector (unlike CLIPConfig's ``projection_dim``, this is not the
            retrieval embedding's width: that is :attr:`embedding_dim`).
        diversity_weight (`float`, defaults to 0.1):
            Weight of the diversity objective (overlap between the views' attention distributions).
        logit_scale_init_value (`float`, defaults to 2.6592):
            Initial log of the contrastive temperature's inverse, as in CLIP (ln(1/0.07)).
        initializer_range (`float`, defaults to 0.02):
            Std of the normal initialisation of the view codes and projections.

    Attributes:
        embedding_dim (`int`): width of the retrieval embedding (``image_embeds``, ``text_embeds``
            and ``get_*_features(...).pooler_output``): ``num_views * projection_dim``, the size of
            a vector index. Written to config.json for readers; it follows the two options.
    """

    model_type = "mvam"
    sub_configs = {"vision_config": PretrainedConfig, "text_config": PretrainedConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        image_feature_dim: int | None = None,
        num_views: int = 4,
        projection_dim: int = 128,
        diversity_weight: float = 0.1,
        logit_scale_init_value: float = 2.6592,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        stated_embedding_dim = kwargs.pop("embedding_dim", None)  # as config.json states it
        self.image_feature_dim = image_feature_dim
        self.vision_config = (
            None if image_feature_dim is not None
            else resolve_backbone_config(vision_config, DEFAULT_VISION_CONFIG, "vision_config")
        )
        self.text_config = resolve_backbone_config(text_config, DEFAULT_TEXT_CONFIG, "text_config")
        self.num_views = num_views
        self.projection_dim = projection_dim
        self.diversity_weight = diversity_weight
        self.logit_scale_init_value = logit_scale_init_value
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_mvam()
        if stated_embedding_dim is not None and stated_embedding_dim != self.embedding_dim:
            raise ValueError(
                f"embedding_dim is num_views * projection_dim = {self.embedding_dim}, got {stated_embedding_dim}"
            )

    @property
    def embedding_dim(self) -> int:
        """Width of the retrieval embedding: ``num_views * projection_dim``."""
        return self.num_views * self.projection_dim

    def validate_mvam(self):
        """Raise a ValueError that names the first invalid field."""
        check_number("image_feature_dim", self.image_feature_dim, minimum=1, integer=True, optional=True)
        check_number("num_views", self.num_views, minimum=1, integer=True)
        check_number("projection_dim", self.projection_dim, minimum=1, integer=True)
        check_number("diversity_weight", self.diversity_weight, minimum=0)
        check_number("logit_scale_init_value", self.logit_scale_init_value)
        check_number("initializer_range", self.initializer_range, minimum=0, exclusive_minimum=True)

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict() if self.vision_config is not None else None
        output["text_config"] = self.text_config.to_dict()
        output["embedding_dim"] = self.embedding_dim
        return output
