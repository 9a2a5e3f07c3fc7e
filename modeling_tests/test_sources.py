"""Tests for hf_mvam.data.sources (every kind of source, bad data, the error messages), and for the
image loading and region-feature stacking the loaded data goes through."""

import io
import json
import os
import types

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_mvam.data.collate import ImageCaptionCollator, ImageCaptionPairs
from hf_mvam.data.sources import load_image_caption_dataset
from hf_mvam.evaluation import encode_split
from hf_mvam.image_loading import load_image


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep datasets' cache (imagefolder, from_generator) out of the home folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def png(path, colour=(200, 30, 30), mode="RGB"):
    """Write a small PNG and return its path as a string."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (12, 10), colour if mode == "RGB" else 128).save(path)
    return str(path)


def png_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def garbage(path):
    with open(path, "wb") as file:
        file.write(b"this is not an image")
    return str(path)


def assert_common_format(splits: datasets.DatasetDict):
    for dataset in splits.values():
        assert dataset.column_names == ["image", "captions"]
        # Undecoded: the processor decodes with load_image, as it does every other image.
        assert dataset.features["image"] == datasets.Image(decode=False)
        assert dataset.features["captions"] == datasets.List(datasets.Value("string"))
        for example in dataset:
            assert load_image(example["image"]).size[0] > 0
            assert example["captions"] and all(c == c.strip() and c for c in example["captions"])


# --- 1. save_to_disk -------------------------------------------------------------------------


def test_save_to_disk_dict_with_split_column_and_list_captions(tmp_path):
    rows = {
        "image": [
            {"bytes": png_bytes((255, 0, 0)), "path": None},
            {"bytes": png_bytes((0, 255, 0)), "path": None},
            {"bytes": b"garbage bytes", "path": "broken.jpg"},
            {"bytes": png_bytes((0, 0, 255)), "path": None},
            {"bytes": png_bytes((9, 9, 9)), "path": None},
            {"bytes": png_bytes((50, 50, 50)), "path": None},
        ],
        "caption": [
            ["a red square", " a red thing "],
            ["green", "", "   "],
            ["broken"],
            ["blue"],
            ["restval image"],
            ["", " "],
        ],
        "split": ["train", "val", "test", "test", "restval", "train"],
        "img_id": ["0", "1", "2", "3", "4", "5"],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.List(datasets.Value("string")),
            "split": datasets.Value("string"),
            "img_id": datasets.Value("string"),
        }
    )
    folder = tmp_path / "saved"
    saved = datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)})
    saved.save_to_disk(str(folder))

    splits, stats = load_image_caption_dataset(str(folder))

    assert list(splits) == ["train", "validation", "test"]
    assert_common_format(splits)
    assert [ex["captions"] for ex in splits["train"]] == [
        ["a red square", "a red thing"],
        ["restval image"],
    ]
    assert splits["validation"]["captions"] == [["green"]]
    assert splits["test"]["captions"] == [["blue"]]
    assert load_image(splits["test"][0]["image"]).getpixel((0, 0)) == (0, 0, 255)
    assert stats["source"] == "load_from_disk"
    assert stats["skipped_captions"] == 2 + 2
    reasons = {(split, name): reason for split, name, reason in stats["skipped_images"]}
    assert set(reasons) == {("test", "broken.jpg"), ("train", "train[2]")}
    assert "cannot read image broken.jpg" in reasons[("test", "broken.jpg")]
    assert "no caption" in reasons[("train", "train[2]")]
    assert stats["num_images"] == {"train": 2, "validation": 1, "test": 1}
    assert stats["num_captions"] == {"train": 3, "validation": 1, "test": 1}
    # A second load reuses datasets' cached map results and reports the same.
    assert load_image_caption_dataset(str(folder))[1] == stats


def test_save_to_disk_single_dataset_becomes_train(tmp_path):
    dataset = datasets.Dataset.from_dict(
        {"picture": [Image.new("L", (5, 5), 100)], "text": ["a grey square"]},
        features=datasets.Features({"picture": datasets.Image(), "text": datasets.Value("string")}),
    )
    dataset.save_to_disk(str(tmp_path / "one"))
    splits, stats = load_image_caption_dataset(str(tmp_path / "one"))
    assert list(splits) == ["train"]
    assert_common_format(splits)
    assert splits["train"][0]["captions"] == ["a grey square"]
    assert stats["skipped_images"] == []


# --- 2. imagefolder --------------------------------------------------------------------------


def test_imagefolder_jsonl_with_bad_images_and_split_folders(tmp_path):
    root = tmp_path / "folder"
    png(root / "train" / "a.png")
    png(root / "train" / "grey.png", mode="L")
    garbage(root / "train" / "corrupt.png")
    png(root / "val" / "c.png", colour=(0, 0, 0))
    train_rows = [
        {"file_name": "a.png", "captions": ["first caption", "second caption"]},
        {"file_name": "grey.png", "captions": ["a grey image", ""]},
        {"file_name": "corrupt.png", "captions": ["never read"]},
        {"file_name": "missing.png", "captions": ["no file"]},
    ]
    (root / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in train_rows))
    (root / "val" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "c.png", "captions": ["black"]})
    )

    splits, stats = load_image_caption_dataset(str(root))

    assert list(splits) == ["train", "validation"]
    assert_common_format(splits)
    assert splits["train"]["captions"] == [["first caption", "second caption"], ["a grey image"]]
    assert load_image(splits["train"][1]["image"]).mode == "RGB"
    assert splits["validation"]["captions"] == [["black"]]
    assert stats["source"] == "imagefolder"
    assert stats["skipped_captions"] == 1
    skipped = {os.path.basename(name): reason for _, name, reason in stats["skipped_images"]}
    assert set(skipped) == {"corrupt.png", "missing.png"}
    assert "cannot read image" in skipped["corrupt.png"]
    assert "not found" in skipped["missing.png"]
    assert all(split == "train" for split, _, _ in stats["skipped_images"])
    assert all(os.path.isabs(name) for _, name, _ in stats["skipped_images"])


def test_imagefolder_csv_repeated_rows_become_one_image(tmp_path):
    root = tmp_path / "csv"
    png(root / "dog.png", colour=(10, 20, 30))
    png(root / "cat.png", colour=(40, 50, 60))
    (root / "metadata.csv").write_text(
        "file_name,caption\n"
        "dog.png,a dog on grass\n"
        "cat.png,a cat\n"
        "dog.png,  a brown dog \n"
        'dog.png,""\n'
        'cat.png," "\n'
    )
    splits, stats = load_image_caption_dataset(str(root))
    assert list(splits) == ["train"]
    assert_common_format(splits)
    train = splits["train"]
    assert train["captions"] == [["a dog on grass", "a brown dog"], ["a cat"]]
    assert load_image(train[0]["image"]).getpixel((0, 0)) == (10, 20, 30)
    assert stats["skipped_captions"] == 2
    assert stats["skipped_images"] == []


def test_imagefolder_numeric_captions_are_dropped_and_counted(tmp_path):
    root = tmp_path / "numeric"
    png(root / "a.png")
    png(root / "b.png")
    (root / "metadata.csv").write_text("file_name,caption\na.png,1\nb.png,2.5\n")  # a number column
    splits, stats = load_image_caption_dataset(str(root))
    assert stats["num_images"] == {"train": 0}
    assert stats["skipped_captions"] == 2
    assert sorted((os.path.basename(name), reason) for _, name, reason in stats["skipped_images"]) == [
        ("a.png", "no caption left after dropping empty ones"),
        ("b.png", "no caption left after dropping empty ones"),
    ]


# --- 3. Karpathy JSON ------------------------------------------------------------------------


def write_karpathy(tmp_path):
    images = tmp_path / "images"
    png(images / "train2014" / "t1.jpg")
    png(images / "train2014" / "t2.jpg")
    png(images / "val2014" / "v1.jpg")
    png(images / "val2014" / "r1.jpg")
    png(images / "val2014" / "nocap.jpg")
    garbage(images / "val2014" / "x1.jpg")

    def entry(name, folder, split, *raws):
        return {
            "filepath": folder,
            "filename": name,
            "split": split,
            "sentences": [{"raw": raw, "tokens": raw.split()} for raw in raws],
        }

    content = {
        "dataset": "coco",
        "images": [
            entry("t1.jpg", "train2014", "train", "A man riding a horse.", "A horse. "),
            entry("t2.jpg", "train2014", "train", "Two dogs."),
            entry("r1.jpg", "val2014", "restval", "restval one"),
            entry("v1.jpg", "val2014", "val", "a val caption"),
            entry("x1.jpg", "val2014", "test", "corrupt image"),
            entry("gone.jpg", "val2014", "test", "missing image"),
            entry("nocap.jpg", "val2014", "test", "   "),
            {"split": "test", "sentences": [{"raw": "no file name"}]},
        ],
    }
    json_path = tmp_path / "dataset_coco.json"
    json_path.write_text(json.dumps(content))
    return str(json_path), str(images)


def test_karpathy_json(tmp_path):
    json_path, image_root = write_karpathy(tmp_path)
    splits, stats = load_image_caption_dataset(json_path, image_root=image_root)
    assert list(splits) == ["train", "validation", "test"]
    assert_common_format({k: v for k, v in splits.items() if len(v)})
    assert splits["train"]["captions"] == [
        ["A man riding a horse.", "A horse."],
        ["Two dogs."],
        ["restval one"],
    ]
    assert splits["validation"]["captions"] == [["a val caption"]]
    assert len(splits["test"]) == 0
    assert stats["source"] == "karpathy_json"
    assert stats["skipped_captions"] == 1
    skipped = {
        (split, os.path.basename(name)): reason for split, name, reason in stats["skipped_images"]
    }
    assert set(skipped) == {
        ("test", "images[7]"),
        ("test", "x1.jpg"),
        ("test", "gone.jpg"),
        ("test", "nocap.jpg"),
    }
    assert "no filename" in skipped[("test", "images[7]")]
    assert "not found" in skipped[("test", "gone.jpg")]
    names = [name for _, name, _ in stats["skipped_images"]]
    assert os.path.join(image_root, "val2014", "gone.jpg") in names


def test_karpathy_json_errors(tmp_path):
    json_path, _ = write_karpathy(tmp_path)
    with pytest.raises(ValueError, match="pass image_root="):
        load_image_caption_dataset(json_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_caption_dataset(json_path, image_root=str(tmp_path / "nowhere"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="needs a top-level 'images' list"):
        load_image_caption_dataset(str(other), image_root=str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_image_caption_dataset(str(broken), image_root=str(tmp_path))


def test_karpathy_json_variations(tmp_path):
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        png(images / name)
    content = {
        "images": [
            {"filename": "a.jpg", "sentences": ["a plain string", {"raw": "a raw one"}]},
            {
                "filename": "b.jpg",
                "sentences": [
                    {"raw": 123},  # not text: dropped, not kept as "123"
                    {"raw": 123, "tokens": ["two", "cats"]},
                    {"raw": None, "tokens": ["a", None]},  # dropped
                    {"tokens": []},  # dropped
                    42,  # dropped
                ],
            },
            {"filename": "c.jpg", "sentences": "one sentence"},  # not a list
            {"filename": "d.jpg", "sentences": [{"raw": 7}]},  # left without captions
            "not an entry",
            {"filename": 5, "split": "val", "sentences": ["x"]},
            {"filename": "a.jpg", "filepath": 3, "sentences": ["x"]},
        ]
    }
    json_path = tmp_path / "karpathy.json"
    json_path.write_text(json.dumps(content))
    splits, stats = load_image_caption_dataset(str(json_path), image_root=str(images))
    assert splits["train"]["captions"] == [
        ["a plain string", "a raw one"],
        ["two cats"],
        ["one sentence"],
    ]
    assert stats["skipped_captions"] == 5
    assert stats["skipped_images"] == [
        ("train", "images[4]", "the JSON entry is a str, not an object"),
        ("validation", "images[5]", "filename 5 in the JSON entry is not a string"),
        ("train", "images[6]", "filepath 3 in the JSON entry is not a string"),
        ("train", os.path.join(str(images), "d.jpg"), "no caption left after dropping empty ones"),
    ]


# --- 4. SCAN precomputed features ------------------------------------------------------------


def test_scan_precomputed_layout(tmp_path):
    root = tmp_path / "f30k_precomp"
    root.mkdir()
    rng = np.random.default_rng(0)
    train = rng.standard_normal((3, 4, 6)).astype(np.float32)  # N x R x D
    np.save(root / "train_ims.npy", train)
    (root / "train_caps.txt").write_text("a\nb\nc\n\nd\n  e  \n")  # 2 per image, one blank
    dev = rng.standard_normal((2, 4, 6)).astype(np.float64)
    dev[1, 2, 3] = np.nan
    np.save(root / "dev_ims.npy", dev)
    (root / "dev_caps.txt").write_text("dev one\ndev two\n")
    (root / "train_ids.txt").write_text("1\n2\n3\n")  # ignored

    splits, stats = load_image_caption_dataset(str(root))

    assert list(splits) == ["train", "validation"]
    assert stats["source"] == "scan_precomputed"
    for dataset in splits.values():
        assert dataset.column_names == ["image_features", "captions"]
        assert dataset.features["image_features"] == datasets.Array2D((4, 6), "float32")
    assert splits["train"]["captions"] == [["a", "b"], ["c"], ["d", "e"]]
    features = splits["train"].with_format("numpy")[:]["image_features"]  # [N, R, D]
    assert features.dtype == np.float32 and features.shape == (3, 4, 6)
    np.testing.assert_array_equal(features, train)
    assert splits["validation"]["captions"] == [["dev one"]]
    assert stats["skipped_captions"] == 1
    assert stats["skipped_images"] == [
        ("validation", "validation[1]", "image features contain NaN or infinite values")
    ]


def test_scan_errors(tmp_path):
    root = tmp_path / "scan"
    root.mkdir()
    np.save(root / "test_ims.npy", np.zeros((2, 3, 4), dtype=np.float32))
    (root / "test_caps.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="3 captions for the 2 images"):
        load_image_caption_dataset(str(root))
    (root / "test_caps.txt").unlink()
    with pytest.raises(ValueError, match="no captions file"):
        load_image_caption_dataset(str(root))


def test_scan_boxes_image_ids_and_minimal_pairs_become_columns(tmp_path):
    """What extract_features writes beside SCAN's two files comes back as columns; a skipped image
    (NaN features) moves later rows up, and variant_of follows them."""
    root = tmp_path / "scan"
    root.mkdir()
    rng = np.random.default_rng(0)
    features = rng.standard_normal((4, 3, 5)).astype(np.float32)
    features[1, 0, 0] = np.nan  # image 1 is skipped
    boxes = rng.uniform(0, 64, (4, 3, 4)).astype(np.float32)
    np.save(root / "test_ims.npy", features)
    np.save(root / "test_boxes.npy", boxes)
    (root / "test_caps.txt").write_text("".join(f"caption {i}\n" for i in range(4)))
    (root / "test_images.txt").write_text("a.png\nb.png\nc.png\nd.png\n")
    meta = [{"variant_of": -1, "changed": ""}, {"variant_of": 3, "changed": "size"},
            {"variant_of": 3, "changed": "colour"}, {"variant_of": -1, "changed": ""}]
    (root / "test_meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in meta))

    test = load_image_caption_dataset(str(root))[0]["test"]

    assert test.column_names == ["image_features", "captions", "boxes", "image_id", "variant_of", "changed"]
    assert test.features["boxes"] == datasets.Array2D((3, 4), "float32")
    np.testing.assert_array_equal(np.stack(test.with_format("numpy")["boxes"]), boxes[[0, 2, 3]])
    assert test["image_id"] == ["a.png", "c.png", "d.png"]
    assert test["variant_of"] == [-1, 2, -1]  # c.png varies d.png, now row 2
    assert test["changed"] == ["", "colour", ""]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("test_boxes.npy", np.zeros((2, 3, 5), dtype=np.float32), "must hold N x R x 4 boxes"),
        ("test_boxes.npy", np.zeros((3, 3, 4), dtype=np.float32), "must hold N x R x 4 boxes"),
        ("test_images.txt", "a.png\n", "has 1 lines for the 2 images"),
        ("test_meta.jsonl", '{"variant_of": -1}\n', "has 1 lines for the 2 images"),
        ("test_meta.jsonl", '{"variant_of": -1}\n{"changed": "x"}\n', "keys ['changed'] differ"),
        ("test_meta.jsonl", '{"variant_of": 1}\n{"variant_of": 1}\n', "line 2: variant_of must be -1 or the row"),
        ("test_meta.jsonl", '{"variant_of": 2}\n{"variant_of": -1}\n', "line 1: variant_of must be"),
        ("test_meta.jsonl", '{"a": [1]}\n{"a": [2]}\n', "metadata values must be numbers"),
        ("test_meta.jsonl", '{"a": 1}\n{"a": "x"}\n', "'a' is a str, line 1's a int"),
        ("test_meta.jsonl", '{"boxes": 1}\n{"boxes": 2}\n', "names a column of the layout"),
        ("test_meta.jsonl", '{"a": 1}\nnot json\n', "line 2 is not JSON"),
    ],
)
def test_scan_side_files_are_checked(tmp_path, name, content, message):
    root = tmp_path / "scan"
    root.mkdir()
    np.save(root / "test_ims.npy", np.zeros((2, 3, 4), dtype=np.float32))
    (root / "test_caps.txt").write_text("a\nb\n")
    if isinstance(content, np.ndarray):
        np.save(root / name, content)
    else:
        (root / name).write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("]", "\\]")):
        load_image_caption_dataset(str(root))


# --- 5. Hub ids and other folders ------------------------------------------------------------


def flickr_like_hub_dataset(tmp_path):
    """Like nlphuji/flickr30k: one test split, a split column, 5 captions as a list."""
    rows = {
        "image": [{"bytes": png_bytes((i * 40, 0, 0)), "path": f"{i}.jpg"} for i in range(4)],
        "caption": [[f"caption {i}.{j}" for j in range(5)] for i in range(4)],
        "sentids": [[str(5 * i + j) for j in range(5)] for i in range(4)],
        "split": ["train", "val", "test", "train"],
        "img_id": [str(i) for i in range(4)],
        "filename": [f"{i}.jpg" for i in range(4)],
    }
    rows["caption"][3] = ["", "", "", "", ""]
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    return datasets.DatasetDict({"test": dataset})


def test_hub_id_goes_through_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return flickr_like_hub_dataset(tmp_path)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits, stats = load_image_caption_dataset("nlphuji/flickr30k")
    assert calls == [("nlphuji/flickr30k", (), {})]
    assert stats["source"] == "hub"
    assert list(splits) == ["train", "validation", "test"]
    assert_common_format(splits)
    assert splits["train"]["captions"] == [[f"caption 0.{j}" for j in range(5)]]
    assert splits["test"]["captions"] == [[f"caption 2.{j}" for j in range(5)]]
    assert stats["skipped_images"] == [
        ("train", "3.jpg", "no caption left after dropping empty ones")
    ]
    assert stats["skipped_captions"] == 5


def test_hub_dataset_with_chosen_columns_and_relative_paths(tmp_path, monkeypatch):
    png(tmp_path / "pics" / "one.png", colour=(1, 2, 3))
    hub = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {
                    "file": ["one.png", "two.png"],
                    "alt_text": ["one row", "two rows"],
                    "sentences": [["ignored"], ["ignored"]],
                }
            ),
            "validation": datasets.Dataset.from_dict(
                {
                    "file": ["one.png"],
                    "alt_text": ["val"],
                    "sentences": [["ignored"]],
                }
            ),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: hub)
    splits, stats = load_image_caption_dataset(
        "someone/alt-text",
        image_column="file",
        caption_column="alt_text",
        image_root=str(tmp_path / "pics"),
    )
    assert_common_format(splits)
    assert splits["train"]["captions"] == [["one row"]]
    assert load_image(splits["train"][0]["image"]).getpixel((0, 0)) == (1, 2, 3)
    assert stats["skipped_images"][0][:2] == ("train", str(tmp_path / "pics" / "two.png"))

    # Default caption column: the first of caption, captions, sentences, raw, text.
    splits, _ = load_image_caption_dataset(
        "someone/alt-text", image_column="file", image_root=str(tmp_path / "pics")
    )
    assert splits["validation"]["captions"] == [["ignored"]]


def test_missing_columns_are_named(monkeypatch, tmp_path):
    hub = flickr_like_hub_dataset(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: hub)
    with pytest.raises(ValueError, match=r"caption column 'alt'.*columns: \['image', 'caption'"):
        load_image_caption_dataset("a/b", caption_column="alt")
    with pytest.raises(ValueError, match=r"image column 'photo' not found.*'filename'"):
        load_image_caption_dataset("a/b", image_column="photo")
    with pytest.raises(ValueError, match="image column 'sentids' has the feature"):
        load_image_caption_dataset("a/b", image_column="sentids")

    no_captions = datasets.DatasetDict({"train": hub["test"].remove_columns("caption")})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: no_captions)
    with pytest.raises(ValueError, match=r"no caption column found .*available columns: \['image'"):
        load_image_caption_dataset("a/b")
    no_images = datasets.DatasetDict({"train": hub["test"].remove_columns("image")})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: no_images)
    with pytest.raises(ValueError, match=r"no image column found .*available columns: \['caption'"):
        load_image_caption_dataset("a/b")


def test_folder_of_parquet_files(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes((7, 7, 7)), "path": "a.png"}], "text": ["grey"]}
    ).cast_column("image", datasets.Image())
    dataset.to_parquet(str(folder / "test.parquet"))
    splits, stats = load_image_caption_dataset(str(folder))
    assert stats["source"] == "data_files"
    assert list(splits) == ["test"]
    assert splits["test"]["captions"] == [["grey"]]
    assert load_image(splits["test"][0]["image"]).getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("data", ["./no/such/folder", "/no/such/folder", "captions.json", "a/b/c"])
def test_local_looking_paths_that_do_not_exist(data, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the Hub"))
    with pytest.raises(FileNotFoundError, match=data.replace(".", r"\.")):
        load_image_caption_dataset(data)


def test_unsupported_file_and_empty_folder(tmp_path):
    text_file = tmp_path / "captions.txt"
    text_file.write_text("hello\n")
    with pytest.raises(ValueError, match="unsupported file"):
        load_image_caption_dataset(str(text_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"cannot read the folder {empty}"):
        load_image_caption_dataset(str(empty))


# --- Image loading ---------------------------------------------------------------------------


def test_corrupt_header_is_skipped_and_named(tmp_path):
    root = tmp_path / "bomb"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.bmp")
    header = bytearray((root / "ok.bmp").read_bytes())
    header[18:26] = (100_000).to_bytes(4, "little") * 2  # claims 100000 x 100000 pixels
    (root / "huge.bmp").write_bytes(bytes(header))  # Pillow raises DecompressionBombError
    (root / "metadata.csv").write_text("file_name,caption\nok.bmp,fine\nhuge.bmp,corrupt\n")
    splits, stats = load_image_caption_dataset(str(root))
    assert splits["train"]["captions"] == [["fine"]]
    [(split, name, reason)] = stats["skipped_images"]
    assert os.path.basename(name) == "huge.bmp" and reason.startswith("cannot read image")
    with pytest.raises(ValueError, match="cannot read image .*huge.bmp"):
        load_image(str(root / "huge.bmp"))


def test_sixteen_bit_and_other_high_depth_images(tmp_path):
    values = np.array([[65535, 32896], [0, 257]], dtype=np.uint16)  # / 257 -> 255, 128, 0, 1
    expected = [[255, 128], [0, 1]]
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    for image in (str(path), values, values.astype(">u2"), Image.fromarray(values.astype(">u2"))):
        rgb = load_image(image)
        assert rgb.mode == "RGB"
        assert np.asarray(rgb)[..., 0].tolist() == expected
        assert np.asarray(rgb)[0, 0].tolist() == [255, 255, 255]
    # Mode I (int32) holds 8-bit values; mode F floats in [0, 1].
    assert load_image(Image.fromarray(np.full((2, 2), 200, np.int32))).getpixel((0, 0)) == (200,) * 3
    assert load_image(Image.fromarray(np.full((2, 2), 0.5, np.float32))).getpixel((0, 0)) == (128,) * 3
    with pytest.raises(ValueError, match=r"int32 images must lie in \[0, 255\].*\[0, 40000\]"):
        load_image(Image.fromarray(np.array([[0, 40000]], np.int32)), name="deep.tif")
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        load_image(Image.fromarray(np.full((2, 2), 200.0, np.float32)))


def test_integer_arrays_are_eight_bit_values():
    assert load_image(np.full((2, 2, 3), 200, np.int64)).getpixel((0, 0)) == (200, 200, 200)
    assert load_image(np.ones((2, 2), np.int64)).getpixel((0, 0)) == (1, 1, 1)  # not scaled to 255
    assert load_image(np.full((2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.array([[True, False]])).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match=r"cannot use pic: int64 images must lie in \[0, 255\].*300"):
        load_image(np.array([[0, 300]], np.int64), name="pic")
    with pytest.raises(ValueError, match=r"int8 images must lie in \[0, 255\].*-1"):
        load_image(np.array([[0, -1]], np.int8))
    with pytest.raises(ValueError, match="data type complex128"):
        load_image(np.zeros((2, 2), complex))


# --- Precomputed features with different region counts ----------------------------------------


def varying_region_features(tmp_path):
    """A split of three images with 20, 36 and 20 regions of 4 features."""
    dataset = datasets.Dataset.from_dict(
        {
            "image_features": [np.ones((r, 4)).tolist() for r in (20, 36, 20)],
            "caption": ["a b", "c d", "e f"],
        }
    )
    dataset.save_to_disk(str(tmp_path / "saved"))
    splits, _ = load_image_caption_dataset(str(tmp_path / "saved"))
    assert splits["train"].features["image_features"] == datasets.Array2D((None, 4), "float32")
    return splits["train"]


class _Processor:
    def __call__(self, text, return_tensors):
        return {"input_ids": torch.zeros(len(text), 3, dtype=torch.long)}


def test_collator_needs_the_same_number_of_regions(tmp_path):
    pairs = ImageCaptionPairs(varying_region_features(tmp_path))
    collate = ImageCaptionCollator(_Processor())
    batch = collate(pairs.__getitems__([0, 2]))
    assert batch["image_features"].shape == (2, 20, 4)
    assert batch["image_features"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"regions per image \(\{20, 36\}\).*pad or subsample"):
        collate(pairs.__getitems__([0, 1]))


class _RegionModel(torch.nn.Module):
    """Stands in for a UARDA model: regions pass through unchanged."""

    config = types.SimpleNamespace(model_type="uarda")

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode_images(self, image_features):
        return image_features


@pytest.mark.parametrize("batch_size", [3, 1])  # within one chunk, and across chunks
def test_evaluation_needs_the_same_number_of_regions(tmp_path, batch_size):
    split = varying_region_features(tmp_path)
    with pytest.raises(ValueError, match=r"regions per image \(\{20, 36\}\)"):
        encode_split(_RegionModel(), None, split, batch_size=batch_size)


def test_recorded_eval_split_comes_from_the_run_s_local_paths(tmp_path, monkeypatch):
    """A model folder names its local data by its name only (training_args.json is uploaded): the
    split it was evaluated on is loaded from the path the run kept in .hf_mvam/ (or the one
    given), from any working folder, and cut to the run's max_eval_samples."""
    from hf_mvam.data.splits import TRAINING_ARGS_NAME, load_recorded_eval_split
    from hf_mvam.output_folder import LOCAL_PATHS_NAME, RUN_DIR

    data = tmp_path / "my_images"
    for split, colours in (("train", [(1, 1, 1)]), ("test", [(10, 0, 0), (20, 0, 0), (30, 0, 0)])):
        rows = []
        for i, colour in enumerate(colours):
            png(data / split / f"{i}.png", colour)
            rows.append({"file_name": f"{i}.png", "caption": f"{split} {i}"})
        (data / split / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    folder = tmp_path / "model"
    (folder / RUN_DIR).mkdir(parents=True)
    recorded = {"data": {"data": "my_images", "image_root": None, "max_eval_samples": 2, "all_pairs": False},
                "eval_split": "test", "local_data": True}
    (folder / TRAINING_ARGS_NAME).write_text(json.dumps(recorded))
    (folder / RUN_DIR / LOCAL_PATHS_NAME).write_text(json.dumps({"data.data": str(data)}))
    monkeypatch.chdir(tmp_path / "model")

    split, _, again = load_recorded_eval_split(folder)
    assert split["captions"] == [["test 0"], ["test 1"]] and again == recorded
    assert [load_image(image).getpixel((0, 0)) for image in split["image"]] == [(10, 0, 0), (20, 0, 0)]
    (folder / RUN_DIR / LOCAL_PATHS_NAME).unlink()  # as a copy from the Hub has it
    with pytest.raises(ValueError, match=r"records only the name of its local data \('my_images'\): pass --data"):
        load_recorded_eval_split(folder)
    assert load_recorded_eval_split(folder, data=str(data))[0]["captions"] == [["test 0"], ["test 1"]]
