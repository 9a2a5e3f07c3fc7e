"""Tests of what the loaders of hf_mvam.data.sources refuse, skip or report: image paths that leave
the data root, files that cannot be read at all, and suspicious data (unknown splits, duplicate
images, images in both train and an evaluation split)."""

import builtins
import io
import json
import os

import datasets
import numpy as np
import PIL.Image
import pytest
from PIL import Image

from hf_mvam.data.sources import OUTSIDE_DATA_ROOT, data_warnings, load_image_caption_dataset
from hf_mvam.data.splits import load_splits
from hf_mvam.image_loading import load_image

SECRET_COLOUR = (1, 2, 3)


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def png(path, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (6, 5), colour).save(path)
    return str(path)


@pytest.fixture
def secret(tmp_path):
    """A PNG outside every data root of these tests; :func:`guard` fails a test that opens it."""
    return png(tmp_path / "outside" / "secret.png", SECRET_COLOUR)


@pytest.fixture
def guard(secret, monkeypatch):
    """Record (and refuse) every open of the secret file through Python's and Pillow's openers."""
    opened = []
    real_secret = os.path.realpath(secret)

    def guarded(opener):
        def open_unless_secret(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(file) == real_secret:
                opened.append(os.fspath(file))
                raise AssertionError(f"opened the file outside the data root: {file}")
            return opener(file, *args, **kwargs)

        return open_unless_secret

    monkeypatch.setattr(builtins, "open", guarded(builtins.open))
    monkeypatch.setattr(io, "open", guarded(io.open))
    monkeypatch.setattr(os, "open", guarded(os.open))
    monkeypatch.setattr(PIL.Image, "open", guarded(PIL.Image.open))
    return opened


def outside_paths(secret, root):
    """The secret file as an absolute path, through ../ and through a symlink inside ``root``."""
    os.makedirs(root, exist_ok=True)
    os.symlink(secret, os.path.join(root, "link.png"))
    return {"absolute": secret, "dotdot": os.path.relpath(secret, root), "symlink": "link.png"}


def assert_refused(stats, names, opened):
    reasons = {os.path.basename(name): reason for _, name, reason in stats["skipped_images"]}
    for name in names:
        assert reasons.get(os.path.basename(name)) == OUTSIDE_DATA_ROOT, (name, stats["skipped_images"])
    assert opened == []


def colours(split):
    return [load_image(image).getpixel((0, 0)) for image in split["image"]]


# --- Paths stay inside the data root ---------------------------------------------------------


def test_karpathy_paths_outside_image_root_are_skipped_unread(tmp_path, secret, guard):
    images = tmp_path / "images"
    png(images / "sub" / "inside.png")
    os.symlink(images / "sub" / "inside.png", images / "inside_link.png")  # resolves inside: fine
    outside = outside_paths(secret, images)
    entries = [
        {"filepath": "sub", "filename": "inside.png"},
        {"filename": "inside_link.png"},
        {"filename": outside["absolute"]},
        {"filepath": os.path.dirname(secret), "filename": "secret.png"},
        {"filepath": "sub", "filename": os.path.join("..", outside["dotdot"])},
        {"filename": outside["symlink"]},
    ]
    for entry in entries:
        entry.update(split="train", sentences=[{"raw": "a caption"}])
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))

    splits, stats = load_image_caption_dataset(str(tmp_path / "karpathy.json"), image_root=str(images))

    assert colours(splits["train"]) == [(200, 30, 30), (200, 30, 30)]
    assert [reason for _, _, reason in stats["skipped_images"]] == [OUTSIDE_DATA_ROOT] * 4
    assert [name for _, name, _ in stats["skipped_images"]][-1] == str(images / "link.png")
    assert guard == []
    # Kept paths are the real files that were checked.
    assert [image["path"] for image in splits["train"]["image"]] == [str(images / "sub" / "inside.png")] * 2


def test_paths_outside_are_read_when_allowed(tmp_path, secret):
    images = tmp_path / "images"
    outside = outside_paths(secret, images)
    entries = [{"filename": name, "sentences": ["a caption"]} for name in outside.values()]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    splits, stats = load_image_caption_dataset(
        str(tmp_path / "karpathy.json"), image_root=str(images), allow_paths_outside_data_root=True
    )
    assert stats["skipped_images"] == []
    assert colours(splits["train"]) == [SECRET_COLOUR] * 3

    # load_splits passes the choice on.
    _, _, stats = load_splits(str(tmp_path / "karpathy.json"), image_root=str(images))
    assert len(stats["skipped_images"]) == 3
    _, _, stats = load_splits(str(tmp_path / "karpathy.json"), image_root=str(images), allow_paths_outside_data_root=True)
    assert stats["skipped_images"] == []


def test_imagefolder_file_names_outside_the_folder_are_skipped_unread(tmp_path, secret, guard):
    root = tmp_path / "folder"
    png(root / "train" / "a.png")
    outside = outside_paths(secret, root / "train")
    rows = [{"file_name": "a.png", "caption": "fine"}] + [
        {"file_name": name, "caption": "never read"} for name in outside.values()
    ]
    (root / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    splits, stats = load_image_caption_dataset(str(root))
    assert splits["train"]["captions"] == [["fine"]]
    assert_refused(stats, [secret, "link.png"], guard)
    assert len(stats["skipped_images"]) == 3


def test_saved_dataset_paths_are_confined_to_its_folder(tmp_path, secret, guard):
    folder = tmp_path / "saved"
    png(folder / "pics" / "a.png")
    outside = outside_paths(secret, folder)
    # A column of file paths, relative to the saved folder.
    paths = datasets.Dataset.from_dict(
        {"image": ["pics/a.png", *outside.values()], "caption": ["fine", "x", "y", "z"]}
    )
    paths.save_to_disk(str(folder))
    splits, stats = load_image_caption_dataset(str(folder))
    assert colours(splits["train"]) == [(200, 30, 30)]
    assert_refused(stats, [secret, "link.png"], guard)
    assert len(stats["skipped_images"]) == 3


def test_data_files_and_hub_paths_are_confined(tmp_path, secret, guard, monkeypatch):
    folder = tmp_path / "csv_folder"
    png(folder / "a.png")
    outside = outside_paths(secret, folder)
    lines = ["image,text", "a.png,fine"] + [f"{name},never read" for name in outside.values()]
    # Three CSV files against two PNGs: datasets reads the folder as CSV, not as an image folder.
    for split in ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    splits, stats = load_image_caption_dataset(str(folder))
    assert stats["source"] == "data_files" and splits["train"]["captions"] == [["fine"]]
    assert_refused(stats, [secret, "link.png"], guard)
    assert len(stats["skipped_images"]) == 3 * 3

    # A Hub dataset: file paths relative to image_root, and datasets.Image entries holding only a
    # path; embedded bytes are used whatever their path says (datasets keeps bytes only when the
    # path is not a local file).
    embedded = io.BytesIO()
    Image.new("RGB", (2, 2), (9, 9, 9)).save(embedded, format="PNG")
    elsewhere = os.path.join(os.path.dirname(secret), "not_here.png")
    image_entries = [{"bytes": None, "path": secret}, {"bytes": embedded.getvalue(), "path": elsewhere}]
    hub = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": ["a.png", *outside.values()], "text": ["fine", "x", "y", "z"]}),
            "test": datasets.Dataset.from_dict(
                {"image": image_entries, "text": ["path only", "bytes"]},
                features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
            ),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub)
    splits, stats = load_image_caption_dataset("someone/paths", image_root=str(folder))
    assert splits["train"]["captions"] == [["fine"]] and splits["test"]["captions"] == [["bytes"]]
    assert_refused(stats, [secret, "link.png"], guard)
    assert ("test", secret, OUTSIDE_DATA_ROOT) in stats["skipped_images"]
    # Without image_root, a Hub dataset's paths may only point into the download caches.
    splits, stats = load_image_caption_dataset("someone/paths")
    assert len(splits["train"]) == 0 and splits["test"]["captions"] == [["bytes"]]
    assert {reason for _, _, reason in stats["skipped_images"]} == {OUTSIDE_DATA_ROOT}
    assert guard == []


def test_streaming_reads_data_files_of_unknown_features(tmp_path):
    """A streamed CSV/JSON folder has no features until it is read (datasets' features is None):
    its path column is read all the same."""
    from hf_mvam.streaming import load_streaming_splits

    folder = tmp_path / "csv_stream"
    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 200, 30))):
        png(folder / name, colour)
    lines = ["image,text", f"{folder / 'a.png'},red", f"{folder / 'b.png'},green"]
    for split in ("train", "validation", "test"):  # more CSVs than PNGs: read as CSV
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    train, evaluation = load_streaming_splits(str(folder))
    assert sorted((pair["caption"], pair["image"].getpixel((0, 0))) for pair in train) == [
        ("green", (30, 200, 30)), ("red", (200, 30, 30))]
    assert evaluation["test"]["captions"] == [["red"], ["green"]]


def streamed_csv_folder(tmp_path, secret):
    """Three CSV splits of image paths (one inside the folder, relative; the secret three ways)."""
    folder = tmp_path / "csv_stream"
    png(folder / "a.png")
    outside = outside_paths(secret, folder)
    lines = ["image,text", "a.png,fine"] + [f"{name},never read" for name in outside.values()]
    for split in ("train", "validation", "test"):  # more CSVs than PNGs: read as CSV
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_streamed_paths_are_confined_to_the_data_folder(tmp_path, secret, guard, monkeypatch):
    """--streaming reads paths as the loaders do: relative to the data folder, refused (unread)
    when they leave it."""
    from hf_mvam.streaming import load_streaming_splits

    folder = streamed_csv_folder(tmp_path, secret)
    monkeypatch.chdir(tmp_path)  # relative paths are the data folder's, not the working folder's
    train, evaluation = load_streaming_splits(str(folder))
    pairs = list(train)
    assert [pair["caption"] for pair in pairs] == ["fine"] and pairs[0]["image"].getpixel((0, 0)) == (200, 30, 30)
    for split in ("validation", "test"):
        assert evaluation[split]["captions"] == [["fine"]]
    assert guard == []


def test_streamed_paths_outside_are_read_when_allowed(tmp_path, secret):
    from hf_mvam.streaming import load_streaming_splits

    folder = streamed_csv_folder(tmp_path, secret)
    train, evaluation = load_streaming_splits(str(folder), allow_paths_outside_data_root=True)
    assert sorted(pair["image"].getpixel((0, 0)) for pair in train) == [SECRET_COLOUR] * 3 + [(200, 30, 30)]
    assert len(evaluation["test"]) == 4


# --- Refused before training, with one line ---------------------------------------------------


def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_metadata_that_is_not_utf8(tmp_path, name):
    root = tmp_path / "folder"
    png(root / "a.png")
    text = "file_name,caption\na.png,un café\n" if name.endswith(".csv") else '{"file_name": "a.png", "caption": "un café"}\n'
    (root / name).write_bytes(text.encode("latin-1"))
    message = one_line_error(lambda: load_image_caption_dataset(str(root)), "is not UTF-8 text")
    assert str(root / name) in message and "0xe9" in message


def test_other_text_files_that_are_not_utf8(tmp_path):
    (tmp_path / "k.json").write_bytes('{"images": [{"filename": "é.jpg"}]}'.encode("latin-1"))
    one_line_error(lambda: load_image_caption_dataset(str(tmp_path / "k.json"), image_root=str(tmp_path)), r"k\.json is not UTF-8")
    scan = tmp_path / "scan"
    scan.mkdir()
    np.save(scan / "test_ims.npy", np.zeros((1, 2, 3), np.float32))
    (scan / "test_caps.txt").write_bytes("café\n".encode("latin-1"))
    one_line_error(lambda: load_image_caption_dataset(str(scan)), r"test_caps\.txt is not UTF-8")
    files = tmp_path / "files"
    files.mkdir()
    (files / "data.csv").write_bytes("image,text\na.png,café\n".encode("latin-1"))
    one_line_error(lambda: load_image_caption_dataset(str(files)), r"data\.csv is not UTF-8")


def test_empty_or_broken_npy_files(tmp_path):
    root = tmp_path / "scan"
    root.mkdir()
    (root / "train_caps.txt").write_text("a\n")
    (root / "train_ims.npy").write_bytes(b"")
    one_line_error(lambda: load_image_caption_dataset(str(root)), r"train_ims\.npy is empty \(0 bytes\)")
    (root / "train_ims.npy").write_bytes(b"\x93NUMPY garbage")
    one_line_error(lambda: load_image_caption_dataset(str(root)), r"cannot read .*train_ims\.npy as a \.npy array")
    np.save(root / "train_ims.npy", np.array([{"pickled": 1}], dtype=object))
    one_line_error(lambda: load_image_caption_dataset(str(root)), r"cannot read .*train_ims\.npy")


@pytest.mark.parametrize(
    "error",
    [
        datasets.exceptions.DatasetNotFoundError("Dataset 'someone/nothing' doesn't exist on the Hub\nor cannot be accessed."),
        ConnectionError("Couldn't reach 'someone/nothing' on the Hub (LocalEntryNotFoundError)"),
    ],
)
def test_unreachable_hub_dataset(monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", fail)
    message = one_line_error(lambda: load_image_caption_dataset("someone/nothing"), "cannot load the Hub dataset 'someone/nothing'")
    assert type(error).__name__ in message


def test_feature_widths_that_differ_between_splits(tmp_path):
    root = tmp_path / "scan"
    root.mkdir()
    for split, width in (("train", 2048), ("dev", 2048), ("test", 1024)):
        np.save(root / f"{split}_ims.npy", np.zeros((2, 3, width), np.float32))
        (root / f"{split}_caps.txt").write_text("a\nb\n")
    one_line_error(
        lambda: load_image_caption_dataset(str(root)),
        r"feature widths .* differ \(train_ims\.npy: 2048, dev_ims\.npy: 2048, test_ims\.npy: 1024\)",
    )

    saved = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"image_features": [np.ones((3, width)).tolist()], "caption": ["a"]})
            for split, width in (("train", 8), ("test", 4))
        }
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    one_line_error(lambda: load_image_caption_dataset(str(tmp_path / "saved")), r"image_features widths differ \(train: 8, test: 4\)")


# --- Warned about and counted -----------------------------------------------------------------


def test_unknown_splits_duplicates_and_train_test_overlap(tmp_path):
    root = tmp_path / "folder"
    png(root / "train" / "a.png", (10, 10, 10))
    png(root / "train" / "a_copy.png", (10, 10, 10))  # the same bytes as a.png
    png(root / "train" / "b.png", (20, 20, 20))
    png(root / "test" / "b_again.png", (20, 20, 20))  # also in train
    png(root / "test" / "c.png", (30, 30, 30))
    png(root / "holdout" / "d.png", (40, 40, 40))
    for split, names in (("train", ["a.png", "a_copy.png", "b.png"]), ("test", ["b_again.png", "c.png"]), ("holdout", ["d.png"])):
        rows = [{"file_name": name, "caption": f"image {name}"} for name in names]
        (root / split / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))

    splits, stats = load_image_caption_dataset(str(root))

    assert list(splits) == ["train", "test", "holdout"]
    assert stats["num_images"] == {"train": 3, "test": 2, "holdout": 1}  # counted, not merged
    assert stats["unknown_splits"] == ["holdout"]
    assert stats["duplicate_images"] == [("train", str(root / "train" / "a_copy.png"), str(root / "train" / "a.png"))]
    assert stats["train_eval_overlap"] == [(str(root / "train" / "b.png"), "test", str(root / "test" / "b_again.png"))]
    warnings = data_warnings(stats)
    assert len(warnings) == 3
    assert "holdout" in warnings[0] and "a_copy.png" in warnings[1] and "b_again.png" in warnings[2]


def test_clean_data_reports_nothing(tmp_path):
    root = tmp_path / "folder"
    png(root / "a.png", (10, 10, 10))
    png(root / "b.png", (20, 20, 20))
    (root / "metadata.csv").write_text("file_name,caption,split\na.png,one,train\nb.png,two,test\n")
    splits, stats = load_image_caption_dataset(str(root))
    assert list(splits) == ["train", "test"]
    assert stats["unknown_splits"] == stats["duplicate_images"] == stats["train_eval_overlap"] == []
    assert data_warnings(stats) == []
