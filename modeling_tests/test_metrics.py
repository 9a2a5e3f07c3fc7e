"""Tests for hf_mvam.metrics: Recall@K, the COCO 1K/5K protocol, minimal-pair accuracy and the
``evaluate`` wrapper."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_mvam import metrics
from hf_mvam.metrics import minimal_pair_accuracy, recall_at_k, retrieval_metrics

METRICS_FILE = Path(metrics.__file__).resolve()
KEYS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]


def brute_force_recall(scores: torch.Tensor, text_to_image: torch.Tensor, ks=(1, 5, 10)):
    """Reference Recall@K from a full argsort, one query at a time (assumes no ties)."""
    num_images, num_texts = scores.shape
    results = {}
    image_ranks = []
    for image in range(num_images):
        order = torch.argsort(scores[image], descending=True).tolist()
        captions = [t for t in range(num_texts) if text_to_image[t] == image]
        image_ranks.append(min(order.index(c) for c in captions))
    text_ranks = []
    for text in range(num_texts):
        order = torch.argsort(scores[:, text], descending=True).tolist()
        text_ranks.append(order.index(int(text_to_image[text])))
    for direction, ranks in (("i2t", image_ranks), ("t2i", text_ranks)):
        for k in ks:
            results[f"{direction}_R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    results["rsum"] = sum(results.values())
    return results


def random_case(num_images: int, seed: int, max_captions: int = 3):
    """Random scores with 1..max_captions captions per image, shuffled, with some signal."""
    generator = torch.Generator().manual_seed(seed)
    per_image = torch.randint(1, max_captions + 1, (num_images,), generator=generator)
    text_to_image = torch.repeat_interleave(torch.arange(num_images), per_image)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=generator)]
    scores = torch.randn(num_images, len(text_to_image), generator=generator)
    scores[text_to_image, torch.arange(len(text_to_image))] += 1.5
    return scores, text_to_image


def assert_close_dicts(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-9), key


def test_hand_computed_two_captions_per_image():
    # image 0 has texts 0, 1; image 1 has texts 2, 3.
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.3, 0.8, 0.4, 0.1]])
    text_to_image = torch.tensor([0, 0, 1, 1])
    result = recall_at_k(scores, text_to_image, ks=(1, 2))
    # i2t: image 0's best caption (0.9) is first; image 1's best (0.4) is beaten by text 1 (0.8).
    # t2i: text 0 finds image 0 first; texts 1, 2 and 3 find their image second.
    assert result == {
        "i2t_R@1": 50.0,
        "i2t_R@2": 100.0,
        "t2i_R@1": 25.0,
        "t2i_R@2": 100.0,
        "rsum": 275.0,
    }
    assert list(recall_at_k(scores, text_to_image)) == KEYS


def test_any_caption_counts_for_image_to_text():
    # Image 0's first caption is ranked last but its second caption is ranked first.
    scores = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 9.0]])
    result = recall_at_k(scores, torch.tensor([0, 0, 1]), ks=(1,))
    assert result["i2t_R@1"] == 100.0
    assert result["t2i_R@1"] == pytest.approx(200 / 3)  # text 0 ties at 0.0 with image 1: a miss


def test_ties_count_against_the_query():
    scores = torch.tensor([[1.0, 1.0], [1.0, 0.5]])
    result = recall_at_k(scores, torch.tensor([0, 1]), ks=(1, 2))
    # Image 0: text 1 ties with its caption -> rank 1, a miss at 1. Image 1: text 0 beats it.
    assert result["i2t_R@1"] == 0.0 and result["i2t_R@2"] == 100.0
    # Text 0: image 1 ties with image 0 -> miss. Text 1: image 0 scores higher -> miss.
    assert result["t2i_R@1"] == 0.0 and result["t2i_R@2"] == 100.0


def test_a_collapsed_model_gets_no_hit():
    """All scores equal (collapsed embeddings): every other candidate ties with the ground truth."""
    result = recall_at_k(torch.zeros(3, 15), torch.arange(15) // 5)
    # i2t: 10 other texts tie, so rank 10 (>= 10): no hit even at 10; t2i: 2 other images tie.
    assert result["i2t_R@1"] == result["i2t_R@5"] == result["i2t_R@10"] == 0.0
    assert result["t2i_R@1"] == 0.0 and result["t2i_R@5"] == result["t2i_R@10"] == 100.0


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_argsort(seed, monkeypatch):
    scores, text_to_image = random_case(num_images=40, seed=seed)
    expected = brute_force_recall(scores, text_to_image)
    assert_close_dicts(recall_at_k(scores, text_to_image), expected)
    # Force many small row chunks: the result must not depend on chunking.
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7)
    assert_close_dicts(recall_at_k(scores, text_to_image), expected)


def test_accepts_numpy_and_lists_and_integer_scores():
    scores, text_to_image = random_case(num_images=12, seed=7)
    expected = recall_at_k(scores, text_to_image)
    assert_close_dicts(recall_at_k(scores.numpy(), text_to_image.tolist()), expected)
    assert_close_dicts(recall_at_k(scores.double(), text_to_image.int()), expected)
    integer = recall_at_k(torch.tensor([[3, 1], [2, 4]]), [0, 1], ks=(1,))
    assert integer["i2t_R@1"] == 100.0 and integer["t2i_R@1"] == 100.0


def test_retrieval_metrics_without_coco_folds_is_recall_at_k():
    scores, text_to_image = random_case(num_images=30, seed=1)
    assert retrieval_metrics(scores, text_to_image) == recall_at_k(scores, text_to_image)


def test_coco_five_fold_protocol_small_folds():
    scores, text_to_image = random_case(num_images=50, seed=3)
    result = retrieval_metrics(scores, text_to_image, coco_num_folds=5, coco_fold_size=10)
    assert_close_dicts({k: result[k] for k in KEYS}, brute_force_recall(scores, text_to_image))
    folds = []
    for fold in range(5):
        texts = ((text_to_image // 10) == fold).nonzero().flatten()
        sub_scores = scores[fold * 10 : (fold + 1) * 10, texts]
        folds.append(brute_force_recall(sub_scores, text_to_image[texts] - fold * 10))
    for key in KEYS:
        assert result[f"coco1k_{key}"] == pytest.approx(sum(f[key] for f in folds) / 5)


def test_coco_five_fold_protocol_at_5000_images():
    # 5,000 images with one caption each (plus a second one for every 7th image), in order.
    generator = torch.Generator().manual_seed(0)
    text_to_image = torch.cat([torch.arange(5000), torch.arange(0, 5000, 7)])
    scores = torch.randn(5000, len(text_to_image), generator=generator)
    scores[text_to_image, torch.arange(len(text_to_image))] += 3.0
    result = retrieval_metrics(scores, text_to_image)
    assert set(result) == set(KEYS) | {f"coco1k_{k}" for k in KEYS}
    folds = []
    for fold in range(5):
        texts = ((text_to_image // 1000) == fold).nonzero().flatten()
        sub_scores = scores[fold * 1000 : (fold + 1) * 1000, texts]
        folds.append(recall_at_k(sub_scores, text_to_image[texts] - fold * 1000))
    for key in KEYS:
        assert result[f"coco1k_{key}"] == pytest.approx(sum(f[key] for f in folds) / 5)
    # 1K folds are an easier task than the full 5K set.
    assert result["coco1k_rsum"] > result["rsum"]


@pytest.mark.parametrize(
    "scores, text_to_image, message",
    [
        (torch.zeros(3), [0, 1, 2], "must be \\[num_images, num_texts\\]"),
        (torch.zeros(2, 3), [0, 1], "one entry per text \\(3"),
        (torch.zeros(2, 2), [[0, 1]], "one entry per text"),
        (torch.zeros(2, 2), [0.0, 1.0], "must hold integers"),
        (torch.zeros(2, 2), [0, 2], "text_to_image\\[1\\] = 2 is not an image index"),
        (torch.zeros(2, 2), [0, -1], "text_to_image\\[1\\] = -1"),
        (torch.zeros(3, 2), [0, 2], "image\\(s\\) 1 have no caption"),
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), [0, 1], "NaN .*image 0, text 1"),
    ],
)
def test_validation_errors(scores, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(scores, text_to_image)


def test_invalid_ks():
    with pytest.raises(ValueError, match="ks must be positive"):
        recall_at_k(torch.eye(2), [0, 1], ks=(0, 1))


def test_minimal_pair_accuracy_hand_case():
    # Images: 0 base, 1 = colour variant of 0, 2 = shape variant of 0, 3 unrelated.
    # Captions: 0 -> image 0, 1 -> image 1, 2 -> image 1, 3 -> image 2, 4 -> image 3.
    text_to_image = torch.tensor([0, 1, 1, 2, 3])
    scores = torch.tensor(
        [
            # c0   c1   c2   c3   c4
            [0.9, 0.2, 0.5, 0.4, 0.0],  # image 0
            [0.1, 0.8, 0.5, 0.0, 0.0],  # image 1
            [0.9, 0.0, 0.0, 0.1, 0.0],  # image 2
            [0.0, 0.0, 0.0, 0.0, 1.0],  # image 3
        ]
    )
    variant_of = [-1, 0, 0, -1]
    changed = [None, "colour", "shape", None]
    result = minimal_pair_accuracy(scores, text_to_image, variant_of, changed)
    # Pair (1, 0): c1 0.8 > 0.2 right, c2 0.5 = 0.5 tie -> wrong, c0 0.9 > 0.1 right -> 2/3.
    # Pair (2, 0): c3 0.1 < 0.4 wrong, c0 0.9 = 0.9 tie -> wrong -> 0/2.
    t2i = {k: v for k, v in result.items() if k.startswith("t2i_")}
    assert list(t2i) == ["t2i_pair_acc/colour", "t2i_pair_acc/shape", "t2i_pair_acc/all"]
    assert result["t2i_pair_acc/colour"] == pytest.approx(200 / 3)
    assert result["t2i_pair_acc/shape"] == 0.0
    assert result["t2i_pair_acc/all"] == pytest.approx(40.0)
    # Image→text, twins by caption order (c1 of image 1 and c0 of image 0; c3 of image 2 and c0):
    # pair (1, 0): image 1 prefers c1 0.8 > 0.1 right, image 0 prefers c0 0.9 > 0.2 right -> 2/2;
    # pair (2, 0): image 2 prefers c0 0.9 over its c3 0.1 wrong, image 0 c0 0.9 > 0.4 right -> 1/2.
    i2t = {k: v for k, v in result.items() if k.startswith("i2t_")}
    assert i2t == {"i2t_pair_acc/colour": 100.0, "i2t_pair_acc/shape": 50.0, "i2t_pair_acc/all": 75.0}


def test_minimal_pair_accuracy_matches_loop_reference():
    scores, text_to_image = random_case(num_images=30, seed=11)
    attributes = ["colour", "shape", "size", "relation"]
    variant_of = [-1] * 10 + [i % 10 for i in range(20)]
    changed = [""] * 10 + [attributes[i % 4] for i in range(20)]
    result = minimal_pair_accuracy(scores, text_to_image, variant_of, changed)
    per_attribute = {name: [] for name in attributes}
    for a, b in enumerate(variant_of):
        if b < 0:
            continue
        for c in range(len(text_to_image)):
            if text_to_image[c] == a:
                per_attribute[changed[a]].append(bool(scores[a, c] > scores[b, c]))
            if text_to_image[c] == b:
                per_attribute[changed[a]].append(bool(scores[b, c] > scores[a, c]))
    for name, outcomes in per_attribute.items():
        assert result[f"t2i_pair_acc/{name}"] == pytest.approx(100 * np.mean(outcomes))
    everything = sum(per_attribute.values(), [])
    assert result["t2i_pair_acc/all"] == pytest.approx(100 * np.mean(everything))
    # Image→text: the k-th captions of the two images are twins; each image must prefer its own.
    per_attribute = {name: [] for name in attributes}
    for a, b in enumerate(variant_of):
        if b < 0:
            continue
        captions_a = [c for c in range(len(text_to_image)) if text_to_image[c] == a]
        captions_b = [c for c in range(len(text_to_image)) if text_to_image[c] == b]
        for own_a, own_b in zip(captions_a, captions_b):
            per_attribute[changed[a]].append(bool(scores[a, own_a] > scores[a, own_b]))
            per_attribute[changed[a]].append(bool(scores[b, own_b] > scores[b, own_a]))
    for name, outcomes in per_attribute.items():
        assert result[f"i2t_pair_acc/{name}"] == pytest.approx(100 * np.mean(outcomes))
    assert result["i2t_pair_acc/all"] == pytest.approx(100 * np.mean(sum(per_attribute.values(), [])))


def test_minimal_pair_accuracy_errors():
    scores, text_to_image = torch.eye(3), torch.arange(3)
    with pytest.raises(ValueError, match="no minimal pairs"):
        minimal_pair_accuracy(scores, text_to_image, [-1, -1, -1], [None] * 3)
    with pytest.raises(ValueError, match="image 1 has 1"):
        minimal_pair_accuracy(scores, text_to_image, [-1, 1, -1], ["", "colour", ""])
    with pytest.raises(ValueError, match="image 2 has 3"):
        minimal_pair_accuracy(scores, text_to_image, [-1, -1, 3], ["", "", "size"])
    with pytest.raises(ValueError, match="one entry per image"):
        minimal_pair_accuracy(scores, text_to_image, [-1, 0], ["", "colour"])


def test_evaluate_load_of_the_metrics_file_offline(tmp_path):
    scores, text_to_image = random_case(num_images=15, seed=5)
    script = (
        "import json, sys, evaluate\n"
        "data = json.load(open(sys.argv[2]))\n"
        "recall = evaluate.load(sys.argv[1])\n"
        "print(type(recall).__name__)\n"
        "print(json.dumps(recall.compute(predictions=data['predictions'], "
        "references=data['references'])))\n"
    )
    data_file = tmp_path / "inputs.json"
    data_file.write_text(
        json.dumps({"predictions": scores.T.tolist(), "references": text_to_image.tolist()})
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(METRICS_FILE), str(data_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    class_name, result_line = completed.stdout.strip().splitlines()[-2:]
    assert class_name == "RetrievalRecall"
    # The metric sees float32 scores, as the direct call does here.
    assert_close_dicts(json.loads(result_line), recall_at_k(scores.float(), text_to_image))


def test_retrieval_recall_metric_in_process_with_batches_and_ks():
    scores, text_to_image = random_case(num_images=10, seed=2)
    metric = metrics.RetrievalRecall(keep_in_memory=True)
    metric.add_batch(predictions=scores.T[:7].tolist(), references=text_to_image[:7].tolist())
    metric.add_batch(predictions=scores.T[7:].tolist(), references=text_to_image[7:].tolist())
    result = metric.compute(ks=(1, 3))
    assert_close_dicts(result, recall_at_k(scores, text_to_image, ks=(1, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_scores_on_gpu():
    scores, text_to_image = random_case(num_images=20, seed=4)
    expected = recall_at_k(scores, text_to_image)
    assert_close_dicts(recall_at_k(scores.cuda(), text_to_image), expected)
    variant_of = [-1] * 10 + list(range(10))
    changed = [""] * 10 + ["colour"] * 10
    assert minimal_pair_accuracy(scores.cuda(), text_to_image, variant_of, changed) == (
        minimal_pair_accuracy(scores, text_to_image, variant_of, changed)
    )
