"""Tests for hf_mvam.visualization: every plot writes a real PNG and bad shapes raise ValueError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_mvam import visualization as viz

WORDS = ["a", "red", "circle", "left", "of", "a", "blue", "star"]


def _image(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _assert_png(path, min_side=100):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_side and image.height >= min_side
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.reshape(-1, 3).std(axis=0).max() > 1.0  # not a single colour


@pytest.mark.parametrize("tokens,grid", [(17, None), (16, None), (13, (3, 4)), (12, (3, 4))])
def test_plot_view_attention(tmp_path, tokens, grid):
    num_views = 3
    image_attention = torch.rand(num_views, tokens).softmax(-1)  # torch input, CLS or not
    text_attention = np.random.default_rng(1).random((num_views, len(WORDS)))
    path = viz.plot_view_attention(
        _image(), image_attention, grid, WORDS, text_attention, tmp_path / "sub" / "views.png", title="case"
    )
    assert path == tmp_path / "sub" / "views.png"
    _assert_png(path)


def test_plot_view_attention_bad_shapes(tmp_path):
    image, out = _image(), tmp_path / "x.png"
    good_img, good_txt = np.random.rand(2, 17), np.random.rand(2, len(WORDS))
    with pytest.raises(ValueError, match="words"):
        viz.plot_view_attention(image, good_img, None, WORDS[:-1], good_txt, out)
    with pytest.raises(ValueError, match="views"):
        viz.plot_view_attention(image, good_img, None, WORDS, np.random.rand(3, len(WORDS)), out)
    with pytest.raises(ValueError, match="grid_size"):
        viz.plot_view_attention(image, good_img, (3, 3), WORDS, good_txt, out)
    with pytest.raises(ValueError, match="n²"):
        viz.plot_view_attention(image, np.random.rand(2, 12), None, WORDS, good_txt, out)
    with pytest.raises(ValueError, match="2-D"):
        viz.plot_view_attention(image, np.random.rand(17), None, WORDS, good_txt, out)
    assert not out.exists()


def test_plot_relevance_histograms(tmp_path):
    rng = np.random.default_rng(0)
    relevant, irrelevant = torch.from_numpy(rng.normal(0.5, 0.1, 300)), rng.normal(0.1, 0.1, (20, 30))
    path = viz.plot_relevance_histograms(relevant, irrelevant, torch.tensor(0.3), tmp_path / "hist.png")
    _assert_png(path)
    path = viz.plot_relevance_histograms(
        relevant, irrelevant, 0.3, tmp_path / "hist_fit.png", title="epoch 3",
        relevant_stats=(0.5, 0.1), irrelevant_stats=(0.1, 0.1),
    )
    _assert_png(path)
    _assert_png(viz.plot_relevance_histograms([], [0.2, 0.2], 0.2, tmp_path / "one.png"))  # degenerate range


def test_plot_relevance_histograms_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        viz.plot_relevance_histograms([], [], 0.0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="threshold"):
        viz.plot_relevance_histograms([0.1], [0.2], [0.1, 0.2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="relevant_stats"):
        viz.plot_relevance_histograms([0.1], [0.2], 0.1, tmp_path / "x.png", relevant_stats=(0.1, 0.0))


def test_plot_threshold_trajectory(tmp_path):
    steps = np.arange(0, 1000, 10)
    thresholds = 0.3 * (1 - np.exp(-steps / 300))
    _assert_png(viz.plot_threshold_trajectory(steps, torch.from_numpy(thresholds), tmp_path / "traj.png"))
    _assert_png(viz.plot_threshold_trajectory([5], [0.1], tmp_path / "one.png", baseline=None))
    with pytest.raises(ValueError, match="thresholds has 2"):
        viz.plot_threshold_trajectory([1, 2, 3], [0.1, 0.2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        viz.plot_threshold_trajectory([], [], tmp_path / "x.png")


@pytest.mark.parametrize("mask_kind", [None, "words", "regions"])
def test_plot_word_region_attention(tmp_path, mask_kind):
    h, w = 3, 4
    attention = torch.rand(len(WORDS), h * w).softmax(-1)
    mask = None
    if mask_kind == "words":
        mask = torch.tensor([True, True, True, False, False, True, True, True])
    elif mask_kind == "regions":
        mask = attention > attention.mean()
        mask[3] = False  # "left" is skipped
    path = viz.plot_word_region_attention(_image(), WORDS, attention, (h, w), tmp_path / "words.png", mask)
    _assert_png(path)


def test_plot_word_region_attention_truncates_and_accepts_arrays(tmp_path):
    words = [f"w{i}" for i in range(11)]
    image = np.random.default_rng(0).random((40, 40, 3))  # float array image in [0, 1]
    path = viz.plot_word_region_attention(image, words, np.random.rand(11, 17), None, tmp_path / "w.png", max_words=5)
    _assert_png(path)


def test_plot_word_region_attention_bad_shapes(tmp_path):
    image, out = _image(), tmp_path / "x.png"
    attention = np.random.rand(len(WORDS), 12)
    with pytest.raises(ValueError, match="words"):
        viz.plot_word_region_attention(image, WORDS[:3], attention, (3, 4), out)
    with pytest.raises(ValueError, match="grid_size"):
        viz.plot_word_region_attention(image, WORDS, attention, (4, 4), out)
    with pytest.raises(ValueError, match="threshold_mask"):
        viz.plot_word_region_attention(image, WORDS, attention, (3, 4), out, threshold_mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="threshold_mask"):
        viz.plot_word_region_attention(image, WORDS, attention, (3, 4), out, threshold_mask=np.ones((8, 9), bool))
    assert not out.exists()
