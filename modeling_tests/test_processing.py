"""Tests of the shared processor (hf_mvam.processing_image_text) and the one image decoder
(hf_mvam.image_loading.load_image) that it, the data loaders and the figures go through."""

import base64
import io
import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import CLIPProcessor

from hf_mvam import MVAMProcessor
from hf_mvam.builders import default_image_processor
from hf_mvam.data.collate import ImageCaptionCollator, ImageCaptionPairs
from hf_mvam.data.sources import load_image_caption_dataset
from hf_mvam.image_loading import load_image
from hf_mvam.tokenization import train_caption_tokenizer

CAPTIONS = ["a red circle left of a blue square", "a small green star above a big cross"]


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_caption_tokenizer(CAPTIONS, model_max_length=16)
    return MVAMProcessor(image_processor=default_image_processor(32), tokenizer=tokenizer)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rotated_jpeg(path, orientation=6):
    """A 48 x 24 JPEG whose EXIF says "rotate 90° clockwise to view" (orientation 6)."""
    pixels = np.zeros((24, 48, 3), dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0)  # red on the left of the stored pixels
    pixels[:12, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    return str(path)


# --- One decoder: EXIF orientation whichever way the image arrives -----------------------------


def test_exif_rotated_jpeg_gives_the_same_pixels_on_every_path(tmp_path, processor):
    root = tmp_path / "folder"
    root.mkdir()
    path = rotated_jpeg(root / "rotated.jpg")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "rotated.jpg", "caption": CAPTIONS[0]}))
    raw_bytes = (root / "rotated.jpg").read_bytes()
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert upright.size == (24, 48)  # turned: width and height swap
    expected = processor(images=upright)["pixel_values"]
    stored = processor(images=np.asarray(Image.open(path).convert("RGB")))["pixel_values"]  # no EXIF
    assert (expected - stored).abs().max() > 0.5  # the orientation matters to the model

    pixel_values = {
        "path": processor(images=path)["pixel_values"],
        "bytes": processor(images=raw_bytes)["pixel_values"],
        "base64": processor(images=base64.b64encode(raw_bytes).decode())["pixel_values"],
        "PIL as opened": processor(images=Image.open(path))["pixel_values"],
        "datasets dict": processor(images={"bytes": None, "path": path})["pixel_values"],
    }
    splits, _ = load_image_caption_dataset(str(root))
    pairs = ImageCaptionPairs(splits["train"])
    pixel_values["loader + collator"] = ImageCaptionCollator(processor)(pairs.__getitems__([0]))["pixel_values"]
    pixel_values["evaluation chunk"] = processor(images=splits["train"][0:1]["image"])["pixel_values"]
    for how, values in pixel_values.items():
        torch.testing.assert_close(values, expected, rtol=0, atol=0, msg=how)
    assert np.array_equal(np.asarray(load_image(splits["train"][0]["image"])), np.asarray(upright))


def test_sixteen_bit_and_transparent_images_are_upright_too(tmp_path):
    deep = np.zeros((2, 4), dtype=np.uint16)
    deep[0, 0] = 65535
    image = Image.fromarray(deep)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "deep.png", exif=exif)
    loaded = load_image(str(tmp_path / "deep.png"))
    assert loaded.size == (2, 4)  # turned
    assert loaded.getpixel((1, 0)) == (255, 255, 255)  # scaled, not clipped: the rest stays black
    assert loaded.getpixel((0, 0)) == (0, 0, 0)

    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "clear.png", exif=exif)
    loaded = load_image(str(tmp_path / "clear.png"))
    assert loaded.size == (2, 4)
    assert loaded.getpixel((1, 0)) == (0, 0, 255) and loaded.getpixel((0, 3)) == (255, 255, 255)


def test_missing_and_broken_sources_name_the_image(tmp_path):
    with pytest.raises(ValueError, match="image file not found: .*nowhere/pic.png"):
        load_image(str(tmp_path / "nowhere" / "pic.png"))
    with pytest.raises(ValueError, match="image file not found: abcd"):  # valid base64, not an image
        load_image("abcd")
    with pytest.raises(ValueError, match="cannot read image <data URI>: not a base64-encoded image"):
        load_image("data:image/png;base64,????")


# --- URLs, through transformers' fetch -----------------------------------------------------------


class _Response:
    def __init__(self, content):
        self.content = content


def test_urls_are_fetched_through_transformers(monkeypatch, processor):
    import transformers.image_utils

    image = random_image(40, 30)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    requested = []

    def fake_get(url, **kwargs):
        requested.append(url)
        if url.endswith("missing.png"):
            raise transformers.image_utils.httpx.HTTPError("404 Not Found")
        return _Response(buffer.getvalue())

    monkeypatch.setattr(transformers.image_utils.httpx, "get", fake_get)
    from_url = processor(images=["https://example.com/a.png"])["pixel_values"]
    torch.testing.assert_close(from_url, processor(images=image)["pixel_values"], rtol=0, atol=0)
    assert requested == ["https://example.com/a.png"]
    with pytest.raises(ValueError, match=r"cannot read image images\[0\]: 404 Not Found"):
        processor(images="https://example.com/missing.png")


# --- Keyword arguments routed as ProcessorMixin routes them ------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"do_center_crop": False},
        {"images_kwargs": {"do_center_crop": False}},
        {"size": {"shortest_edge": 16}, "do_center_crop": False},
        {"crop_size": {"height": 8, "width": 12}},
        {"do_normalize": False, "do_rescale": False},
    ],
)
def test_image_kwargs_match_the_stock_clip_processor(processor, kwargs):
    stock = CLIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    image = random_image(38, 32)  # not square: cropping changes the shape
    ours = processor(images=image, **kwargs)["pixel_values"]
    theirs = stock(images=image, return_tensors="pt", **kwargs)["pixel_values"]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if kwargs.get("do_center_crop") is False or "images_kwargs" in kwargs:
        assert tuple(ours.shape[-2:]) != (32, 32)


def test_text_kwargs_and_defaults(processor):
    default = processor(text=CAPTIONS)
    assert isinstance(default["input_ids"], torch.Tensor)  # padded, PyTorch tensors by default
    assert default["attention_mask"].sum(1).tolist() == [len(processor.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    padded = processor(text=CAPTIONS, padding="max_length", max_length=12)
    assert padded["input_ids"].shape == (2, 12)
    short = processor(text=CAPTIONS, text_kwargs={"max_length": 4})
    assert short["input_ids"].shape == (2, 4)  # truncated by default
    as_numpy = processor(text=CAPTIONS[0], images=random_image(32, 32), return_tensors="np")
    assert isinstance(as_numpy["input_ids"], np.ndarray) and isinstance(as_numpy["pixel_values"], np.ndarray)
    with pytest.raises(ValueError, match="passed two times"):
        processor(text=CAPTIONS, max_length=4, text_kwargs={"max_length": 5})


def test_unknown_kwargs_are_ignored_with_a_warning(processor, caplog):
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            out = processor(text=CAPTIONS, not_a_processor_argument=3)
    finally:
        transformers_logging.disable_propagation()
    assert set(out) == {"input_ids", "attention_mask"}
    assert "not_a_processor_argument" in caplog.text


def test_input_checks_keep_their_messages(processor):
    with pytest.raises(ValueError, match=r"pass text=\.\.\., images=\.\.\. or both"):
        processor()
    with pytest.raises(ValueError, match="text is an empty list"):
        processor(text=[])
    with pytest.raises(ValueError, match=r"text\[1\] is an empty caption"):
        processor(text=["a", "  "])
    with pytest.raises(ValueError, match=r"text\[0\] must be a string, got int"):
        processor(text=[3])
    with pytest.raises(ValueError, match="images is an empty list"):
        processor(images=[])
