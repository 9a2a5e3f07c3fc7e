"""The region encoder (RoIAlign, NMS, geometry, pretraining, detection) and the feature-extraction
command that writes SCAN's precomputed layout."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_mvam.data.sources import load_image_caption_dataset
from hf_mvam.data.synthetic import generate_synthetic_benchmark
from hf_mvam.extract_features import main as extract_main
from hf_mvam.extract_features import minimal_pair_meta, processed_region
from hf_mvam.region_encoder import (
    RegionEncoderConfig,
    RegionEncoderModel,
    batched_nms,
    box_geometry,
    box_iou,
    candidate_boxes,
    evaluate_region_encoder,
    images_to_pixel_values,
    roi_align,
    sample_training_boxes,
    train_region_encoder,
)

TINY_ENCODER = dict(channels=[8, 16, 16], proposal_channels=8, hidden_size=32, embed_dim=16, num_proposals=40,
                    pre_nms_top_n=200, num_regions=12)


@pytest.fixture(autouse=True)
def caches_in_tmp(tmp_path, monkeypatch):
    """Keep the generated benchmark and datasets' cache out of the home folder."""
    monkeypatch.setenv("HF_MVAM_CACHE", str(tmp_path / "hf_mvam_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a busy 2-core machine, a second thread's start-up and spin-waits
    cost up to 10x the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_synthetic():
    return generate_synthetic_benchmark(num_train=48, num_validation=16, num_test=16, seed=3)


# --------------------------------------------------------------------------- boxes


def _bilinear(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's RoIAlign interpolation of a [C, H, W] map at index coordinates (y, x)."""
    _, height, width = feature.shape
    if y < -1 or y > height or x < -1 or x > width:
        return torch.zeros(feature.shape[0], dtype=feature.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    return ((1 - ly) * (1 - lx) * feature[:, y_low, x_low] + (1 - ly) * lx * feature[:, y_low, x_high]
            + ly * (1 - lx) * feature[:, y_high, x_low] + ly * lx * feature[:, y_high, x_high])


def _naive_roi_align(feature, box, output_size, scale, sampling_ratio):
    """Crop-and-resize one box, bin by bin and sample by sample (torchvision, aligned=True)."""
    x0, y0, x1, y1 = (float(v) * scale - 0.5 for v in box)
    bin_w, bin_h = (x1 - x0) / output_size, (y1 - y0) / output_size
    out = torch.zeros(feature.shape[0], output_size, output_size, dtype=feature.dtype)
    for py in range(output_size):
        for px in range(output_size):
            for iy in range(sampling_ratio):
                for ix in range(sampling_ratio):
                    y = y0 + py * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                    x = x0 + px * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                    out[:, py, px] += _bilinear(feature, y, x)
    return out / sampling_ratio**2


@pytest.mark.parametrize("output_size, sampling_ratio", [(3, 2), (2, 1), (1, 3)])
def test_roi_align_matches_a_naive_crop_and_resize(output_size, sampling_ratio):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 6, 7, generator=generator, dtype=torch.float64)  # stride 4: 24 x 28 pixels
    corners = torch.rand(2, 9, 2, 2, generator=generator, dtype=torch.float64) * torch.tensor([28.0, 24.0])
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)  # [2, 9, 4]
    boxes[0, 0] = torch.tensor([0.0, 0.0, 28.0, 24.0])  # the whole image
    boxes[0, 1] = torch.tensor([25.0, 20.0, 28.0, 24.0])  # a corner, smaller than a cell
    pooled = roi_align(features, boxes, output_size, 0.25, sampling_ratio)
    assert pooled.shape == (2, 9, 3, output_size, output_size)
    for b in range(2):
        for k in range(9):
            expected = _naive_roi_align(features[b], boxes[b, k], output_size, 0.25, sampling_ratio)
            torch.testing.assert_close(pooled[b, k], expected, rtol=1e-9, atol=1e-9)


def test_roi_align_of_one_cell_is_that_cell():
    features = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    box = torch.tensor([[[8.0, 4.0, 12.0, 8.0]]])  # cell (row 1, column 2) of a stride-4 map
    pooled = roi_align(features, box, 1, 0.25, 1)
    assert pooled.flatten().tolist() == [features[0, 0, 1, 2].item(), features[0, 1, 1, 2].item()]


def _naive_nms(boxes, scores, threshold, max_keep):
    """The classic loop, then the best suppressed boxes to fill up to max_keep."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept, suppressed = [], []
    for i in order:
        if all(float(box_iou(boxes[i], boxes[j])) <= threshold for j in kept):
            kept.append(i)
        else:
            suppressed.append(i)
    kept = kept[:max_keep]
    fill = suppressed[: max_keep - len(kept)]
    return kept + fill, [True] * len(kept) + [False] * len(fill)


@pytest.mark.parametrize("threshold, max_keep", [(0.5, 10), (0.3, 30), (0.05, 40)])
def test_batched_nms_matches_the_greedy_loop(threshold, max_keep):
    generator = torch.Generator().manual_seed(1)
    corners = torch.rand(3, 40, 2, 2, generator=generator) * 32
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values + 1], dim=-1)  # [3, 40, 4]
    scores = torch.rand(3, 40, generator=generator)
    indices, survived = batched_nms(boxes, scores, threshold, max_keep)
    shared_indices, shared_survived = batched_nms(boxes[0], scores, threshold, max_keep)  # one box set for all
    for b in range(3):
        expected, expected_survived = _naive_nms(boxes[b], scores[b], threshold, max_keep)
        assert indices[b].tolist() == expected
        assert survived[b].tolist() == expected_survived
        expected, expected_survived = _naive_nms(boxes[0], scores[b], threshold, max_keep)
        assert shared_indices[b].tolist() == expected
        assert shared_survived[b].tolist() == expected_survived
    if threshold == 0.05:
        assert not survived.all()  # the fill-in path was taken
    with pytest.raises(ValueError, match="max_keep"):
        batched_nms(boxes, scores, threshold, 41)


def test_box_geometry_and_iou_by_hand():
    geometry = box_geometry(torch.tensor([[16.0, 12.0, 48.0, 36.0], [0.0, 0.0, 64.0, 48.0]]), 64, 48)
    torch.testing.assert_close(geometry, torch.tensor([[0.25, 0.25, 0.75, 0.75, 0.25], [0.0, 0.0, 1.0, 1.0, 1.0]]))
    iou = box_iou(torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 4.0, 4.0]]))
    torch.testing.assert_close(iou, torch.tensor([1 / 7, 0.0]))


def test_candidate_boxes_cover_the_image_edge_to_edge():
    boxes = candidate_boxes(16, [0.5], [1.0], 0.5)  # side 8, step 4: corners at 0, 4, 8
    expected = [[x, y, x + 8, y + 8] for y in (0, 4, 8) for x in (0, 4, 8)]
    assert boxes.tolist() == expected
    boxes = candidate_boxes(64, RegionEncoderConfig().candidate_sides, [1.0, 0.5, 2.0], 0.25)
    assert boxes.min() >= 0 and boxes.max() <= 64 and (boxes[:, 2:] > boxes[:, :2]).all()


def test_training_boxes_are_jittered_objects_and_background():
    objects = np.array([[10, 10, 23, 23], [30, 30, 52, 52]], dtype=np.float64)
    boxes, owners = sample_training_boxes(objects, 64, np.random.default_rng(0))
    again = sample_training_boxes(objects, 64, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip((boxes, owners), again))  # deterministic
    assert boxes.shape == (32, 4) and boxes.min() >= 0 and boxes.max() <= 64
    iou = box_iou(torch.from_numpy(boxes)[:, None].double(), torch.from_numpy(objects)[None]).numpy()  # [32, 2]
    positive = owners >= 0
    assert positive.sum() == 8 and set(owners[positive]) == {0, 1}
    assert (iou[positive, owners[positive]] > 0.7).all()
    assert (iou[~positive].max(axis=1) < 0.3).all()
    assert (iou[~positive].max(axis=1) > 0).sum() >= 4  # crops that overlap an object in part


# --------------------------------------------------------------------------- the encoder


def _objectness_auc(model, split, seed=5) -> float:
    """On held-out images: the chance that a jittered object box outscores a background box
    (stage-2 objectness; 0.5 is chance)."""
    rng = np.random.default_rng(seed)
    boxes, positive = [], []
    for scene in split["scene"]:
        sampled, owners = sample_training_boxes(np.array([o["box"] for o in json.loads(scene)["objects"]]), 64, rng)
        boxes.append(sampled)
        positive.append(owners >= 0)
    with torch.no_grad():
        output = model.eval()(images_to_pixel_values(split["image"], model.config), torch.from_numpy(np.stack(boxes)))
    scores, positive = output.objectness_logits.flatten(), torch.from_numpy(np.concatenate(positive))
    return (scores[positive][:, None] > scores[~positive][None]).float().mean().item()


def test_tiny_encoder_learns_objects_from_background(tiny_synthetic):
    train, validation = tiny_synthetic["train"], tiny_synthetic["validation"]
    untrained = train_region_encoder(train, RegionEncoderConfig(**TINY_ENCODER), num_images=None, max_steps=1, learning_rate=1e-9)
    model = train_region_encoder(
        train, RegionEncoderConfig(**TINY_ENCODER), num_images=None, max_steps=60, batch_size=16, learning_rate=5e-3
    )
    assert model.config.colour_names == sorted({o["colour"] for s in train["scene"] for o in json.loads(s)["objects"]})
    before, after = _objectness_auc(untrained, validation), _objectness_auc(model, validation)
    assert after > 0.75 and after > before + 0.15, (before, after)
    metrics = evaluate_region_encoder(model, validation, batch_size=8)
    assert metrics["objects"] == sum(len(json.loads(s)["objects"]) for s in validation["scene"])
    assert 0 <= metrics["recall_top_n"] <= metrics["recall"] <= 1


def test_detection_is_batch_invariant_and_survives_a_save(tmp_path):
    model = RegionEncoderModel(RegionEncoderConfig(**TINY_ENCODER, shape_names=["a", "b"], colour_names=["c"], size_names=["d", "e"])).eval()
    pixels = torch.randn(3, 3, 64, 64)
    detections = model.detect(pixels)
    assert detections.boxes.shape == (3, 12, 4) and detections.region_features.shape == (3, 12, 16 + 5)
    assert detections.boxes.min() >= 0 and detections.boxes.max() <= 64
    torch.testing.assert_close(detections.region_features[..., -5:], box_geometry(detections.boxes, 64, 64))
    alone = model.detect(pixels[1:2])
    torch.testing.assert_close(alone.boxes[0], detections.boxes[1])
    torch.testing.assert_close(alone.region_features[0], detections.region_features[1], rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "encoder")
    reloaded = RegionEncoderModel.from_pretrained(tmp_path / "encoder").eval()
    torch.testing.assert_close(reloaded.detect(pixels).region_features, detections.region_features)
    assert reloaded.config.size_names == ["d", "e"]


# --------------------------------------------------------------------------- the command


def _layout(folder, prefix):
    return {
        "ims": np.load(folder / f"{prefix}_ims.npy"),
        "boxes": np.load(folder / f"{prefix}_boxes.npy"),
        "caps": (folder / f"{prefix}_caps.txt").read_text().splitlines(),
        "images": (folder / f"{prefix}_images.txt").read_text().splitlines(),
    }


def test_command_on_the_synthetic_benchmark_round_trips_through_the_loader(tmp_path, capsys):
    out = tmp_path / "features"
    argv = ["--output_dir", str(out), "--train_region_encoder", "--num_train_images", "24", "--num_validation_images",
            "8", "--num_test_images", "8", "--region_encoder_max_steps", "3", "--region_encoder_num_images", "24",
            "--batch_size", "16"]
    record = extract_main(argv)
    synthetic = generate_synthetic_benchmark(num_train=24, num_validation=8, num_test=8, seed=0)
    feature_dim = RegionEncoderConfig().feature_dim
    loaded, stats = load_image_caption_dataset(out)
    assert stats["source"] == "scan_precomputed" and list(loaded) == ["train", "validation", "test"]
    for name, prefix in (("train", "train"), ("validation", "dev"), ("test", "test")):
        files = _layout(out, prefix)
        count = len(synthetic[name])
        assert files["ims"].shape == (count, 36, feature_dim) and files["ims"].dtype == np.float32
        assert files["boxes"].shape == (count, 36, 4)
        assert files["images"] == [f"{name}[{i}]" for i in range(count)]
        rows = loaded[name].with_format("numpy")
        assert rows[0]["image_features"].shape == (36, feature_dim)
        np.testing.assert_array_equal(np.stack(rows["image_features"]), files["ims"])
        assert loaded[name]["captions"] == synthetic[name]["captions"]  # 5 each, in order
        # 64 x 64 images: the geometry is the boxes over 64.
        np.testing.assert_allclose(files["ims"][..., -5:-1], files["boxes"] / 64, rtol=1e-5, atol=1e-6)
        # The boxes, image ids and minimal pairs come back as columns.
        np.testing.assert_array_equal(np.stack(rows["boxes"]), files["boxes"])
        assert loaded[name]["image_id"] == files["images"]
        assert loaded[name]["variant_of"] == synthetic[name]["variant_of"]
        assert loaded[name]["changed"] == synthetic[name]["changed"]
        assert any(v >= 0 for v in loaded[name]["variant_of"])
    assert (out / "region_encoder" / "config.json").is_file()
    assert record["encoder"]["pretraining"]["validation"]["objects"] > 0
    assert json.loads((out / "extraction.json").read_text())["splits"]["test"]["captions_per_image"] == 5
    # An existing extraction is never replaced without --overwrite_output_dir.
    with pytest.raises(SystemExit, match="already holds train_ims.npy"):
        extract_main(argv)
    encoder = str(out / "region_encoder")
    extract_main(["--output_dir", str(out), "--region_encoder", encoder, "--overwrite_output_dir", "--num_train_images",
                  "24", "--num_validation_images", "8", "--num_test_images", "8", "--num_regions", "10"])
    assert np.load(out / "test_ims.npy").shape == (8, 10, feature_dim)
    assert not list(out.glob(".tmp-*"))


def test_minimal_pairs_are_renumbered_to_the_images_kept():
    """An image skipped for too few captions leaves its partner without a pair, and moves every
    later row up by one: variant_of must follow."""
    split = datasets.Dataset.from_dict({  # 1 varies 3, 2 varies 0; 0 is skipped
        "captions": [["one"], ["b 1", "b 2"], ["c 1", "c 2"], ["d 1", "d 2"]],
        "variant_of": [-1, 3, 0, -1],
        "changed": ["", "colour", "shape", ""],
    })
    assert minimal_pair_meta(split, np.array([1, 2, 3])) == [
        {"variant_of": 2, "changed": "colour"}, {"variant_of": -1, "changed": ""}, {"variant_of": -1, "changed": ""},
    ]
    assert minimal_pair_meta(split.remove_columns("changed"), np.array([1, 2, 3])) is None


@pytest.fixture
def uneven_imagefolder(tmp_path):
    """Non-square images; one train image with 3 captions, the other with 2."""
    folder = tmp_path / "images"
    rows = {"train": [("a.png", (48, 32), ["red", "a red\nimage", "three"]), ("b.png", (40, 64), ["blue", "two"])],
            "test": [("c.png", (32, 32), ["green", "grey", "a square"])]}
    for split, images in rows.items():
        (folder / split).mkdir(parents=True)
        with open(folder / split / "metadata.jsonl", "w") as handle:
            for name, size, captions in images:
                Image.new("RGB", size, (200, 30, 30)).save(folder / split / name)
                handle.write(json.dumps({"file_name": name, "captions": captions}) + "\n")
    return folder


def test_command_keeps_the_same_number_of_captions_per_image(tmp_path, uneven_imagefolder):
    encoder = tmp_path / "encoder"
    RegionEncoderModel(RegionEncoderConfig(**TINY_ENCODER)).save_pretrained(encoder)
    out = tmp_path / "fewest"
    extract_main(["--data", str(uneven_imagefolder), "--region_encoder", str(encoder), "--output_dir", str(out)])
    files = _layout(out, "train")
    assert [path.rsplit("/", 1)[-1] for path in files["images"]] == ["a.png", "b.png"]
    assert files["caps"] == ["red", "a red image", "blue", "two"]  # the first 2 of a.png's 3
    sizes = np.array([[48, 32], [40, 64]], dtype=np.float32)  # (W, H)
    boxes = files["boxes"]
    assert (boxes >= 0).all() and (boxes[..., [0, 2]] <= sizes[:, None, :1]).all() and (boxes[..., [1, 3]] <= sizes[:, None, 1:]).all()
    np.testing.assert_allclose(files["ims"][..., -5:-1], boxes / np.tile(sizes, 2)[:, None, :], rtol=1e-5, atol=1e-6)
    record = json.loads((out / "extraction.json").read_text())
    assert record["splits"]["train"]["captions_per_image"] == 2 and record["splits"]["train"]["dropped_captions"] == 1
    assert not (out / "dev_ims.npy").exists()
    assert "variant_of" not in load_image_caption_dataset(out)[0]["train"].column_names  # no minimal pairs
    # An earlier extraction's minimal pairs would describe other images: overwriting removes them.
    for stale in ("train_meta.jsonl", "dev_meta.jsonl"):
        (out / stale).write_text('{"variant_of": 1, "changed": "colour"}\n{"variant_of": -1, "changed": ""}\n')
    with pytest.raises(SystemExit, match="already holds .*train_meta.jsonl"):
        extract_main(["--data", str(uneven_imagefolder), "--region_encoder", str(encoder), "--output_dir", str(out)])
    extract_main(["--data", str(uneven_imagefolder), "--region_encoder", str(encoder), "--output_dir", str(out),
                  "--overwrite_output_dir"])
    assert not (out / "train_meta.jsonl").exists() and not (out / "dev_meta.jsonl").exists()

    out = tmp_path / "three"
    extract_main(["--data", str(uneven_imagefolder), "--region_encoder", str(encoder), "--output_dir", str(out),
                  "--captions_per_image", "3"])
    assert _layout(out, "train")["caps"] == ["red", "a red image", "three"]
    assert json.loads((out / "extraction.json").read_text())["splits"]["train"]["skipped_images"] == [["train[1]", "fewer than 3 captions"]]
    with pytest.raises(SystemExit, match="no image of the train split has 4 captions"):
        extract_main(["--data", str(uneven_imagefolder), "--region_encoder", str(encoder), "--output_dir",
                      str(tmp_path / "none"), "--captions_per_image", "4"])
    assert not list((tmp_path / "none").iterdir())  # checked before anything is written


def test_command_with_a_backbone_writes_its_grid_tokens(tmp_path, uneven_imagefolder):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    tower = tmp_path / "tower"
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2)
    model = CLIPVisionModel(config).eval()
    model.save_pretrained(tower)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tower)
    out = tmp_path / "grid"
    record = extract_main(["--data", str(uneven_imagefolder), "--vision_model_name_or_path", str(tower), "--output_dir", str(out)])
    files = _layout(out, "train")
    assert files["ims"].shape == (2, 16, 32 + 5) and record["encoder"]["grid"] == [4, 4]
    images = [Image.open(uneven_imagefolder / "train" / name).convert("RGB") for name in ("a.png", "b.png")]
    with torch.no_grad():
        states = model(**processor(images=images, return_tensors="pt")).last_hidden_state
        tokens = model.post_layernorm(states)[:, 1:]  # CLS dropped
    np.testing.assert_allclose(files["ims"][..., :32], tokens.numpy(), rtol=1e-4, atol=1e-5)
    # a.png is 48 x 32: resized to shortest edge 32 (unchanged), centre crop x in [8, 40]: cell (0, 0) is
    # (8, 0, 16, 8); b.png is 40 x 64: scaled by 0.8 to 32 x 51.2, crop y in [9.6, 41.6] / 0.8 = [12, 52].
    np.testing.assert_allclose(files["boxes"][0, 0], [8, 0, 16, 8], atol=1e-4)
    np.testing.assert_allclose(files["boxes"][1, 15], [30, 42, 40, 52], atol=1e-4)
    np.testing.assert_allclose(files["ims"][0, 0, 32:], [8 / 48, 0, 16 / 48, 8 / 32, (8 / 48) * (8 / 32)], atol=1e-6)
    assert processed_region(processor, 40, 64) == pytest.approx((0, 12, 40, 52))


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of --region_encoder"),
        (["--train_region_encoder", "--vision_model_name_or_path", "x"], "exactly one of"),
        (["--vision_model_name_or_path", "x", "--num_regions", "9"], "a backbone's grid"),
        (["--region_encoder", "/nonexistent/encoder"], "is not a folder"),
        (["--train_region_encoder", "--batch_size", "0"], "--batch_size must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_with_one_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        extract_main(["--output_dir", str(tmp_path / "out"), *extra])
    assert message in capsys.readouterr().err


def test_bad_data_is_refused_with_one_line(tmp_path, uneven_imagefolder):
    encoder = tmp_path / "encoder"
    RegionEncoderModel(RegionEncoderConfig(**TINY_ENCODER)).save_pretrained(encoder)
    features = tmp_path / "scan"
    features.mkdir()
    np.save(features / "train_ims.npy", np.zeros((2, 3, 4), dtype=np.float32))
    (features / "train_caps.txt").write_text("a\nb\n")
    with pytest.raises(SystemExit, match="holds precomputed image_features already"):
        extract_main(["--data", str(features), "--region_encoder", str(encoder), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="cannot load --data"):
        extract_main(["--data", str(tmp_path / "missing.json"), "--region_encoder", str(encoder), "--output_dir", str(tmp_path / "o")])
    not_an_encoder = tmp_path / "empty"
    not_an_encoder.mkdir()
    with pytest.raises(SystemExit, match="cannot load --region_encoder"):
        extract_main(["--data", str(uneven_imagefolder), "--region_encoder", str(not_an_encoder), "--output_dir", str(tmp_path / "o")])
