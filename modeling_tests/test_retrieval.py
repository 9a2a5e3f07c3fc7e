"""hf_mvam.retrieval: the faiss index, UARDA's pair scores, two-stage search and its evaluation, the
index folder, distributed encoding and evaluation, and the command line."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import PrepareForLaunch, patch_environment
from torch.multiprocessing import start_processes

from conftest import TINY_TEXT, TINY_VISION
from hf_mvam import MVAMConfig, MVAMModel, MVAMProcessor, UARDAConfig, UARDAModel, UARDAProcessor
from hf_mvam.builders import default_image_processor
from hf_mvam.evaluation import encode_split, evaluate_split, score_split
from hf_mvam.metrics import recall_at_k
from hf_mvam.modeling_uarda import UARDAImageEncoding, UARDATextEncoding
from hf_mvam.retrieval import EmbeddingIndex, RetrievalIndex, evaluate, pair_scores, shortlist_recall

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 12  # 60 captions


def make_tiny_folders(root: Path):
    """Untrained tiny MVAM and UARDA folders (save_pretrained) and a tiny synthetic split saved to
    disk as a dataset folder, under ``root``; returns the split."""
    from datasets import DatasetDict

    from hf_mvam.data.synthetic import generate_synthetic_benchmark
    from hf_mvam.tokenization import train_caption_tokenizer

    split = generate_synthetic_benchmark(num_train=0, num_validation=0, num_test=NUM_IMAGES)["test"]
    DatasetDict(test=split).save_to_disk(root / "data")
    tokenizer = train_caption_tokenizer([c for captions in split["captions"] for c in captions], model_max_length=32)
    text = {**TINY_TEXT, "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    MVAMModel(MVAMConfig(vision_config=TINY_VISION, text_config=text, num_views=2, projection_dim=8)).save_pretrained(root / "mvam")
    MVAMProcessor(image_processor=default_image_processor(32), tokenizer=tokenizer).save_pretrained(root / "mvam")
    uarda = UARDAModel(UARDAConfig(vision_config=TINY_VISION, text_config=text, embed_dim=16, threshold_mode="uarda"))
    uarda.relevance_threshold.threshold.fill_(0.1)  # some words skipped, some attended
    uarda.save_pretrained(root / "uarda")
    UARDAProcessor(image_processor=default_image_processor(32), tokenizer=tokenizer).save_pretrained(root / "uarda")
    return split


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return root, make_tiny_folders(root)


def load(root: Path, name: str):
    classes = {"mvam": (MVAMModel, MVAMProcessor), "uarda": (UARDAModel, UARDAProcessor)}[name]
    return classes[0].from_pretrained(root / name).eval(), classes[1].from_pretrained(root / name)


@pytest.fixture(scope="module")
def built_index(folders):
    root, split = folders
    source = {"data": str(root / "data"), "split": "test"}
    return RetrievalIndex.build(root / "index", split, root / "mvam", root / "uarda", source=source)


def unit_rows(n: int, dim: int, seed: int, clusters: int | None = None) -> np.ndarray:
    generator = np.random.default_rng(seed)
    x = generator.standard_normal((n, dim)).astype(np.float32)
    if clusters:  # points around a few centres, as real embeddings have neighbourhoods
        centres = generator.standard_normal((clusters, dim)).astype(np.float32) * 3
        x = centres[generator.integers(0, clusters, n)] + x
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- the faiss index


def test_exact_index_equals_brute_force():
    gallery, queries = unit_rows(500, 24, 0), unit_rows(30, 24, 1)
    index = EmbeddingIndex.build(gallery)
    assert index.kind == "flat" and index.ids[:3] == ["0", "1", "2"]
    scores, positions = index.search(queries, 7)
    expected = torch.from_numpy(queries @ gallery.T).topk(7, dim=1)
    assert np.array_equal(positions, expected.indices.numpy())
    np.testing.assert_allclose(scores, expected.values.numpy(), rtol=0, atol=1e-6)


def test_ivf_and_hnsw_find_most_true_neighbours():
    gallery, queries = unit_rows(4000, 32, 2, clusters=40), unit_rows(100, 32, 3, clusters=40)
    _, truth = EmbeddingIndex.build(gallery, index_type="flat").search(queries, 10)
    for index in (EmbeddingIndex.build(gallery, index_type="ivf", nlist=40, nprobe=8),
                  EmbeddingIndex.build(gallery, index_type="hnsw")):
        _, found = index.search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())])
        assert recall >= 0.9, (index.kind, recall)
    ivf = EmbeddingIndex.build(gallery, index_type="ivf", nlist=40)
    assert ivf.nprobe == 8  # the default: 1/16 of the cells, at least 8
    ivf.nprobe = 40  # every cell: exact
    assert np.array_equal(ivf.search(queries, 10)[1], truth)
    assert EmbeddingIndex.build(unit_rows(300, 8, 4), index_type="auto").kind == "flat"


def test_index_save_load_round_trip(tmp_path):
    gallery, queries = unit_rows(800, 16, 5, clusters=8), unit_rows(20, 16, 6)
    ids = [f"img-{i:04d}" for i in range(800)]
    for kind in ("flat", "ivf", "hnsw"):
        index = EmbeddingIndex.build(gallery, ids, index_type=kind, nlist=16, nprobe=3)
        index.save(tmp_path, kind)
        again = EmbeddingIndex.load(tmp_path, kind)
        assert again.ids == ids and again.kind == kind and again.nprobe == index.nprobe
        for a, b in zip(index.search(queries, 5), again.search(queries, 5)):
            assert np.array_equal(a, b)


def test_embedding_index_bad_input():
    gallery = unit_rows(50, 8, 7)
    with pytest.raises(ValueError, match="unique; '3' appears more than once"):
        EmbeddingIndex.build(gallery, [str(i) for i in range(49)] + ["3"])
    with pytest.raises(ValueError, match="index_type must be one of"):
        EmbeddingIndex.build(gallery, index_type="lsh")
    with pytest.raises(ValueError, match="NaN or infinite"):
        EmbeddingIndex.build(np.full((4, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"k must be in \[1, 50\]"):
        EmbeddingIndex.build(gallery).search(gallery[:2], 51)
    with pytest.raises(ValueError, match=r"queries must be \[Q, 8\]"):
        EmbeddingIndex.build(gallery).search(np.zeros((2, 9), np.float32), 3)


# --------------------------------------------------------------------------- UARDA pair scores


@pytest.mark.parametrize("mode, direction, aggregation", itertools.product(("scan", "uarda"), ("t2i", "i2t", "both"), ("lse", "mean")))
def test_pair_scores_equal_uarda_scoring(mode, direction, aggregation):
    generator = torch.Generator().manual_seed(0)
    n_images, n_texts, n_regions, n_words, dim = 9, 20, 5, 7, 12
    regions = F.normalize(torch.randn(n_images, n_regions, dim, generator=generator), dim=-1)
    words = F.normalize(torch.randn(n_texts, n_words, dim, generator=generator), dim=-1)
    mask = torch.arange(n_words) < torch.randint(1, n_words + 1, (n_texts, 1), generator=generator)
    words = words * mask[..., None] + 3.0 * ~mask[..., None]  # padding slots may hold anything finite
    config = UARDAConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 40}, embed_dim=dim,
                         threshold_mode=mode, direction=direction, aggregation=aggregation)
    model = UARDAModel(config).eval()
    model.relevance_threshold.threshold.fill_(0.15)
    full = model.score(UARDAImageEncoding(image_fragments=regions), UARDATextEncoding(text_fragments=words, text_mask=mask))
    pair_images = torch.randint(0, n_images, (150,), generator=generator)
    pair_texts = torch.randint(0, n_texts, (150,), generator=generator)
    scores = pair_scores(model, regions, words, mask, pair_images, pair_texts)  # grouped by image
    torch.testing.assert_close(scores, full[pair_images, pair_texts].detach(), rtol=0, atol=2e-6)
    shortlists = torch.randint(0, n_images, (3, 6), generator=generator)  # 3 caption queries, 6 images each
    queries = torch.tensor([4, 11, 17]).repeat_interleave(6)
    by_caption = pair_scores(model, regions, words, mask, shortlists.flatten(), queries)
    torch.testing.assert_close(by_caption, full[shortlists.flatten(), queries].detach(), rtol=0, atol=2e-6)
    # numpy arrays (as memmaps are) give the same scores as tensors
    from_numpy = pair_scores(model, regions.numpy(), words.numpy(), mask.numpy(), pair_images, pair_texts)
    torch.testing.assert_close(from_numpy, scores, rtol=0, atol=2e-6)


def test_pair_scores_bad_input():
    model = UARDAModel(UARDAConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 40}, embed_dim=4)).eval()
    regions, words, mask = torch.randn(3, 2, 4), torch.randn(5, 3, 4), torch.ones(5, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"pair_texts holds indices outside \[0, 5\)"):
        pair_scores(model, regions, words, mask, torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="differ in length"):
        pair_scores(model, regions, words, mask, torch.tensor([0, 1]), torch.tensor([0]))
    assert pair_scores(model, regions, words, mask, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)).numel() == 0


# --------------------------------------------------------------------------- evaluation


def test_shortlist_recall_equals_recall_on_the_gallery_outside_it_excluded():
    generator = torch.Generator().manual_seed(1)
    n_images, per_image = 14, 3
    text_to_image = torch.arange(n_images).repeat_interleave(per_image)
    scores = torch.randn(n_images, n_images * per_image, generator=generator).round(decimals=1)  # with ties
    for k in (1, 4, 13):
        t2i = scores.topk(k, dim=0).indices.T  # [N_t, k]
        i2t = scores.topk(k, dim=1).indices  # [N_i, k]
        got = shortlist_recall(t2i, scores.T.gather(1, t2i), i2t, scores.gather(1, i2t), text_to_image)
        # naive reference: the whole gallery with every item outside the shortlist at -inf
        t2i_dense = torch.full_like(scores, float("-inf")).scatter(0, t2i.T, scores.gather(0, t2i.T))
        i2t_dense = torch.full_like(scores, float("-inf")).scatter(1, i2t, scores.gather(1, i2t))
        expected_t2i, expected_i2t = recall_at_k(t2i_dense, text_to_image), recall_at_k(i2t_dense, text_to_image)
        for key in got:
            if key != "rsum":
                assert got[key] == (expected_t2i if key.startswith("t2i") else expected_i2t)[key], (k, key)
    full = recall_at_k(scores, text_to_image)
    t2i, i2t = scores.topk(n_images, dim=0).indices.T, scores.topk(n_images * per_image, dim=1).indices
    assert shortlist_recall(t2i, scores.T.gather(1, t2i), i2t, scores.gather(1, i2t), text_to_image) == full


def test_two_stage_equals_full_uarda_when_the_shortlist_is_the_gallery(folders):
    root, split = folders
    (mvam, mvam_processor), (uarda, uarda_processor) = load(root, "mvam"), load(root, "uarda")
    num_texts = sum(len(c) for c in split["captions"])
    results = evaluate(mvam, mvam_processor, split, uarda, uarda_processor, shortlist_sizes=(4, num_texts))
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"):
        assert results[f"two_stage@{num_texts}/{key}"] == results[f"uarda/{key}"], key
    assert results["mvam/rsum"] == evaluate_split(mvam, mvam_processor, split)["rsum"]
    assert results["two_stage@4/i2t_R@5"] == results["two_stage@4/i2t_R@10"]  # nothing past the 4th candidate
    assert results["two_stage@4/rsum"] != results["uarda/rsum"]


# --------------------------------------------------------------------------- the index folder


def test_search_ranks_as_the_models_do(folders, built_index):
    root, split = folders
    (mvam, mvam_processor), (uarda, uarda_processor) = load(root, "mvam"), load(root, "uarda")
    captions = [c for captions in split["captions"] for c in captions]
    queries = [captions[3], "a red circle left of a blue square"]
    with torch.no_grad():
        text = mvam.encode_texts(**mvam_processor(text=queries, return_tensors="pt"))
        images = mvam.encode_images(**mvam_processor(images=list(split["image"]), return_tensors="pt"))
        expected = mvam.score(images, text).T.topk(5, dim=1)  # [Q, 5]
        found = built_index.search(texts=queries, k=5, rerank=False)
        assert found.ids == [[str(i) for i in row] for row in expected.indices.tolist()]
        torch.testing.assert_close(torch.from_numpy(found.scores), expected.values, rtol=0, atol=1e-5)

        # two-stage with the whole gallery as the shortlist = UARDA's ranking of every image
        uarda_text = uarda.encode_texts(**uarda_processor(text=queries, return_tensors="pt"))
        uarda_images = uarda.encode_images(**uarda_processor(images=list(split["image"]), return_tensors="pt"))
        full = uarda.score(uarda_images, uarda_text).T  # [Q, N_i]
        reranked = built_index.search(texts=queries, k=NUM_IMAGES, shortlist_size=NUM_IMAGES)
        torch.testing.assert_close(torch.from_numpy(reranked.scores), full.sort(dim=1, descending=True).values, rtol=0, atol=2e-6)
        assert reranked.ids[0][:3] == [str(i) for i in full[0].argsort(descending=True)[:3].tolist()]
        # the memory-mapped fragments are the model's encodings
        np.testing.assert_allclose(built_index.image_fragments, uarda_images.image_fragments.numpy(), atol=1e-6)

        # image -> captions, reranked, over the whole caption gallery
        query_regions = uarda.encode_images(**uarda_processor(images=[split[5]["image"]], return_tensors="pt"))
        all_captions = uarda.encode_texts(**uarda_processor(text=captions, return_tensors="pt"))
        full_i2t = uarda.score(query_regions, all_captions)[0]  # [N_t]
        hits = built_index.search(images=[split[5]["image"]], k=4, shortlist_size=len(captions))
    assert hits.positions[0].tolist() == full_i2t.argsort(descending=True)[:4].tolist()
    assert hits.texts[0] == [captions[p] for p in hits.positions[0]]
    assert all(i.endswith(f"#{p % 5}") for i, p in zip(hits.ids[0], hits.positions[0]))
    assert len(built_index.load_split()) == NUM_IMAGES


def test_index_bad_input(folders, built_index, tmp_path):
    root, split = folders
    with pytest.raises(FileExistsError, match="overwrite"):
        RetrievalIndex.build(built_index.folder, split, root / "mvam")
    with pytest.raises(ValueError, match="holds a 'uarda' model, expected 'mvam'"):
        RetrievalIndex.build(tmp_path / "x", split, root / "uarda")
    with pytest.raises(FileExistsError, match="holds files but no index: not replacing it"):
        RetrievalIndex.build(root / "mvam", split, root / "mvam", overwrite=True)  # a model folder is never replaced
    assert (root / "mvam" / "config.json").is_file()
    with pytest.raises(ValueError, match="exactly one of texts and images"):
        built_index.search(k=3)
    mvam_only = RetrievalIndex.build(tmp_path / "mvam-only", split, root / "mvam")
    with pytest.raises(ValueError, match="rerank=True needs a UARDA model"):
        mvam_only.search(texts="a red circle", rerank=True)
    assert mvam_only.search(texts="a red circle", k=3).ids == built_index.search(texts="a red circle", k=3, rerank=False).ids
    with pytest.raises(FileNotFoundError, match="retrieval_index.json"):
        RetrievalIndex.load(tmp_path)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


# --------------------------------------------------------------------------- distributed


def _distributed_run(root: str):
    """In each of 2 processes: the split encoded, scored, evaluated and indexed with
    distributed=True; the first process saves what it got."""
    from accelerate import PartialState
    from datasets import load_from_disk

    state = PartialState(cpu=True)
    assert state.num_processes == 2
    root = Path(root)
    split = load_from_disk(root / "data")["test"]
    (mvam, mvam_processor), (uarda, uarda_processor) = load(root, "mvam"), load(root, "uarda")
    encoded = encode_split(uarda, uarda_processor, split, batch_size=5, distributed=True)
    scores = score_split(uarda, encoded, distributed=True)
    results = evaluate(mvam, mvam_processor, split, uarda, uarda_processor, shortlist_sizes=(3, 8), batch_size=5, distributed=True)
    split_results = evaluate_split(mvam, mvam_processor, split, batch_size=5, distributed=True)
    RetrievalIndex.build(root / "index-2", split, root / "mvam", root / "uarda", batch_size=5, distributed=True)
    if state.is_main_process:
        torch.save({"fragments": encoded.images.image_fragments, "scores": scores, "results": results,
                    "split_results": split_results}, root / "two-processes.pt")


def test_two_processes_give_exactly_the_one_process_results(folders):
    root, split = folders
    with patch_environment(world_size=2, master_addr="127.0.0.1", master_port="29523", accelerate_mixed_precision="no",
                           accelerate_debug_rdv_file=str(root / "rendezvous"), accelerate_use_cpu="yes", omp_num_threads=1):
        start_processes(PrepareForLaunch(_distributed_run, debug=True), args=(str(root),), nprocs=2, start_method="spawn")
    two = torch.load(root / "two-processes.pt")
    (mvam, mvam_processor), (uarda, uarda_processor) = load(root, "mvam"), load(root, "uarda")
    encoded = encode_split(uarda, uarda_processor, split, batch_size=5)
    assert torch.equal(two["fragments"], encoded.images.image_fragments)
    assert torch.equal(two["scores"], score_split(uarda, encoded))
    assert two["results"] == evaluate(mvam, mvam_processor, split, uarda, uarda_processor, shortlist_sizes=(3, 8), batch_size=5)
    assert two["split_results"] == evaluate_split(mvam, mvam_processor, split, batch_size=5)
    one = RetrievalIndex.build(root / "index-1", split, root / "mvam", root / "uarda", batch_size=5)
    two_index = RetrievalIndex.load(root / "index-2")
    assert np.array_equal(one.image_fragments, two_index.image_fragments)
    assert np.array_equal(one.caption_fragments, two_index.caption_fragments)
    query = one.search(texts=["a small blue cross"], k=5)
    assert query.ids == two_index.search(texts=["a small blue cross"], k=5).ids


# --------------------------------------------------------------------------- command line


def test_command_line_end_to_end(folders, tmp_path, capsys):
    from hf_mvam.retrieval.__main__ import main

    root, split = folders
    split[2]["image"].save(tmp_path / "query.png")

    def cli(*arguments):  # in this process (each subprocess would spend seconds importing)
        assert main([str(a) for a in arguments]) == 0
        return capsys.readouterr().out

    def cli_error(*arguments):
        with pytest.raises(SystemExit) as exit:
            main([str(a) for a in arguments])
        assert exit.value.code == 2
        return capsys.readouterr().err

    index = tmp_path / "index"
    out = cli("index", "--mvam_model", root / "mvam", "--uarda_model", root / "uarda", "--data", root / "data",
              "--output_dir", index, "--per_device_eval_batch_size", 5)
    assert f"indexed {NUM_IMAGES} images and {NUM_IMAGES * 5} captions (flat index, UARDA fragments)" in out
    expected = RetrievalIndex.load(index).search(texts=["a red circle", "two green squares"], k=3)
    # the real entry point, once: the saved index searched again in a fresh process
    result = subprocess.run([sys.executable, "-m", "hf_mvam.retrieval", "search", str(index), "a red circle",
                             "two green squares", "--k", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    hits = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [[h["id"] for h in hit["results"]] for hit in hits] == expected.ids
    np.testing.assert_allclose([[h["score"] for h in hit["results"]] for hit in hits], expected.scores, rtol=0, atol=1e-6)
    table = cli("search", index, "a red circle", "--k", 3, "--no_rerank")
    assert table.splitlines()[1] == "a red circle" and len(table.strip().splitlines()) == 4
    captions = json.loads(cli("search", index, "--images", tmp_path / "query.png", "--k", 2, "--json"))
    assert len(captions["results"]) == 2 and all(h["text"] for h in captions["results"])

    out = cli("evaluate", "--mvam_model", root / "mvam", "--uarda_model", root / "uarda", "--data", root / "data",
              "--shortlist_sizes", 4, 16, "--output_file", tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"mvam/rsum", "uarda/rsum", "two_stage@4/rsum", "two_stage@16/t2i_R@1"} <= set(results)
    assert f"| two_stage@4 | {results['two_stage@4/i2t_R@1']:.2f} |" in out

    error = cli_error("index", "--mvam_model", root / "mvam", "--data", root / "data", "--output_dir", index)
    assert error.strip().endswith("exists; pass overwrite=True (--overwrite_output_dir) to replace it")
    error = cli_error("evaluate", "--mvam_model", root / "mvam", "--data", root / "data", "--split", "train")
    assert "has no 'train' split; it has ['test']" in error and "Traceback" not in error
    assert "has no training_args.json" in cli_error("index", "--mvam_model", root / "mvam", "--output_dir", tmp_path / "i2")
    assert "give text queries or --images" in cli_error("search", index)


def test_an_index_of_other_weights_is_refused(folders, tmp_path):
    """An index holds one model's embeddings: once the model folder holds other weights (trained
    again), opening the index is an error, not a search of old embeddings with new queries."""
    import shutil

    root, split = folders
    shutil.copytree(root / "mvam", tmp_path / "mvam")
    RetrievalIndex.build(tmp_path / "index", split, tmp_path / "mvam")
    assert len(RetrievalIndex.load(tmp_path / "index")) == NUM_IMAGES  # the same weights: fine
    model = MVAMModel.from_pretrained(tmp_path / "mvam")
    with torch.no_grad():
        model.image_views.view_projection.mul_(1.5)
    model.save_pretrained(tmp_path / "mvam")
    with pytest.raises(ValueError, match=r"was built with other weights of .*mvam: build it again"):
        RetrievalIndex.load(tmp_path / "index")
