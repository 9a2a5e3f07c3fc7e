"""Turn image–caption data into SCAN's precomputed region-feature layout, which ``--data`` reads.

    python -m hf_mvam.extract_features --train_region_encoder --output_dir features/synthetic
    python -m hf_mvam.extract_features --data dataset_flickr30k.json --image_root flickr30k-images \\
        --region_encoder features/synthetic/region_encoder --output_dir features/flickr30k
    python -m hf_mvam.extract_features --data my_imagefolder \\
        --vision_model_name_or_path openai/clip-vit-base-patch32 --output_dir features/clip-grid

``--data`` is anything ``training/run.py --data`` takes (an image folder with metadata, a Karpathy
JSON with ``--image_root``, a saved dataset, a Hub id), or nothing: the built-in synthetic benchmark.
The regions come from

* ``--region_encoder FOLDER``: a trained :class:`~hf_mvam.region_encoder.RegionEncoderModel`
  (BUTD-style detection: ``--num_regions`` boxes per image, objects first);
* ``--train_region_encoder``: pretrain one on the synthetic benchmark's train split first, and
  save it (with its validation metrics) under ``OUTPUT_DIR/region_encoder``;
* ``--vision_model_name_or_path``: any transformers vision backbone (``AutoModel`` +
  ``AutoImageProcessor``; a two-tower checkpoint such as CLIP gives its vision tower): its grid
  or patch tokens are the regions (CLS and other leading tokens dropped), one per grid cell.

Every region's feature is the encoder's vector followed by its box geometry ``(x0/W, y0/H, x1/W,
y1/H, area/(W*H))`` in the original image. Each of the splits train, validation and test is
written under SCAN's name (train, dev, test):

``{split}_ims.npy``     ``N x R x F`` float32 region features
``{split}_caps.txt``    ``N x K`` captions, one a line, the K of an image consecutive
``{split}_boxes.npy``   ``N x R x 4`` float32 boxes ``(x0, y0, x1, y1)``, pixels of the original image
``{split}_images.txt``  one line per image: its file path, or ``split[row]`` for embedded images
``extraction.json``     how the features were made, and what was skipped

SCAN's layout needs the same number K of captions for every image. K is ``--captions_per_image``,
by default the fewest any image of the split has: images with more keep their first K (the others
are dropped and counted), images with fewer are skipped and listed. Line breaks inside a caption
become spaces. Existing files of this layout are never replaced without ``--overwrite_output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModel, HfArgumentParser

from .backbones import vision_token_states
from .image_loading import load_image
from .region_encoder import (
    GEOMETRY_NAMES,
    RegionEncoderModel,
    box_geometry,
    evaluate_region_encoder,
    images_to_pixel_values,
    train_region_encoder,
)
from .data.splits import load_splits

logger = logging.getLogger("hf_mvam.extract_features")

#: Our split names and SCAN's file prefixes (``_load_scan`` maps dev back to validation).
SCAN_PREFIXES = {"train": "train", "validation": "dev", "test": "test"}
LAYOUT_SUFFIXES = ("_ims.npy", "_caps.txt", "_boxes.npy", "_images.txt")
ALL_SCAN_PREFIXES = ("train", "dev", "test", "testall")
EXTRACTION_NAME = "extraction.json"
REGION_ENCODER_DIR = "region_encoder"


def option(default, help: str):
    """A dataclass field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class ExtractionArguments:
    output_dir: str = option(None, "Folder to write the SCAN layout into (required).")
    data: Optional[str] = option(
        None,
        "Image–caption data: an image folder with metadata.jsonl/csv, a Karpathy split JSON (with "
        "--image_root), a save_to_disk folder or a Hub dataset id (default: the synthetic benchmark).",
    )
    image_root: Optional[str] = option(None, "Folder of the images a Karpathy JSON (or relative paths) names.")
    image_column: Optional[str] = option(None, "Image column (default: image, else the first Image column).")
    caption_column: Optional[str] = option(None, "Caption column (default: caption, captions, sentences, ...).")
    num_train_images: int = option(10_000, "Synthetic benchmark: training images.")
    num_validation_images: int = option(500, "Synthetic benchmark: validation images.")
    num_test_images: int = option(1_000, "Synthetic benchmark: test images.")
    region_encoder: Optional[str] = option(None, "A trained region encoder folder (RegionEncoderModel.save_pretrained).")
    train_region_encoder: bool = option(
        False, "Pretrain a region encoder on the synthetic benchmark's train split and save it in OUTPUT_DIR/region_encoder."
    )
    region_encoder_max_steps: int = option(400, "--train_region_encoder: optimizer steps (batch 32 images).")
    region_encoder_num_images: int = option(4000, "--train_region_encoder: training images drawn from the train split.")
    vision_model_name_or_path: Optional[str] = option(
        None, "A transformers vision backbone (Hub id or folder) whose grid/patch tokens become the regions."
    )
    num_regions: Optional[int] = option(
        None, "Regions per image with a region encoder (default: its config's, 36); a backbone's grid decides its own."
    )
    captions_per_image: Optional[int] = option(
        None, "Captions kept per image (default: the fewest any image of the split has); images with fewer are skipped."
    )
    batch_size: int = option(64, "Images per forward pass.")
    seed: int = option(0, "Seed of --train_region_encoder.")
    overwrite_output_dir: bool = option(False, "Replace this layout's files in OUTPUT_DIR instead of refusing to start.")

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        sources = [bool(self.region_encoder), self.train_region_encoder, bool(self.vision_model_name_or_path)]
        if sum(sources) != 1:
            raise ValueError("pass exactly one of --region_encoder, --train_region_encoder and --vision_model_name_or_path")
        if self.vision_model_name_or_path and self.num_regions is not None:
            raise ValueError("--num_regions applies to a region encoder; a backbone's grid gives its regions")
        for name in ("batch_size", "num_train_images", "num_validation_images", "num_test_images",
                     "region_encoder_max_steps", "region_encoder_num_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_regions", "captions_per_image"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.region_encoder and not os.path.isdir(self.region_encoder):
            raise ValueError(f"--region_encoder {self.region_encoder} is not a folder")


def parse_arguments(argv: list[str] | None = None) -> ExtractionArguments:
    parser = HfArgumentParser(ExtractionArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        parser.error(str(error))
    return args


def fail(message: str):
    """Stop with a one-line message instead of a traceback."""
    raise SystemExit(f"extract_features: error: {message}")


# --------------------------------------------------------------------------- the output folder


def existing_outputs(folder: Path, training_encoder: bool) -> list[str]:
    """Files (and the encoder folder) of this layout already in ``folder``."""
    names = [prefix + suffix for prefix in ALL_SCAN_PREFIXES for suffix in LAYOUT_SUFFIXES] + [EXTRACTION_NAME]
    if training_encoder:
        names.append(REGION_ENCODER_DIR)
    return [name for name in names if (folder / name).exists()]


class SplitWriter:
    """Writes one split's four files under temporary names, then renames them into place together,
    so that an interrupted run leaves no half-written file under a final name."""

    def __init__(self, folder: Path, prefix: str, num_images: int, num_regions: int, feature_dim: int):
        self.final = {suffix: folder / f"{prefix}{suffix}" for suffix in LAYOUT_SUFFIXES}
        self.temporary = {suffix: folder / f".tmp-{prefix}{suffix}" for suffix in LAYOUT_SUFFIXES}
        self.features = np.lib.format.open_memmap(
            self.temporary["_ims.npy"], mode="w+", dtype=np.float32, shape=(num_images, num_regions, feature_dim)
        )
        self.boxes = np.lib.format.open_memmap(
            self.temporary["_boxes.npy"], mode="w+", dtype=np.float32, shape=(num_images, num_regions, 4)
        )
        self.captions = open(self.temporary["_caps.txt"], "w", encoding="utf-8")
        self.images = open(self.temporary["_images.txt"], "w", encoding="utf-8")
        self.written = 0

    def add(self, features: np.ndarray, boxes: np.ndarray, captions: list[list[str]], image_ids: list[str]) -> None:
        count = features.shape[0]
        self.features[self.written:self.written + count] = features
        self.boxes[self.written:self.written + count] = boxes
        for image_captions in captions:
            self.captions.writelines(" ".join(c.split()) + "\n" for c in image_captions)
        self.images.writelines(image_id.replace("\n", " ") + "\n" for image_id in image_ids)
        self.written += count

    def commit(self) -> None:
        if self.written != self.features.shape[0]:
            raise RuntimeError(f"wrote {self.written} of {self.features.shape[0]} images")
        self.close()
        for suffix, path in self.temporary.items():
            os.replace(path, self.final[suffix])

    def close(self) -> None:
        for array in (self.features, self.boxes):
            array.flush()
        self.captions.close()
        self.images.close()

    def discard(self) -> None:
        self.close()
        for path in self.temporary.values():
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- captions


def choose_captions(split, name: str, captions_per_image: Optional[int]):
    """The rows kept, their K captions each, and what was dropped (see the module docstring)."""
    counts = np.array([len(c) for c in split["captions"]])
    if len(counts) == 0:
        fail(f"the {name} split has no images")
    k = int(counts.min()) if captions_per_image is None else captions_per_image
    kept = np.flatnonzero(counts >= k)
    if len(kept) == 0:
        fail(f"no image of the {name} split has {k} captions (--captions_per_image); the most is {counts.max()}")
    if counts.min() != counts.max():
        logger.warning(
            f"{name}: images have {counts.min()}–{counts.max()} captions; keeping {k} per image "
            f"({int((counts[kept] - k).sum())} captions dropped, {len(counts) - len(kept)} images with fewer skipped)"
        )
    return kept, k, int((counts[kept] - k).sum())


# --------------------------------------------------------------------------- encoders


class RegionEncoderExtractor:
    """Regions detected by a :class:`RegionEncoderModel`; boxes scaled back to the original image."""

    def __init__(self, model: RegionEncoderModel, num_regions: Optional[int]):
        self.model = model.eval()
        self.num_regions = model.config.num_regions if num_regions is None else num_regions
        if not 0 < self.num_regions <= model.config.num_proposals:
            fail(f"--num_regions must be in [1, {model.config.num_proposals}] for this region encoder, got {self.num_regions}")

    @torch.no_grad()
    def __call__(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        size = self.model.config.image_size
        detections = self.model.detect(images_to_pixel_values(images, self.model.config), self.num_regions)
        scale = torch.tensor([[w / size, h / size, w / size, h / size] for w, h in (im.size for im in images)])
        boxes = detections.boxes * scale[:, None, :]  # [B, R, 4] original pixels
        return detections.region_features.numpy(), boxes.numpy()

    def describe(self) -> dict:
        return {"num_regions": self.num_regions}


class BackboneGridExtractor:
    """Grid/patch tokens of a transformers vision backbone, one region per grid cell."""

    def __init__(self, name_or_path: str):
        try:
            config = AutoConfig.from_pretrained(name_or_path)
            config = getattr(config, "vision_config", None) or config  # a two-tower checkpoint's vision tower
            self.backbone = AutoModel.from_pretrained(name_or_path, config=config).eval()
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError, KeyError) as error:
            fail(f"cannot load --vision_model_name_or_path {name_or_path}: {str(error).splitlines()[0]}")
        self.name_or_path = name_or_path
        self.grid = None

    @torch.no_grad()
    def __call__(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        states, grid = vision_token_states(self.backbone, pixel_values)  # [B, T, H], (h, w)
        if self.grid is None:
            self.grid = grid
        tokens = states[:, -grid[0] * grid[1]:]  # [B, h*w, H]: the grid, row-major (CLS dropped)
        boxes = torch.stack([self._cell_boxes(image.size, grid) for image in images])  # [B, h*w, 4]
        sizes = torch.tensor([image.size for image in images], dtype=torch.float32)  # [B, 2] (W, H)
        geometry = box_geometry(boxes, sizes[:, 0:1], sizes[:, 1:2])  # [B, h*w, 5]
        return torch.cat([tokens.float(), geometry], dim=-1).numpy(), boxes.numpy()

    def _cell_boxes(self, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """``[h*w, 4]`` original-image pixels of each grid cell, through the processor's resize and crop."""
        x0, y0, x1, y1 = processed_region(self.processor, *image_size)
        rows, columns = grid
        ys = torch.linspace(y0, y1, rows + 1)
        xs = torch.linspace(x0, x1, columns + 1)
        top, left = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
        bottom, right = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
        return torch.stack([left, top, right, bottom], dim=-1).reshape(-1, 4)

    def describe(self) -> dict:
        return {
            "vision_model_name_or_path": self.name_or_path,
            "model_type": self.backbone.config.model_type,
            "grid": list(self.grid),
        }


def processed_region(processor, width: int, height: int) -> tuple[float, float, float, float]:
    """The part ``(x0, y0, x1, y1)`` of a ``width`` x ``height`` image that an image processor's
    output shows: all of it after a plain resize, the centre crop after a shortest-edge resize."""
    size = _given_fields(getattr(processor, "size", None))
    resize = getattr(processor, "do_resize", True)
    if not resize:
        scale_x = scale_y = 1.0
    elif "shortest_edge" in size and len(size) == 1:
        scale_x = scale_y = size["shortest_edge"] / min(width, height)
    elif {"height", "width"} <= set(size):
        scale_x, scale_y = size["width"] / width, size["height"] / height
    else:
        fail(f"cannot map grid cells back to image pixels for {type(processor).__name__} with size={size} "
             "(supported: {'shortest_edge': n} or {'height': h, 'width': w})")
    resized_w, resized_h = width * scale_x, height * scale_y
    crop = _given_fields(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    if crop:
        crop_w, crop_h = min(crop["width"], resized_w), min(crop["height"], resized_h)
        left, top = (resized_w - crop_w) / 2, (resized_h - crop_h) / 2
        return left / scale_x, top / scale_y, (left + crop_w) / scale_x, (top + crop_h) / scale_y
    return 0.0, 0.0, float(width), float(height)


def _given_fields(size) -> dict:
    """A processor's size or crop size (a dict, or transformers' ``SizeDict``) without its unset fields."""
    if size is None:
        return {}
    if dataclasses.is_dataclass(size):
        size = dataclasses.asdict(size)
    return {key: value for key, value in dict(size).items() if value is not None}


# --------------------------------------------------------------------------- steps


def build_region_encoder(args: ExtractionArguments, output_dir: Path, synthetic):
    """Load --region_encoder, or pretrain one on the synthetic train split and save it."""
    if args.region_encoder:
        try:
            return RegionEncoderModel.from_pretrained(args.region_encoder), {"region_encoder": os.path.abspath(args.region_encoder)}
        except (OSError, ValueError, KeyError) as error:
            fail(f"cannot load --region_encoder {args.region_encoder}: {str(error).splitlines()[0]}")
    started = time.time()
    model = train_region_encoder(
        synthetic["train"],
        num_images=args.region_encoder_num_images,
        max_steps=args.region_encoder_max_steps,
        seed=args.seed,
        logger=logger,
    )
    train_seconds = time.time() - started
    metrics = evaluate_region_encoder(model, synthetic["validation"], batch_size=args.batch_size)
    folder = output_dir / REGION_ENCODER_DIR
    if folder.exists():  # only with --overwrite_output_dir (checked before)
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    pretraining = {
        "train_split": "synthetic benchmark train (seed 0)",
        "num_images": min(args.region_encoder_num_images, len(synthetic["train"])),
        "max_steps": args.region_encoder_max_steps,
        "seed": args.seed,
        "train_seconds": round(train_seconds, 1),
        "validation": metrics,
    }
    (folder / "eval_results.json").write_text(json.dumps(pretraining, indent=2) + "\n")
    logger.info(
        f"region encoder: trained in {train_seconds:.0f} s; validation recall@IoU0.5 {metrics['recall']:.3f} "
        f"(top-n {metrics['recall_top_n']:.3f}), shape {metrics['shape_accuracy']:.3f}, colour "
        f"{metrics['colour_accuracy']:.3f}, size {metrics['size_accuracy']:.3f}; saved to {folder}"
    )
    return model, {"region_encoder": str(folder.resolve()), "pretraining": pretraining}


def extract_split(extractor, split, name: str, captions, output_dir: Path, args: ExtractionArguments) -> dict:
    """Write one split's files; ``captions`` is :func:`choose_captions`' answer. Returns the
    split's entry of extraction.json."""
    import datasets

    kept, k, dropped = captions
    skipped = [[f"{name}[{i}]", f"fewer than {k} captions"] for i in np.setdiff1d(np.arange(len(split)), kept)]
    undecoded = split.cast_column("image", datasets.Image(decode=False)).select(kept)
    writer = None
    try:
        for start in tqdm(range(0, len(undecoded), args.batch_size), desc=f"extracting {name}"):
            rows = undecoded[start:start + args.batch_size]
            ids = [
                (image or {}).get("path") or f"{name}[{int(kept[start + offset])}]"
                for offset, image in enumerate(rows["image"])
            ]
            images = [load_image(image, name=image_id) for image, image_id in zip(rows["image"], ids)]
            features, boxes = extractor(images)
            if writer is None:
                writer = SplitWriter(output_dir, SCAN_PREFIXES[name], len(undecoded), features.shape[1], features.shape[2])
            writer.add(features, boxes, [c[:k] for c in rows["captions"]], ids)
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return {
        "file_prefix": SCAN_PREFIXES[name],
        "num_images": len(undecoded),
        "captions_per_image": k,
        "dropped_captions": dropped,
        "skipped_images": skipped,
        "shape": list(writer.features.shape),
    }


def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logging.getLogger("hf_mvam").setLevel(logging.INFO)
    args = parse_arguments(argv)

    # 1. The output folder: refuse to replace an earlier extraction's files.
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"--output_dir {output_dir} exists and is not a folder")
    existing = existing_outputs(output_dir, args.train_region_encoder) if output_dir.is_dir() else []
    if existing and not args.overwrite_output_dir:
        fail(f"{output_dir} already holds {', '.join(existing)}; pass --overwrite_output_dir to replace them")
    output_dir.mkdir(parents=True, exist_ok=True)

    # 2. The data (the synthetic benchmark without --data).
    try:
        fields = {k: getattr(args, k) for k in ("data", "image_root", "image_column", "caption_column",
                                                "num_train_images", "num_validation_images", "num_test_images")}
        splits, dataset_name, stats = load_splits(**fields)
    except (ValueError, FileNotFoundError) as error:
        fail(f"cannot load --data {args.data}: {error}")
    first = next(iter(splits.values()))
    if "image" not in first.column_names:
        fail(f"--data {args.data} holds precomputed image_features already; it needs images")
    ignored = [name for name in splits if name not in SCAN_PREFIXES]
    if ignored:
        logger.warning(f"splits {ignored} are not written: SCAN's layout has names only for {list(SCAN_PREFIXES)}")
    names = [name for name in SCAN_PREFIXES if name in splits]
    if not names:
        fail(f"--data {args.data} has no train, validation or test split (it has {list(splits)})")
    captions = {name: choose_captions(splits[name], name, args.captions_per_image) for name in names}

    # 3. The encoder.
    encoder_record: dict = {}
    if args.vision_model_name_or_path:
        extractor = BackboneGridExtractor(args.vision_model_name_or_path)
        encoder_record["kind"] = "vision_backbone"
    else:
        synthetic = None
        if args.train_region_encoder:
            synthetic = splits if args.data is None else load_splits(
                None, num_train_images=args.num_train_images, num_validation_images=args.num_validation_images,
                num_test_images=args.num_test_images,
            )[0]
        model, encoder_record = build_region_encoder(args, output_dir, synthetic)
        encoder_record["kind"] = "region_encoder"
        extractor = RegionEncoderExtractor(model, args.num_regions)

    # 4. Every split, then the record of how it was made (last: a folder without one is incomplete).
    if (output_dir / EXTRACTION_NAME).exists():  # only with --overwrite_output_dir
        (output_dir / EXTRACTION_NAME).unlink()
    written = {}
    extraction_started = time.time()
    for name in names:
        split_started = time.time()
        written[name] = extract_split(extractor, splits[name], name, captions[name], output_dir, args)
        written[name]["seconds"] = round(time.time() - split_started, 1)
        logger.info(f"{name}: {written[name]['shape']} features in {written[name]['seconds']} s")
    stale = [prefix + suffix for prefix in ALL_SCAN_PREFIXES if prefix not in {SCAN_PREFIXES[n] for n in written}
             for suffix in LAYOUT_SUFFIXES if (output_dir / (prefix + suffix)).exists()]
    for name in stale:  # an earlier extraction's splits this data does not have (--overwrite_output_dir)
        logger.warning(f"--overwrite_output_dir: removing {output_dir / name}")
        (output_dir / name).unlink()
    feature_dim = next(iter(written.values()))["shape"][2]
    record = {
        "encoder": {**encoder_record, **extractor.describe()},
        "feature_dim": feature_dim,
        "feature_layout": {
            "embedding": [0, feature_dim - len(GEOMETRY_NAMES)],
            "geometry": [feature_dim - len(GEOMETRY_NAMES), feature_dim],
            "geometry_names": list(GEOMETRY_NAMES),
        },
        "boxes": "x0, y0, x1, y1 in pixels of the original image (continuous: pixel i spans [i, i + 1))",
        "data": {**fields, **{k: os.path.abspath(fields[k]) for k in ("data", "image_root") if fields[k] and os.path.exists(fields[k])},
                 "name": dataset_name, "source": stats["source"] if stats else "synthetic benchmark (seed 0)"},
        "loader_skipped_images": [list(entry) for entry in stats["skipped_images"]] if stats else [],
        "splits": written,
        "extraction_seconds": round(time.time() - extraction_started, 1),
        "total_seconds": round(time.time() - started, 1),
    }
    temporary = output_dir / f".tmp-{EXTRACTION_NAME}"
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, output_dir / EXTRACTION_NAME)
    summary = ", ".join(f"{n} {w['shape'][0]} x {w['shape'][1]} x {w['shape'][2]}" for n, w in written.items())
    print(f"wrote {summary} to {output_dir} in {record['total_seconds']:.0f} s")
    return record


if __name__ == "__main__":
    main()
