"""UARDA model configuration."""

from __future__ import annotations

from transformers import PretrainedConfig

from .backbones import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG, resolve_backbone_config
from .config_checks import check_number
from .cross_attention import AGGREGATIONS, DIRECTIONS, THRESHOLD_MODES

MAX_THRESHOLD_SAMPLES = 1 << 20


class UARDAConfig(PretrainedConfig):
    r"""Configuration of a [`UARDAModel`]: SCAN-style word–region cross attention whose relevance
    threshold is learned from the data (UARDA, IEEE TMM 24 (2022) 1320–1332).

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Vision backbone whose grid/patch token states are the image regions. Defaults to the
            small from-scratch ViT. Ignored when ``image_feature_dim`` is set.
        image_feature_dim (`int`, *optional*):
            Width of precomputed region features (e.g. 2048 for bottom-up-attention arrays of
            36 x 2048 per image, SCAN's data layout). When set, the model takes ``image_features``
            instead of ``pixel_values`` and has no vision backbone.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Text encoder whose token states are the words. Defaults to a small from-scratch BERT.
        embed_dim (`int`, defaults to 128):
            Shared dimension of region and word fragments.
        threshold_mode (`str`, defaults to ``"uarda"``):
            ``"uarda"``: learned relevance threshold (NAAF's negative–positive branches around
            it); ``"scan"``: SCAN's fixed zero threshold (LeakyReLU + normalisation), the
            baseline. The relevance threshold learns in both modes (scan mode does not score
            with it), so a SCAN-trained model can also be scored in uarda mode at the threshold
            its own similarities give.
        direction (`str`, defaults to ``"t2i"``): ``"t2i"``, ``"i2t"`` or ``"both"`` (summed).
        aggregation (`str`, defaults to ``"lse"``): pooling over queries, ``"lse"`` (SCAN's t2i
            setting) or ``"mean"`` (NAAF's; it trains randomly initialised towers far better,
            see benchmarks/README.md).
        lambda_softmax (`float`, *optional*): attention inverse temperature. Default: SCAN's 9
            (t2i) / 4 (i2t) in scan mode, NAAF's 20 (t2i; i2t keeps 4) in uarda mode.
        lambda_lse (`float`, *optional*): LogSumExp factor (SCAN: 6 t2i, 5 i2t).
        margin (`float`, defaults to 0.2): hinge margin of the triplet loss.
        max_violation (`bool`, defaults to `False`):
            Only the hardest in-batch negative counts (SCAN's setting, meant for pretrained region
            features); `False` sums over all negatives, which is what learns from randomly
            initialised towers (benchmarks/README.md).
        threshold_alpha (`float`, defaults to 2.0):
            The threshold solves N(t; relevant) = alpha * N(t; irrelevant) (NAAF).
        threshold_momentum (`float`, defaults to 0.7): weight of a new estimate in the update.
        threshold_min_samples (`int`, defaults to 256): word samples collected before the first fit
            (at most 2^20; the sample buffers hold max(2048, this) words each).
        initial_threshold (`float`, defaults to 0.0): SCAN's zero until the first fit.
        retrieval_threshold (`float`, *optional*):
            The threshold uarda mode scores with in eval mode (retrieval); ``None`` uses the
            learned one. Training always uses and updates the learned threshold, which this field
            never changes. A higher value skips more word queries (faster, and further from the
            trained scores); NAAF's test-time value is ``μ+ − 3σ+`` of the relevant similarities,
            i.e. ``model.relevance_threshold.relevant_mean - 3 * model.relevance_threshold.relevant_std``.
    """

    model_type = "uarda"
    sub_configs = {"vision_config": PretrainedConfig, "text_config": PretrainedConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        image_feature_dim: int | None = None,
        embed_dim: int = 128,
        threshold_mode: str = "uarda",
        direction: str = "t2i",
        aggregation: str = "lse",
        lambda_softmax: float | None = None,
        lambda_lse: float | None = None,
        margin: float = 0.2,
        max_violation: bool = False,
        threshold_alpha: float = 2.0,
        threshold_momentum: float = 0.7,
        threshold_min_samples: int = 256,
        initial_threshold: float = 0.0,
        retrieval_threshold: float | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.image_feature_dim = image_feature_dim
        self.vision_config = (
            None if image_feature_dim is not None
            else resolve_backbone_config(vision_config, DEFAULT_VISION_CONFIG, "vision_config")
        )
        self.text_config = resolve_backbone_config(text_config, DEFAULT_TEXT_CONFIG, "text_config")
        self.embed_dim = embed_dim
        self.threshold_mode = threshold_mode
        self.direction = direction
        self.aggregation = aggregation
        self.lambda_softmax = lambda_softmax
        self.lambda_lse = lambda_lse
        self.margin = margin
        self.max_violation = max_violation
        self.threshold_alpha = threshold_alpha
        self.threshold_momentum = threshold_momentum
        self.threshold_min_samples = threshold_min_samples
        self.initial_threshold = initial_threshold
        self.retrieval_threshold = retrieval_threshold
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_uarda()

    def validate_uarda(self):
        """Raise a ValueError that names the first invalid field."""
        choices = {"threshold_mode": THRESHOLD_MODES, "direction": DIRECTIONS, "aggregation": AGGREGATIONS}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        check_number("image_feature_dim", self.image_feature_dim, minimum=1, integer=True, optional=True)
        check_number("embed_dim", self.embed_dim, minimum=1, integer=True)
        for field in ("lambda_softmax", "lambda_lse"):  # None: SCAN's / NAAF's defaults
            check_number(field, getattr(self, field), minimum=0, exclusive_minimum=True, optional=True)
        check_number("margin", self.margin, minimum=0)
        if not isinstance(self.max_violation, bool):
            raise ValueError(f"max_violation must be True or False, got {self.max_violation!r}")
        check_number("threshold_alpha", self.threshold_alpha, minimum=0, exclusive_minimum=True)
        check_number("threshold_momentum", self.threshold_momentum, minimum=0, maximum=1, exclusive_minimum=True)
        # Sizes the relevance sample buffers (two float32 rings of at least this many words).
        check_number("threshold_min_samples", self.threshold_min_samples, minimum=2, maximum=MAX_THRESHOLD_SAMPLES, integer=True)
        check_number("initial_threshold", self.initial_threshold, minimum=-1, maximum=1)
        check_number("retrieval_threshold", self.retrieval_threshold, minimum=-1, maximum=1, optional=True)
        check_number("initializer_range", self.initializer_range, minimum=0, exclusive_minimum=True)

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict() if self.vision_config is not None else None
        output["text_config"] = self.text_config.to_dict()
        return output
