"""UARDA: Unified Adaptive Relevance Distinguishable Attention for image-text matching
(Zhang et al., IEEE TMM 24 (2022) 1320–1332, doi 10.1109/TMM.2022.3141603).

Words and image regions are projected to a shared space, and every (image, caption) pair is
scored by SCAN's word–region cross attention (``cross_attention.py``). UARDA's own idea is the
relevance threshold: instead of SCAN's fixed zero, the boundary that best separates the
distributions of relevant (matched) and irrelevant word–region similarities, learned during
training. Fragments below it take no part in the positive attention, and queries with no
fragment above it are skipped and penalised (NAAF's negative and positive branches, beside SCAN's
relevance scores). ``threshold_mode="scan"`` gives the SCAN baseline with the same class.

Read top to bottom: the threshold (Gaussian boundary, samples, estimator) -> the single-pair
attention for figures -> pretrained base -> outputs -> model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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
from .cross_attention import NAAF_LAMBDA_SOFTMAX, SCAN_LAMBDA_SOFTMAX, THRESHOLD_MODES, cross_attention_scores
from .losses import triplet_loss


# --------------------------------------------------------------------------------------------
# The relevance threshold, estimated as in NAAF (CrossmodalGroup/NAAF). Written in tensor ops, so
# that a training step reads no value back to the host.
# --------------------------------------------------------------------------------------------
def gaussian_boundary(mu_pos, std_pos, mu_neg, std_neg, alpha: float = 2.0) -> torch.Tensor:
    r"""Threshold ``t`` with ``N(t; μ+, σ+) = α · N(t; μ−, σ−)`` (NAAF's closed form), a 0-d
    float64 tensor (the arguments may be floats or 0-d tensors).

    Taking logs and multiplying by ``2σ+²σ−²`` gives ``q(t) = A t² + B t + C = 0`` with::

        A = σ+² − σ−²
        B = 2 (μ+ σ−² − μ− σ+²)
        C = (μ− σ+)² − (μ+ σ−)² + 2 (σ+ σ−)² ln(σ− / (α σ+))

    and ``q(t) = 2σ+²σ−² · (ln N(t;μ+,σ+) − ln N(t;μ−,σ−) − ln α)``. The boundary is the root where
    ``q`` crosses zero upwards (the relevant density overtakes α x the irrelevant one as ``t``
    grows), ``t = (−B + √(B² − 4AC)) / 2A``, NAAF's formula: the larger root when σ+ > σ−, the
    smaller when σ+ < σ− (the larger then lies above μ+, where the wider irrelevant tail wins
    again). When ``B > 0`` it is evaluated as ``−2C / (B + √(B² − 4AC))``, free of cancellation,
    which also covers σ+ = σ− (``A = 0``: the linear solution ``−C/B``).

    Falls back to the midpoint of the means (0 if that is not finite) when an input is not
    finite, a σ is (nearly) zero, there is no real root or no upward crossing.
    """
    mu_p, sd_p, mu_n, sd_n = (torch.as_tensor(v, dtype=torch.float64) for v in (mu_pos, std_pos, mu_neg, std_neg))
    midpoint = 0.5 * (mu_p + mu_n)
    var_p, var_n = sd_p.square(), sd_n.square()
    a = var_p - var_n
    b = 2.0 * (mu_p * var_n - mu_n * var_p)
    c = (mu_n * sd_p).square() - (mu_p * sd_n).square() + 2.0 * var_p * var_n * torch.log(sd_n / (alpha * sd_p))
    disc = b.square() - 4.0 * a * c
    root = disc.clamp_min(0.0).sqrt()
    upward = torch.where(b > 0, -2.0 * c / (b + root), (-b + root) / (2.0 * a))
    no_crossing = (b <= 0) & (a.abs() <= 1e-12 * torch.maximum(var_p, var_n))  # A = 0, B <= 0
    degenerate = (sd_p < 1e-6) | (sd_n < 1e-6) | (disc < 0) | no_crossing | ~torch.isfinite(upward)
    boundary = torch.where(degenerate, midpoint, upward)
    return torch.where(torch.isfinite(boundary), boundary, torch.zeros_like(boundary))


@torch.no_grad()
def relevance_samples(
    image_fragments: torch.Tensor,
    text_fragments: torch.Tensor,
    text_mask: Optional[torch.Tensor],
    scores: torch.Tensor,
    negative: str = "easiest",
    only_correct: bool = False,
    positive_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevant and irrelevant word–region similarity samples of a training batch.

    The batch pairs image ``b`` with caption ``b`` (``N_i == N_t``; repeat images for several
    captions per image). For every real word of caption ``b``:

    * relevant sample: ``max_j s_ij`` against its own image ``b``;
    * irrelevant sample: ``max_j s_ij`` against the negative image, the lowest-scoring other
      image (``negative="easiest"``, NAAF's choice and UARDAModel's) or the highest-scoring one
      (``"hardest"``). Early in training the hardest negative often outscores the match, which
      would put the boundary above every relevant similarity.

    Args:
        image_fragments: ``[B, R, D]``.
        text_fragments: ``[B, L, D]``.
        text_mask: ``[B, L]`` or ``None``.
        scores: ``[B, B]`` image x caption scores of the batch (they pick the negatives).
        negative: ``"hardest"`` or ``"easiest"``.
        only_correct: keep only captions whose best image is their own (NAAF's mismatch mining).
        positive_mask: ``[B, B]`` bool, True where image ``i`` matches caption ``c`` (default: the
            diagonal). Give it when the batch repeats an image, so that a copy of the own image
            is never taken as the negative.

    Returns:
        ``(relevant [B, L], irrelevant [B, L])``, detached, NaN in every slot that holds no
        sample (padding words; with ``only_correct`` the captions left out), which
        :meth:`RelevanceThreshold.update` skips. Dense, not compacted: a compacted tensor's size
        would have to be read back to the host on every training step.
    """
    batch, _, dim = image_fragments.shape
    if tuple(text_fragments.shape[::2]) != (batch, dim) or tuple(scores.shape) != (batch, batch):
        raise ValueError(
            "relevance_samples expects a square batch where image b matches caption b: got images "
            f"{tuple(image_fragments.shape)}, captions {tuple(text_fragments.shape)}, scores {tuple(scores.shape)}"
        )
    if batch < 2:
        raise ValueError("relevance_samples needs at least 2 pairs (one negative per caption)")
    if negative not in ("hardest", "easiest"):
        raise ValueError(f"negative must be 'hardest' or 'easiest', got {negative!r}")
    s = scores.detach()  # [B_img, B_txt]
    diag = torch.eye(batch, dtype=torch.bool, device=s.device)
    if positive_mask is None:
        positive_mask = diag
    elif tuple(positive_mask.shape) != (batch, batch):
        raise ValueError(f"positive_mask must be [{batch}, {batch}], got {tuple(positive_mask.shape)}")
    else:  # a mask given by the caller (not the model's training step) is checked by value
        positive_mask = positive_mask.to(device=s.device, dtype=torch.bool) | diag
        if bool(positive_mask.all(dim=0).any()):
            raise ValueError("every caption needs at least one negative image in the batch")
    if negative == "hardest":
        neg_image = s.masked_fill(positive_mask, float("-inf")).argmax(dim=0)  # [B]
    else:
        neg_image = s.masked_fill(positive_mask, float("inf")).argmin(dim=0)  # [B]
    words, regions = text_fragments.detach(), image_fragments.detach()
    # Best region per word, against the own image and against the negative image: [B, L]
    pos = torch.einsum("bld,brd->blr", words, regions).amax(dim=-1)
    neg = torch.einsum("bld,brd->blr", words, regions[neg_image.to(regions.device)]).amax(dim=-1)
    keep = torch.ones_like(pos, dtype=torch.bool) if text_mask is None else text_mask.to(pos.device) != 0  # [B, L]
    if only_correct:
        keep = keep & (s.argmax(dim=0) == torch.arange(batch, device=s.device)).to(keep.device).unsqueeze(1)
    return pos.masked_fill(~keep, float("nan")), neg.masked_fill(~keep, float("nan"))


class RelevanceThreshold(nn.Module):
    """UARDA's learned relevance threshold, estimated as in NAAF.

    During training (``self.training``), :meth:`update` collects relevant and irrelevant
    similarity samples (see :func:`relevance_samples`) into ring buffers of the most recent
    ``capacity`` values. Once ``min_samples`` of each are there, every update fits a Gaussian to
    each buffer, solves ``N(t; μ+, σ+) = α N(t; μ−, σ−)`` (:func:`gaussian_boundary`), clips to
    ``clip`` and moves the threshold::

        threshold <- update_weight · estimate + (1 − update_weight) · threshold   (0.7 / 0.3)

    The first estimate is taken directly. The threshold moves only while the relevant mean lies
    above the irrelevant one (before that there is no boundary between them to learn from); the
    fitted means and standard deviations are recorded either way. In eval mode nothing changes.
    All state lives in buffers (saved in the state dict, never trained by gradient).

    Buffers: ``threshold``, ``relevant_mean``, ``relevant_std``, ``irrelevant_mean``,
    ``irrelevant_std``, ``relevant_samples``, ``irrelevant_samples`` (``[capacity]``; the first
    ``min(seen, capacity)`` slots are filled), ``relevant_seen``, ``irrelevant_seen`` (samples
    pushed so far) and ``num_updates``.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        update_weight: float = 0.7,
        min_samples: int = 256,
        capacity: int = 2048,
        init_threshold: float = 0.0,
        clip: Tuple[float, float] = (-1.0, 1.0),
    ):
        super().__init__()
        if capacity < min_samples or min_samples < 2:
            raise ValueError(f"need 2 <= min_samples <= capacity, got min_samples={min_samples}, capacity={capacity}")
        if not 0.0 < update_weight <= 1.0:
            raise ValueError(f"update_weight must be in (0, 1], got {update_weight}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)
        self.update_weight = float(update_weight)
        self.min_samples = int(min_samples)
        self.capacity = int(capacity)
        self.clip = (float(clip[0]), float(clip[1]))
        self.register_buffer("threshold", torch.tensor(float(init_threshold)))
        for name in ("relevant_mean", "relevant_std", "irrelevant_mean", "irrelevant_std"):
            self.register_buffer(name, torch.tensor(float("nan")))
        self.register_buffer("relevant_samples", torch.zeros(self.capacity))
        self.register_buffer("irrelevant_samples", torch.zeros(self.capacity))
        self.register_buffer("relevant_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("irrelevant_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def forward(self) -> torch.Tensor:
        """The current threshold (0-d tensor)."""
        return self.threshold

    def extra_repr(self) -> str:
        return (
            f"threshold={float(self.threshold):.4f}, alpha={self.alpha}, update_weight={self.update_weight}, "
            f"min_samples={self.min_samples}, capacity={self.capacity}, clip={self.clip}"
        )

    @torch.no_grad()
    def update(self, relevant: torch.Tensor, irrelevant: torch.Tensor) -> torch.Tensor:
        """Add samples and, once enough are collected, move the threshold.

        Args:
            relevant: similarities of words against their matched image (any shape; non-finite
                values, e.g. :func:`relevance_samples`' NaN slots, are skipped).
            irrelevant: similarities of words against a negative image (same).

        Returns:
            A 0-d bool tensor: whether the threshold moved (always False in eval mode).
        """
        if not self.training:
            return torch.zeros((), dtype=torch.bool, device=self.threshold.device)
        self._push(self.relevant_samples, self.relevant_seen, relevant)
        self._push(self.irrelevant_samples, self.irrelevant_seen, irrelevant)
        mu_p, sd_p, n_rel = self._moments(self.relevant_samples, self.relevant_seen)
        mu_n, sd_n, n_irr = self._moments(self.irrelevant_samples, self.irrelevant_seen)
        fitted = (n_rel >= self.min_samples) & (n_irr >= self.min_samples)
        for buffer, value in ((self.relevant_mean, mu_p), (self.relevant_std, sd_p),
                              (self.irrelevant_mean, mu_n), (self.irrelevant_std, sd_n)):
            buffer.copy_(torch.where(fitted, value, buffer))
        moved = fitted & (mu_p > mu_n)
        estimate = gaussian_boundary(mu_p, sd_p, mu_n, sd_n, self.alpha).clamp(*self.clip)
        smoothed = self.update_weight * estimate + (1.0 - self.update_weight) * self.threshold
        estimate = torch.where(self.num_updates > 0, smoothed, estimate)  # the first estimate as it is
        self.threshold.copy_(torch.where(moved, estimate, self.threshold))
        self.num_updates += moved.long()
        return moved

    def _push(self, buffer: torch.Tensor, seen: torch.Tensor, values: torch.Tensor) -> None:
        """Append the finite ``values`` to the ring ``buffer``; ``seen`` counts all pushes."""
        values = values.detach().reshape(-1).to(buffer)
        keep = torch.isfinite(values)  # [n]
        rank = keep.cumsum(0) - 1  # [n] position among the kept values
        n_new = keep.sum()
        keep &= rank >= n_new - self.capacity  # only the most recent `capacity` values can stay
        # Every other value goes to one extra slot past the end, which is then dropped.
        slot = torch.where(keep, (seen + rank) % self.capacity, self.capacity)  # [n]
        ring = torch.cat([buffer, buffer.new_zeros(1)]).index_put_((slot,), values)
        buffer.copy_(ring[:-1])
        seen += n_new

    def _moments(self, buffer: torch.Tensor, seen: torch.Tensor):
        """Mean, unbiased standard deviation (float64) and count of the filled slots of ``buffer``."""
        n = seen.clamp(max=self.capacity)
        filled = torch.arange(self.capacity, device=buffer.device) < n  # [capacity]
        values = buffer.double()
        mean = (values * filled).sum() / n.clamp_min(1)
        var = ((values - mean) * filled).square().sum() / (n - 1).clamp_min(1)
        return mean, var.sqrt(), n


@torch.no_grad()
def word_region_attention(
    image_fragments: torch.Tensor,
    text_fragments: torch.Tensor,
    text_mask: Optional[torch.Tensor] = None,
    *,
    lambda_softmax: Optional[float] = None,
    threshold_mode: str = "scan",
    threshold=0.0,
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Text-to-image attention of ONE pair, for figures: what each word looks at.

    Args:
        image_fragments: ``[R, D]`` regions of one image.
        text_fragments: ``[L, D]`` words of one caption.
        text_mask: ``[L]`` real-word mask, or ``None``.
        lambda_softmax: the t2i λ (``None``: SCAN's 9 in scan mode, NAAF's 20 in uarda mode).
        threshold_mode, threshold, eps: as in ``cross_attention_scores``.

    Returns:
        ``(attention [L, R], relevant [L, R])``: the attention weights that
        ``cross_attention_scores`` uses in the t2i direction (in uarda mode those of the positive
        branch, over the relevant regions), and the mask of relevant fragments (``s > t``; all
        True in scan mode). Rows of padding words, and in uarda mode of skipped words, are zero.
    """
    if image_fragments.dim() != 2 or text_fragments.dim() != 2:
        raise ValueError(
            "word_region_attention takes one pair: image [R, D] and text [L, D], got "
            f"{tuple(image_fragments.shape)} and {tuple(text_fragments.shape)}"
        )
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
    if lambda_softmax is None:
        lambda_softmax = (NAAF_LAMBDA_SOFTMAX if threshold_mode == "uarda" else SCAN_LAMBDA_SOFTMAX)["t2i"]
    real = torch.ones(text_fragments.shape[0], dtype=torch.bool) if text_mask is None else text_mask.reshape(-1) != 0
    real = real.to(text_fragments.device).unsqueeze(1)  # [L, 1]
    sim = text_fragments @ image_fragments.T  # [L, R]
    if threshold_mode == "scan":
        x = F.leaky_relu(sim, 0.1) * real  # [L, R]
        logits = x * (lambda_softmax / (x.square().sum(dim=0, keepdim=True).sqrt() + eps))  # normalised over the words
        relevant = torch.ones_like(sim, dtype=torch.bool)
    else:
        relevant = sim > threshold  # [L, R]
        logits = (lambda_softmax * (sim - threshold)).masked_fill(~relevant, float("-inf"))
    attended = relevant.any(dim=1, keepdim=True) & real  # [L, 1]
    attention = torch.softmax(logits.masked_fill(~attended, 0.0), dim=-1) * attended  # [L, R]
    return attention, relevant & real


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
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
        threshold: the relevance threshold these scores used (0-d): in uarda mode the learned one
            before this call's update (``config.retrieval_threshold`` instead in eval mode when
            set), in scan mode SCAN's 0.
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
    scores for a batch. In uarda mode, eval mode scores with ``config.retrieval_threshold`` when it
    is set (a threshold of the user's choosing, see ``UARDAConfig``) and with the learned one
    otherwise; training always uses the learned one, and setting a retrieval threshold never
    changes it.
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

    def scoring_threshold(self) -> torch.Tensor:
        """The threshold uarda mode scores with (0-d): ``config.retrieval_threshold`` in eval mode
        when it is set, else the learned ``relevance_threshold.threshold``."""
        if not self.training and self.config.retrieval_threshold is not None:
            return self.relevance_threshold.threshold.new_tensor(self.config.retrieval_threshold)
        return self.relevance_threshold.threshold

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
        as NAAF trains (see ``cross_attention_scores``). The threshold is :meth:`scoring_threshold`."""
        # In float32 whatever the autocast dtype: the attention mixes products (which autocast
        # lowers) with softmaxes and sums (which it keeps in float32), and the cosines need it.
        image_fragments = image_encoding.image_fragments
        with torch.autocast(device_type=image_fragments.device.type, enabled=False):
            return cross_attention_scores(
                image_fragments.float(),
                text_encoding.text_fragments.float(),
                text_encoding.text_mask,
                direction=self.config.direction,
                aggregation=self.config.aggregation,
                lambda_softmax=self.config.lambda_softmax,
                lambda_lse=self.config.lambda_lse,
                threshold_mode=self.config.threshold_mode,
                threshold=self.scoring_threshold(),
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
        negative_input_ids: Optional[torch.LongTensor] = None,
        negative_attention_mask: Optional[torch.Tensor] = None,
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
            negative_input_ids, negative_attention_mask: [N', L'] hard negative captions (NegCLIP;
                see ``hf_mvam.data.hard_negatives``): with ``return_loss``, extra caption negatives
                of every image in the triplet loss, never queries; not in the logits.
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
        threshold = self.scoring_threshold().clone()
        if self.config.threshold_mode == "scan":
            threshold.zero_()
        loss = None
        if return_loss:
            negative_scores = None
            if negative_input_ids is not None:
                negatives = self.encode_texts(negative_input_ids, negative_attention_mask)
                negative_scores = self.score(images, negatives)  # [N_i, N']
            loss = triplet_loss(scores, self.config.margin, self.config.max_violation, negative_scores)
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
            threshold=self.scoring_threshold(),
        )


__all__ = [
    "UARDAModel",
    "UARDAPreTrainedModel",
    "UARDAImageEncoding",
    "UARDATextEncoding",
    "UARDAOutput",
    "RelevanceThreshold",
    "gaussian_boundary",
    "relevance_samples",
    "word_region_attention",
]
