"""A small region encoder: the offline stand-in for bottom-up-attention (BUTD) Faster R-CNN features.

SCAN, NAAF and UARDA score 36 precomputed regions per image, detected and described by a Faster
R-CNN that was pretrained on Visual Genome objects and attributes (Anderson et al., CVPR 2018).
Nothing can be downloaded here, so this module builds the same kind of features from scratch:

* a small CNN gives a stride-4 feature map of the whole image;
* **stage 1** (BUTD's RPN): a dense, fixed set of multi-scale candidate boxes (~6,200 at 64 px)
  is pooled cheaply (RoIAlign, 2 x 2 bins of a narrow map) and scored for objectness; greedy NMS
  at IoU 0.7 over the best 600 keeps ``num_proposals`` (100);
* **stage 2** (BUTD's RoI head): a box is pooled finely (3 x 3 bins x 2 x 2 samples) and two fully
  connected layers give its embedding (width ``embed_dim``) and logits for objectness and the
  object's attributes (shape, colour, size);
* greedy NMS at IoU 0.3 picks ``num_regions`` (36) regions: the proposals by stage-2 objectness
  first (the objects, then crops near them), then the other candidates by stage-1 objectness
  (background crops elsewhere), as BUTD's fixed-36 features hold the objects and then whatever
  else the detector saw;
* each region's feature is its embedding followed by its box geometry ``(x0/W, y0/H, x1/W,
  y1/H, area/(W*H))``, as position-aware SCAN variants use: relations need where things are.

Two stages, because the fine head costs ~28 ms an image over every candidate on this CPU (five
minutes for the synthetic benchmark), the cheap stage ~1 ms.

Pretraining (:func:`train_region_encoder`) uses the synthetic benchmark's object labels, as BUTD
used Visual Genome's: jittered ground-truth boxes (IoU > 0.7) labelled with their attributes, and
background boxes (IoU < 0.3 with every object: random ones and crops that overlap objects in
part) labelled background. Detection (:meth:`RegionEncoderModel.detect`) needs
no ground truth: the features exist for any image. :func:`evaluate_region_encoder` measures
detector recall and attribute accuracy on held-out images.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates of the encoder's square input
(``image_size`` x ``image_size``; images are resized to it): pixel ``i`` spans ``[i, i + 1)``, so the
synthetic benchmark's half-open integer boxes are used as they are.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .image_loading import load_image

__all__ = [
    "GEOMETRY_NAMES",
    "RegionDetections",
    "RegionEncoderConfig",
    "RegionEncoderModel",
    "RegionEncoderOutput",
    "batched_nms",
    "box_geometry",
    "box_iou",
    "candidate_boxes",
    "evaluate_region_encoder",
    "images_to_pixel_values",
    "roi_align",
    "sample_training_boxes",
    "scene_labels",
    "train_region_encoder",
]

#: The box geometry appended to every region feature, in this order.
GEOMETRY_NAMES = ("x0/W", "y0/H", "x1/W", "y1/H", "area/(W*H)")
IGNORE_INDEX = -100  # attribute labels of background boxes


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def box_iou(boxes1, boxes2):
    """Intersection over union of ``[..., 4]`` boxes (torch tensors or numpy arrays), broadcast
    over the leading axes."""
    xp = np if isinstance(boxes1, np.ndarray) else torch
    x0 = xp.maximum(boxes1[..., 0], boxes2[..., 0])
    y0 = xp.maximum(boxes1[..., 1], boxes2[..., 1])
    x1 = xp.minimum(boxes1[..., 2], boxes2[..., 2])
    y1 = xp.minimum(boxes1[..., 3], boxes2[..., 3])
    intersection = (x1 - x0).clip(min=0) * (y1 - y0).clip(min=0)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    return intersection / (area1 + area2 - intersection).clip(min=1e-12)


def box_geometry(boxes: torch.Tensor, width: float | torch.Tensor, height: float | torch.Tensor) -> torch.Tensor:
    """``[..., 5]`` geometry ``(x0/W, y0/H, x1/W, y1/H, area/(W*H))`` of ``[..., 4]`` boxes in an
    image of ``width`` x ``height`` pixels (scalars, or tensors broadcasting against ``boxes[..., 0]``)."""
    width = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    height = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    x0, y0, x1, y1 = (boxes[..., 0] / width, boxes[..., 1] / height, boxes[..., 2] / width, boxes[..., 3] / height)
    return torch.stack([x0, y0, x1, y1, (x1 - x0) * (y1 - y0)], dim=-1)


def candidate_boxes(image_size: int, sides: Sequence[float], aspect_ratios: Sequence[float], stride: float) -> torch.Tensor:
    """The dense candidate set ``[K, 4]`` of a square ``image_size`` image: for every side (a
    fraction of the image) and aspect ratio (width / height, area kept), boxes on a regular grid
    whose step is ``stride`` times the box's side (at least one pixel), spread from one edge of the
    image to the other."""
    boxes = []
    for side in sides:
        for ratio in aspect_ratios:
            width = min(image_size, side * image_size * math.sqrt(ratio))
            height = min(image_size, side * image_size / math.sqrt(ratio))
            step = max(1.0, stride * side * image_size)
            xs = torch.linspace(0, image_size - width, math.ceil((image_size - width) / step) + 1)
            ys = torch.linspace(0, image_size - height, math.ceil((image_size - height) / step) + 1)
            y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
            boxes.append(torch.stack([x0, y0, x0 + width, y0 + height], dim=-1).reshape(-1, 4))
    return torch.cat(boxes)


def roi_align(
    features: torch.Tensor, boxes: torch.Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 2
) -> torch.Tensor:
    """RoIAlign (He et al., Mask R-CNN; torchvision's ``roi_align(aligned=True)``) with public torch.

    Each box is cut into ``output_size`` x ``output_size`` bins; a bin's value is the mean of
    ``sampling_ratio`` x ``sampling_ratio`` evenly spaced bilinear samples of the feature map.

    Args:
        features: ``[B, C, H, W]`` feature map.
        boxes: ``[B, K, 4]`` boxes of each image, in input pixels; they should lie inside the image
            (samples beyond the map's edge take its border value).
        spatial_scale: feature cells per input pixel (1/4 for a stride-4 map).

    Returns:
        ``[B, K, C, output_size, output_size]``.
    """
    batch, channels, height, width = features.shape
    num_boxes = boxes.shape[1]
    samples = output_size * sampling_ratio
    # Sample positions as fractions of the box: bin-major, sampling_ratio samples per bin.
    steps = (torch.arange(samples, dtype=features.dtype, device=features.device) + 0.5) / samples  # [S]
    scaled = boxes.to(features.dtype) * spatial_scale
    xs = scaled[..., 0:1] + (scaled[..., 2:3] - scaled[..., 0:1]) * steps  # [B, K, S] in feature cells
    ys = scaled[..., 1:2] + (scaled[..., 3:4] - scaled[..., 1:2]) * steps  # [B, K, S]
    # grid_sample with align_corners=False: -1 and +1 are the outer edges of the map, so cell i
    # spans [i, i + 1) as the box coordinates do.
    grid_x = (2 * xs / width - 1)[:, :, None, :].expand(-1, -1, samples, -1)  # [B, K, S(y), S(x)]
    grid_y = (2 * ys / height - 1)[:, :, :, None].expand(-1, -1, -1, samples)  # [B, K, S(y), S(x)]
    grid = torch.stack([grid_x, grid_y], dim=-1).reshape(batch, num_boxes * samples, samples, 2)
    pooled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if sampling_ratio > 1:
        pooled = F.avg_pool2d(pooled, sampling_ratio)  # [B, C, K*P, P]: each bin's mean
    return pooled.view(batch, channels, num_boxes, output_size, output_size).transpose(1, 2)  # [B, K, C, P, P]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy non-maximum suppression of every image at once, stopped after ``max_keep`` boxes.

    Step t picks, in every image, the highest-scoring box that no kept box overlaps by more than
    ``iou_threshold`` and suppresses the boxes it overlaps: exactly the classic loop, run for the
    whole batch in ``max_keep`` vectorised steps. When an image runs out of unsuppressed boxes,
    the rest of its ``max_keep`` are the best suppressed ones (so every image keeps the same
    number, as BUTD's fixed-36 features do).

    Args:
        boxes: ``[B, K, 4]``, or ``[K, 4]`` shared by every image.
        scores: ``[B, K]``.

    Returns:
        ``(indices, survived)``: ``[B, max_keep]`` indices into K in the order kept, and a
        ``[B, max_keep]`` mask, False for the fill-ins that NMS had suppressed.
    """
    batch, count = scores.shape
    if not 0 < max_keep <= count:
        raise ValueError(f"max_keep must be in [1, {count}] (the number of boxes), got {max_keep}")
    boxes = boxes.expand(batch, count, 4) if boxes.dim() == 2 else boxes
    rows = torch.arange(batch, device=scores.device)
    suppressed = torch.zeros_like(scores, dtype=torch.bool)
    taken = torch.zeros_like(scores, dtype=torch.bool)
    # Any unsuppressed box outranks every suppressed one; taken boxes are never picked again.
    offset = (scores.max() - scores.min()).detach() + 1
    indices, survived = [], []
    for _ in range(max_keep):
        priority = (scores - offset * suppressed).masked_fill(taken, float("-inf"))  # [B, K]
        best = priority.argmax(dim=1)  # [B]
        survived.append(~suppressed[rows, best])
        indices.append(best)
        taken[rows, best] = True
        overlap = box_iou(boxes[rows, best][:, None, :], boxes)  # [B, K]
        suppressed |= overlap > iou_threshold
    return torch.stack(indices, dim=1), torch.stack(survived, dim=1)


# --------------------------------------------------------------------------------------------
# Configuration and model
# --------------------------------------------------------------------------------------------


class RegionEncoderConfig(PretrainedConfig):
    r"""Configuration of a [`RegionEncoderModel`].

    Args:
        image_size (`int`, defaults to 64): side of the square input; images are resized to it.
        channels (`list[int]`, defaults to `[32, 64, 128]`): widths of the CNN's three stages;
            stages after the first halve the resolution, so the feature map has stride 4.
        proposal_channels (`int`, defaults to 32): width of the narrow map stage 1 pools.
        hidden_size (`int`, defaults to 256): width of the RoI head's first layer.
        embed_dim (`int`, defaults to 128): width F of a region's embedding; a region feature has
            F + 5 numbers (the embedding, then its box geometry).
        pool_size (`int`, defaults to 3): RoIAlign bins per side in stage 2 (stage 1 uses 2).
        sampling_ratio (`int`, defaults to 2): bilinear samples per bin side in stage 2 (stage 1: 1).
        shape_names, colour_names, size_names (`list[str]`): the attribute classes, in logit order.
        candidate_sides (`list[float]`): sides of the candidate boxes as fractions of the image
            side (default: 1/8 to 0.8, three scales an octave).
        candidate_aspect_ratios (`list[float]`, defaults to `[1.0, 0.5, 2.0]`): width / height.
        candidate_stride (`float`, defaults to 0.25): grid step of the candidates, as a fraction of
            their side.
        pre_nms_top_n (`int`, defaults to 600): best-scoring candidates stage 1's NMS looks at.
        num_proposals (`int`, defaults to 100): boxes stage 1 passes to stage 2.
        proposal_iou_threshold (`float`, defaults to 0.7): stage 1's NMS threshold (BUTD's RPN).
        num_regions (`int`, defaults to 36): regions kept per image (BUTD's fixed 36).
        nms_iou_threshold (`float`, defaults to 0.3): NMS threshold of the region pick (BUTD's test setting).
        image_mean, image_std (`list[float]`): per-channel normalisation of pixels in [0, 1].
    """

    model_type = "hf_mvam_region_encoder"

    def __init__(
        self,
        image_size: int = 64,
        channels: Sequence[int] = (32, 64, 128),
        proposal_channels: int = 32,
        hidden_size: int = 256,
        embed_dim: int = 128,
        pool_size: int = 3,
        sampling_ratio: int = 2,
        shape_names: Sequence[str] = (),
        colour_names: Sequence[str] = (),
        size_names: Sequence[str] = (),
        candidate_sides: Sequence[float] = tuple(round(2 ** (k / 3) / 8, 4) for k in range(9)),
        candidate_aspect_ratios: Sequence[float] = (1.0, 0.5, 2.0),
        candidate_stride: float = 0.25,
        pre_nms_top_n: int = 600,
        num_proposals: int = 100,
        proposal_iou_threshold: float = 0.7,
        num_regions: int = 36,
        nms_iou_threshold: float = 0.3,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        **kwargs,
    ):
        self.image_size = image_size
        self.channels = list(channels)
        self.proposal_channels = proposal_channels
        self.hidden_size = hidden_size
        self.embed_dim = embed_dim
        self.pool_size = pool_size
        self.sampling_ratio = sampling_ratio
        self.shape_names = list(shape_names)
        self.colour_names = list(colour_names)
        self.size_names = list(size_names)
        self.candidate_sides = [float(s) for s in candidate_sides]
        self.candidate_aspect_ratios = [float(r) for r in candidate_aspect_ratios]
        self.candidate_stride = candidate_stride
        self.pre_nms_top_n = pre_nms_top_n
        self.num_proposals = num_proposals
        self.proposal_iou_threshold = proposal_iou_threshold
        self.num_regions = num_regions
        self.nms_iou_threshold = nms_iou_threshold
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("image_size", "proposal_channels", "hidden_size", "embed_dim", "pool_size", "sampling_ratio",
                     "pre_nms_top_n", "num_proposals", "num_regions"):
            positive_int(name)
        if len(self.channels) < 1 or any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {self.channels!r}")
        if self.image_size % self.stride:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of the CNN's stride {self.stride}")
        if not self.candidate_sides or any(not 0 < s <= 1 for s in self.candidate_sides):
            raise ValueError(f"candidate_sides must be fractions in (0, 1], got {self.candidate_sides!r}")
        if not self.candidate_aspect_ratios or any(r <= 0 for r in self.candidate_aspect_ratios):
            raise ValueError(f"candidate_aspect_ratios must be positive, got {self.candidate_aspect_ratios!r}")
        if not 0 < self.candidate_stride <= 1:
            raise ValueError(f"candidate_stride must be in (0, 1], got {self.candidate_stride!r}")
        for name in ("proposal_iou_threshold", "nms_iou_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not self.num_regions <= self.num_proposals <= self.pre_nms_top_n:
            raise ValueError(
                f"need num_regions ({self.num_regions}) <= num_proposals ({self.num_proposals}) <= pre_nms_top_n "
                f"({self.pre_nms_top_n})"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std must be three numbers each (std > 0)")

    @property
    def stride(self) -> int:
        """Input pixels per feature-map cell."""
        return 2 ** (len(self.channels) - 1)

    @property
    def num_labels_per_attribute(self) -> dict[str, int]:
        return {"shape": len(self.shape_names), "colour": len(self.colour_names), "size": len(self.size_names)}

    @property
    def feature_dim(self) -> int:
        """Width of a region feature: the embedding, then the box geometry."""
        return self.embed_dim + len(GEOMETRY_NAMES)


@dataclass
class RegionEncoderOutput(ModelOutput):
    """Output of [`RegionEncoderModel`] for given boxes.

    Args:
        loss: with labels, the sum of both objectness losses and the attribute losses.
        proposal_logits: ``[B, K]`` stage-1 objectness.
        objectness_logits: ``[B, K]`` stage-2 objectness (object vs background).
        shape_logits, colour_logits, size_logits: ``[B, K, classes]``.
        region_embeds: ``[B, K, embed_dim]``.
    """

    loss: Optional[torch.FloatTensor] = None
    proposal_logits: Optional[torch.FloatTensor] = None
    objectness_logits: Optional[torch.FloatTensor] = None
    shape_logits: Optional[torch.FloatTensor] = None
    colour_logits: Optional[torch.FloatTensor] = None
    size_logits: Optional[torch.FloatTensor] = None
    region_embeds: Optional[torch.FloatTensor] = None


@dataclass
class RegionDetections(ModelOutput):
    """What [`RegionEncoderModel.detect`] finds in each image (R = ``num_regions``).

    Args:
        boxes: ``[B, R, 4]`` in input pixels (``image_size`` square), objects first.
        region_features: ``[B, R, embed_dim + 5]``: the embedding, then the box geometry.
        objectness: ``[B, R]`` stage-2 object probability.
        shape_logits, colour_logits, size_logits: ``[B, R, classes]``.
    """

    boxes: Optional[torch.FloatTensor] = None
    region_features: Optional[torch.FloatTensor] = None
    objectness: Optional[torch.FloatTensor] = None
    shape_logits: Optional[torch.FloatTensor] = None
    colour_logits: Optional[torch.FloatTensor] = None
    size_logits: Optional[torch.FloatTensor] = None


def _conv(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class RegionEncoderModel(PreTrainedModel):
    """CNN feature map, a cheap objectness stage over dense candidates, a fine RoI head over the
    proposals. ``forward`` scores given boxes (training); ``detect`` finds the regions of any image."""

    config_class = RegionEncoderConfig
    base_model_prefix = "region_encoder"
    main_input_name = "pixel_values"

    def __init__(self, config: RegionEncoderConfig):
        super().__init__(config)
        layers, width = [], 3
        for stage, channels in enumerate(config.channels):
            layers += [_conv(width, channels, 1 if stage == 0 else 2), _conv(channels, channels, 1)]
            width = channels
        self.backbone = nn.Sequential(*layers)
        self.proposal_features = nn.Sequential(nn.Conv2d(width, config.proposal_channels, 1), nn.ReLU(inplace=True))
        self.proposal_head = nn.Sequential(
            nn.Linear(config.proposal_channels * 4 + len(GEOMETRY_NAMES), config.proposal_channels),
            nn.ReLU(inplace=True),
            nn.Linear(config.proposal_channels, 1),
        )
        self.roi_head = nn.Sequential(  # BUTD's fc6 / fc7; the geometry lets it tell sizes apart
            nn.Linear(width * config.pool_size**2 + len(GEOMETRY_NAMES), config.hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden_size, config.embed_dim),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(config.embed_dim, 1 + sum(config.num_labels_per_attribute.values()))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        from transformers import initialization as init

        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    # --- the two stages ------------------------------------------------------------------------

    def feature_maps(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, S/4, S/4]`` feature map and the narrow ``[B, proposal_channels, S/4, S/4]`` one."""
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [batch, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        features = self.backbone(pixel_values)
        return features, self.proposal_features(features)

    def score_proposals(self, proposal_map: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Stage-1 objectness logits ``[B, K]`` of ``[B, K, 4]`` boxes."""
        pooled = roi_align(proposal_map, boxes, 2, 1 / self.config.stride, sampling_ratio=1)  # [B, K, c, 2, 2]
        geometry = box_geometry(boxes, self.config.image_size, self.config.image_size)  # [B, K, 5]
        return self.proposal_head(torch.cat([pooled.flatten(2), geometry], dim=-1)).squeeze(-1)  # [B, K]

    def describe_regions(self, features: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage 2: ``[B, K, embed_dim]`` embeddings of ``[B, K, 4]`` boxes and their logits."""
        config = self.config
        pooled = roi_align(features, boxes, config.pool_size, 1 / config.stride, config.sampling_ratio)  # [B, K, C, P, P]
        geometry = box_geometry(boxes, config.image_size, config.image_size)  # [B, K, 5]
        embeds = self.roi_head(torch.cat([pooled.flatten(2), geometry], dim=-1))  # [B, K, F]
        logits = self.classifier(embeds)  # [B, K, 1 + classes]
        sizes = [1, *config.num_labels_per_attribute.values()]
        objectness, shape, colour, size = logits.split(sizes, dim=-1)
        return embeds, {"objectness": objectness.squeeze(-1), "shape": shape, "colour": colour, "size": size}

    def forward(
        self,
        pixel_values: torch.Tensor,
        boxes: torch.Tensor,
        objectness_labels: Optional[torch.Tensor] = None,
        attribute_labels: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """Score ``[B, K, 4]`` boxes of ``[B, 3, S, S]`` images.

        Args:
            objectness_labels: ``[B, K]`` 1 for objects, 0 for background, -1 ignored.
            attribute_labels: ``[B, K, 3]`` shape, colour, size indices (-100 for background).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        features, proposal_map = self.feature_maps(pixel_values)
        proposal_logits = self.score_proposals(proposal_map, boxes)
        embeds, logits = self.describe_regions(features, boxes)
        loss = None
        if objectness_labels is not None:
            known = objectness_labels >= 0
            targets = objectness_labels[known].to(proposal_logits.dtype)
            loss = F.binary_cross_entropy_with_logits(proposal_logits[known], targets)
            loss = loss + F.binary_cross_entropy_with_logits(logits["objectness"][known], targets)
            if attribute_labels is not None:
                for column, name in enumerate(("shape", "colour", "size")):
                    labels = attribute_labels[..., column]
                    if logits[name].shape[-1] and (labels != IGNORE_INDEX).any():
                        loss = loss + F.cross_entropy(logits[name].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        output = RegionEncoderOutput(
            loss=loss,
            proposal_logits=proposal_logits,
            objectness_logits=logits["objectness"],
            shape_logits=logits["shape"],
            colour_logits=logits["colour"],
            size_logits=logits["size"],
            region_embeds=embeds,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def detect(self, pixel_values: torch.Tensor, num_regions: Optional[int] = None) -> RegionDetections:
        """The ``num_regions`` (default: the config's) regions of each image, objects first.

        1. Stage 1 scores every candidate; NMS (``proposal_iou_threshold``) over the best
           ``pre_nms_top_n`` keeps ``num_proposals``.
        2. Stage 2 scores the proposals' objectness.
        3. NMS (``nms_iou_threshold``) picks the regions: the proposals by stage-2 objectness
           first (the objects, then crops near them), then, once those are taken or suppressed,
           the candidates by stage-1 objectness (background crops elsewhere in the image).
        4. Stage 2 describes the regions.

        No labels or ground-truth boxes are used."""
        config = self.config
        num_regions = config.num_regions if num_regions is None else num_regions
        if not 0 < num_regions <= config.num_proposals:
            raise ValueError(f"num_regions must be in [1, num_proposals={config.num_proposals}], got {num_regions}")
        features, proposal_map = self.feature_maps(pixel_values)
        batch = pixel_values.shape[0]
        # Built here, not kept as a buffer: from_pretrained does not run __init__'s tensor code. (~2 ms)
        candidates = candidate_boxes(
            config.image_size, config.candidate_sides, config.candidate_aspect_ratios, config.candidate_stride
        ).to(device=features.device, dtype=features.dtype)  # [K, 4]
        candidate_scores = self.score_proposals(proposal_map, candidates.expand(batch, -1, 4))  # [B, K]
        top_scores, top = candidate_scores.topk(min(config.pre_nms_top_n, candidates.shape[0]), dim=1)  # [B, T]
        keep, _ = batched_nms(candidates[top], top_scores, config.proposal_iou_threshold, config.num_proposals)
        proposals = candidates[top.gather(1, keep)]  # [B, N, 4]
        proposal_scores = self.describe_regions(features, proposals)[1]["objectness"]  # [B, N]
        # Logits, not probabilities (which tie at 1.0 around a clear object); the candidates are
        # shifted below every proposal, so that every proposal is considered first.
        shift = (candidate_scores.max(dim=1).values - proposal_scores.min(dim=1).values).clamp(min=0) + 1  # [B]
        pool = torch.cat([proposals, candidates.expand(batch, -1, 4)], dim=1)  # [B, N + K, 4]
        priority = torch.cat([proposal_scores, candidate_scores - shift[:, None]], dim=1)  # [B, N + K]
        keep, _ = batched_nms(pool, priority, config.nms_iou_threshold, num_regions)  # [B, R]
        boxes = pool[torch.arange(batch, device=pool.device)[:, None], keep]  # [B, R, 4]
        embeds, logits = self.describe_regions(features, boxes)
        geometry = box_geometry(boxes, config.image_size, config.image_size)
        return RegionDetections(
            boxes=boxes,
            region_features=torch.cat([embeds, geometry], dim=-1),
            objectness=logits["objectness"].sigmoid(),
            shape_logits=logits["shape"],
            colour_logits=logits["colour"],
            size_logits=logits["size"],
        )


def images_to_pixel_values(images: Sequence, config: RegionEncoderConfig) -> torch.Tensor:
    """``[B, 3, S, S]`` normalised pixels of any images ``load_image`` reads, each resized (bilinear)
    to the encoder's square input; box coordinates scale back by ``(width / S, height / S)``."""
    size = config.image_size
    arrays = []
    for image in images:
        image = load_image(image)
        if image.size != (size, size):
            image = image.resize((size, size), resample=2)  # PIL.Image.BILINEAR
        arrays.append(np.asarray(image, dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # [B, 3, S, S]
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    return (pixels - mean) / std


# --------------------------------------------------------------------------------------------
# Pretraining on the synthetic benchmark's object labels
# --------------------------------------------------------------------------------------------


def scene_labels(split) -> dict[str, list[str]]:
    """The sorted attribute names that occur in a synthetic split's ``scene`` column."""
    names = {"shape": set(), "colour": set(), "size": set()}
    for scene in split["scene"]:
        for obj in json.loads(scene)["objects"]:
            for attribute in names:
                names[attribute].add(obj[attribute])
    return {attribute: sorted(values) for attribute, values in names.items()}


def sample_training_boxes(
    object_boxes: np.ndarray, image_size: int, rng: np.random.Generator, num_positive: int = 8, num_negative: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """Training boxes of one image and the object each one shows.

    Positives are jittered copies of the object boxes (each side scaled by up to ±25 %, the box
    moved by up to 15 % of its side) with IoU > 0.7, the objects taken in turn. Negatives have
    IoU < 0.3 with every object: half are crops near an object (moved by up to 1.2 sides, scaled
    0.3–3x: partial overlaps, parts of an object, boxes holding a small object), half are random
    boxes of random size and aspect. Boxes are clipped to the image.

    Args:
        object_boxes: ``[n, 4]`` ground-truth boxes (n >= 1), in pixels.

    Returns:
        ``[num_positive + num_negative, 4]`` float32 boxes and ``[same]`` int64: the object index
        of each positive, -1 for the negatives.
    """
    object_boxes = np.asarray(object_boxes, dtype=np.float64).reshape(-1, 4)
    n = object_boxes.shape[0]

    def clip(boxes):
        boxes = boxes.copy()
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image_size)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image_size)
        return boxes

    def draw_around(source, count, shift, scale_low, scale_high):
        centre = (source[:, :2] + source[:, 2:]) / 2
        side = source[:, 2:] - source[:, :2]
        side = side * rng.uniform(scale_low, scale_high, size=(count, 2))
        centre = centre + rng.uniform(-shift, shift, size=(count, 2)) * (source[:, 2:] - source[:, :2])
        return clip(np.concatenate([centre - side / 2, centre + side / 2], axis=1))

    positives, positive_objects = [], []
    for k in range(num_positive):
        target = k % n
        while True:  # >95 % of draws are accepted
            box = draw_around(object_boxes[target:target + 1], 16, 0.15, 0.75, 1.25)
            iou = box_iou(box, object_boxes[target])
            good = np.flatnonzero(iou > 0.7)
            if good.size:
                positives.append(box[good[0]])
                positive_objects.append(target)
                break
    negatives: list[np.ndarray] = []
    while len(negatives) < num_negative:
        count = 4 * num_negative
        near = draw_around(object_boxes[rng.integers(0, n, size=count)], count, 1.2, 0.3, 3.0)
        ratio = np.sqrt(rng.uniform(0.5, 2.0, size=(count, 1)))  # sqrt(width / height)
        side = rng.uniform(0.08, 0.7, size=(count, 1)) * image_size * np.concatenate([ratio, 1 / ratio], axis=1)
        corner = rng.uniform(0, 1, size=(count, 2)) * (image_size - side).clip(min=0)
        anywhere = clip(np.concatenate([corner, corner + side], axis=1))
        for candidates in (near, anywhere):
            valid = (candidates[:, 2] - candidates[:, 0] >= 2) & (candidates[:, 3] - candidates[:, 1] >= 2)
            valid &= box_iou(candidates[:, None, :], object_boxes[None]).max(axis=1) < 0.3
            negatives.extend(candidates[valid][: (num_negative + 1) // 2])
    boxes = np.concatenate([np.stack(positives), np.stack(negatives[:num_negative])]).astype(np.float32)
    owners = np.array(positive_objects + [-1] * num_negative, dtype=np.int64)
    return boxes, owners


def _object_table(split, names: dict[str, list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: ``[n, 4]`` object boxes and ``[n, 3]`` attribute indices."""
    index = {attribute: {name: i for i, name in enumerate(values)} for attribute, values in names.items()}
    table = []
    for scene in split["scene"]:
        objects = json.loads(scene)["objects"]
        boxes = np.array([obj["box"] for obj in objects], dtype=np.float64).reshape(-1, 4)
        labels = np.array([[index[a][obj[a]] for a in ("shape", "colour", "size")] for obj in objects], dtype=np.int64)
        table.append((boxes, labels.reshape(-1, 3)))
    return table


def _split_pixels(split, config: RegionEncoderConfig, batch_size: int = 512) -> torch.Tensor:
    """Every image of a split as ``[N, 3, S, S]`` normalised pixels (decoded by ``load_image``)."""
    import datasets

    undecoded = split.cast_column("image", datasets.Image(decode=False))
    chunks = []
    for start in range(0, len(undecoded), batch_size):
        chunks.append(images_to_pixel_values(undecoded[start:start + batch_size]["image"], config))
    return torch.cat(chunks)


def train_region_encoder(
    train_split,
    config: Optional[RegionEncoderConfig] = None,
    num_images: Optional[int] = 4000,
    max_steps: int = 400,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log_every: int = 50,
    logger=None,
) -> RegionEncoderModel:
    """Pretrain a region encoder on a synthetic split's object labels (never validation/test).

    Deterministic from ``seed``: the images used (a seeded subset of ``num_images``, ``None`` for
    all), the boxes drawn for each step (:func:`sample_training_boxes`) and the initialisation.
    The defaults (400 steps of 32 images drawn from 4,000) lie past the loss plateau, which the
    synthetic benchmark reaches after ~250 steps, and take about 3 minutes on 2 CPU cores.

    Args:
        train_split: a split of :func:`~hf_mvam.data.synthetic.generate_synthetic_benchmark`
            (``image`` and ``scene`` columns).
        config: the architecture; its attribute names are filled from the split's scenes.
        logger: a ``logging.Logger`` for the loss every ``log_every`` steps (``None``: silent).

    Returns:
        the trained model, in eval mode.
    """
    if "scene" not in train_split.column_names:
        raise ValueError("train_region_encoder needs a synthetic split with a 'scene' column (object boxes and labels)")
    config = RegionEncoderConfig(**(config.to_dict() if config is not None else {}))
    names = scene_labels(train_split)
    config.shape_names, config.colour_names, config.size_names = names["shape"], names["colour"], names["size"]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E610]))
    if num_images is not None and num_images < len(train_split):
        train_split = train_split.select(np.sort(rng.permutation(len(train_split))[:num_images]))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = RegionEncoderModel(config)
    torch.random.set_rng_state(generator_state)
    pixels = _split_pixels(train_split, config)  # [N, 3, S, S]
    table = _object_table(train_split, names)
    scale = config.image_size / np.array([json.loads(s)["image_size"] for s in train_split["scene"]], dtype=np.float64)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)
    warmup = min(50, max_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)) * 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
    )
    model.train()
    order = rng.permutation(len(table))
    position, started = 0, time.time()
    for step in range(max_steps):
        if position + batch_size > len(order):
            order, position = rng.permutation(len(table)), 0
        chosen = order[position:position + batch_size]
        position += batch_size
        boxes, objectness, attributes = [], [], []
        for i in chosen:
            object_boxes, labels = table[i]
            sampled, owners = sample_training_boxes(object_boxes * scale[i], config.image_size, rng)
            boxes.append(sampled)
            objectness.append((owners >= 0).astype(np.int64))
            attributes.append(np.where(owners[:, None] >= 0, labels[owners.clip(min=0)], IGNORE_INDEX))
        output = model(
            pixels[torch.from_numpy(chosen)],
            torch.from_numpy(np.stack(boxes)),
            objectness_labels=torch.from_numpy(np.stack(objectness)),
            attribute_labels=torch.from_numpy(np.stack(attributes)),
        )
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        schedule.step()
        if logger is not None and ((step + 1) % log_every == 0 or step + 1 == max_steps):
            logger.info(f"region encoder step {step + 1}/{max_steps}: loss {output.loss.item():.4f} ({time.time() - started:.0f} s)")
    return model.eval()


@torch.no_grad()
def evaluate_region_encoder(model: RegionEncoderModel, split, batch_size: int = 128, iou_threshold: float = 0.5) -> dict[str, float]:
    """Detector recall and attribute accuracy on a synthetic split the encoder was not trained on.

    Every true object is matched to the detected region (of ``num_regions``) that overlaps it most.

    Returns:
        ``recall``: fraction of objects with a region at IoU >= ``iou_threshold``;
        ``recall_top_n``: the same within the first n regions of an image with n objects (are the
        objects the first regions?); ``mean_best_iou``; ``{shape,colour,size}_accuracy``:
        attributes predicted for the matched region of each recalled object; ``objects``, ``images``.
    """
    config = model.config
    was_training = model.training
    model.eval()
    names = {"shape": config.shape_names, "colour": config.colour_names, "size": config.size_names}
    table = _object_table(split, names)
    scale = config.image_size / np.array([json.loads(s)["image_size"] for s in split["scene"]], dtype=np.float64)
    found, found_top, best_ious = [], [], []
    correct = {attribute: [] for attribute in names}
    pixels = _split_pixels(split, config)
    for start in range(0, len(table), batch_size):
        detections = model.detect(pixels[start:start + batch_size])
        for offset in range(detections.boxes.shape[0]):
            object_boxes, labels = table[start + offset]
            truth = torch.from_numpy(object_boxes * scale[start + offset]).float()  # [n, 4]
            iou = box_iou(truth[:, None, :], detections.boxes[offset][None])  # [n, R]
            best, region = iou.max(dim=1)
            top = iou[:, : truth.shape[0]].max(dim=1).values
            found += (best >= iou_threshold).tolist()
            found_top += (top >= iou_threshold).tolist()
            best_ious += best.tolist()
            for column, attribute in enumerate(names):
                predicted = getattr(detections, f"{attribute}_logits")[offset, region].argmax(dim=-1)
                hits = (predicted == torch.from_numpy(labels[:, column]))[best >= iou_threshold]
                correct[attribute] += hits.tolist()
    model.train(was_training)
    results = {
        "recall": float(np.mean(found)),
        "recall_top_n": float(np.mean(found_top)),
        "mean_best_iou": float(np.mean(best_ious)),
        **{f"{attribute}_accuracy": float(np.mean(hits)) if hits else float("nan") for attribute, hits in correct.items()},
        "objects": len(found),
        "images": len(table),
        "iou_threshold": iou_threshold,
    }
    return results
