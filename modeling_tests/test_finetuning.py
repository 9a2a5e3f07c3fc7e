"""Issue 21 through training/run.py: fine-tuning a saved folder, frozen towers, UARDA on pretrained
towers, --do_eval alone, streaming, the training-loop flags, and pushing every checkpoint; tiny
towers saved with save_pretrained stand in for Hub checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

from conftest import CAPTIONS, TINY_TEXT, TINY_VISION
from hf_mvam import MVAMModel, MVAMProcessor, UARDAModel
from hf_mvam.backbones import from_vision_text_pretrained
from hf_mvam.builders import default_image_processor
from hf_mvam.checkpointing import TrainerState, latest_checkpoint
from hf_mvam.data.synthetic import generate_synthetic_benchmark
from hf_mvam.evaluation import evaluate_split
from hf_mvam.tokenization import train_caption_tokenizer
from training_runs import FAST, REPO, SYNTHETIC, TINY, run, synthetic_cache, train, weights  # noqa: F401

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained MVAM folder: what --model_name_or_path fine-tunes."""
    folder = tmp_path_factory.mktemp("saved_mvam")
    train("--output_dir", folder, *TINY, *SYNTHETIC, *FAST)
    return folder


@pytest.fixture(scope="module")
def new_data(tmp_path_factory):
    """Other data than the model saw: an image folder (train/ and test/ with metadata.jsonl)."""
    root = tmp_path_factory.mktemp("new_data")
    scenes = generate_synthetic_benchmark(num_train=24, num_validation=0, num_test=8, seed=5)
    for split in ("train", "test"):
        (root / split).mkdir()
        rows = []
        for i, example in enumerate(scenes[split]):
            example["image"].save(root / split / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "captions": example["captions"]})
        (root / split / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tiny "pretrained" towers: a CLIP vision tower with its image processor, a 2-layer BERT with
    its tokenizer."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})).save_pretrained(root / "vision")
    default_image_processor(TINY_VISION["image_size"]).save_pretrained(root / "vision")
    tokenizer = train_caption_tokenizer(CAPTIONS * 3 + ["red blue green circle square star small large"], model_max_length=32)
    text = {**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}, "num_hidden_layers": 2}
    BertModel(BertConfig(**text, vocab_size=len(tokenizer)), add_pooling_layer=False).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    return root / "vision", root / "text"


@pytest.fixture
def fake_hub(monkeypatch):
    """The two network calls of a push, recorded with the files each upload would send."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs.get("private")))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        calls.append(("upload_folder", repo_id, commit_message, files))

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    return calls


def test_fine_tune_a_saved_folder_on_new_data_with_a_frozen_vision_tower(saved, new_data, tmp_path, fake_hub, monkeypatch):
    """--model_name_or_path continues from the folder's weights with its processor; the frozen
    tower keeps them exactly; the schedule, logging and sample flags do what they say; every
    checkpoint is pushed (private) and the card states license, data and what it was tuned from."""
    out = tmp_path / "tuned"
    lengths = []
    evaluate = run.evaluate_on_every_process
    monkeypatch.setattr(run, "evaluate_on_every_process", lambda accelerator, model, processor, split, *a, **k:
                        lengths.append(len(split)) or evaluate(accelerator, model, processor, split, *a, **k))
    train("--output_dir", out, "--model_name_or_path", saved, "--data", new_data, *FAST, "--freeze_vision_model",
          "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "2",
          "--max_train_samples", "16", "--max_eval_samples", "4", "--dataset_name", "new-shapes", "--license", "mit",
          "--push_to_hub", "--hub_model_id", "someone/tuned", "--hub_private_repo", "--hub_strategy", "every_save")
    before, after = weights(saved), weights(out)
    vision = [name for name in before if name.startswith("vision_model.")]
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)
    assert not torch.equal(before["text_model.embeddings.word_embeddings.weight"], after["text_model.embeddings.word_embeddings.weight"])
    assert (out / "tokenizer.json").read_text() == (saved / "tokenizer.json").read_text()  # the folder's processor

    state = TrainerState.from_file(latest_checkpoint(out / "checkpoints") / "trainer_state.json")
    losses = [record for record in state.log_history if "train/loss" in record]
    assert [record["step"] for record in losses] == [2, 4]  # --logging_steps 2
    assert {record["train/learning_rate"] for record in losses} == {1e-3}  # constant, no warm-up
    assert all(record["train/grad_norm"] > 0 for record in losses)
    assert lengths == [4, 4]  # validation at step 2 and the test split, each cut to --max_eval_samples
    assert state.epoch == 1  # 16 training images, batch 8: 2 steps an epoch

    card = (out / "README.md").read_text()
    assert "license: mit" in card and "new-shapes" in card and f"| fine_tuned_from | {saved.name} |" in card
    assert "- name: tuned" in card and "base_model" not in card  # a local folder is no Hub id
    pushes = [call for call in fake_hub if call[0] == "upload_folder"]
    assert [call[2] for call in pushes] == ["Training in progress, step 2", "Training in progress, step 4",
                                            "Upload model, processor and model card with hf-mvam"]
    assert all({"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(call[3]) for call in pushes)
    assert {call[2] for call in fake_hub if call[0] == "create_repo"} == {True}  # --hub_private_repo

    # The fine-tuned folder reloads in a fresh process and reproduces its metrics on the cut test split.
    result = subprocess.run([sys.executable, "check_folder.py", str(out)], cwd=REPO / "training",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK: all" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_fine_tuning_refuses_what_would_not_fit(saved, new_data, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit, match=r"--num_views 2 changes the shape of weights of --model_name_or_path"):
        train("--output_dir", tmp_path / "a", "--model_name_or_path", saved, "--data", new_data, *FAST, "--num_views", "2")
    with pytest.raises(SystemExit):
        run.parse_arguments(["--model_name_or_path", str(saved), "--model_type", "uarda"])
    assert f"--model_type uarda but --model_name_or_path {saved} is mvam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_arguments(["--model_name_or_path", str(saved), "--vision_config", json.dumps(TINY_VISION)])
    assert "--model_name_or_path brings its own backbones: drop --vision_config" in capsys.readouterr().err
    # A Hub id that cannot be reached: the script's one-line error, not a ConnectionError traceback.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        run.parse_arguments(["--model_name_or_path", "someone/not-on-this-machine"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("run.py: error: cannot load --model_name_or_path someone/not-on-this-machine: ")
    with pytest.raises(SystemExit, match=r"^run.py: error: cannot load someone/bert-elsewhere: [^\n]*$"):
        train("--output_dir", tmp_path / "b", *SYNTHETIC, *FAST, "--text_model_name_or_path", "someone/bert-elsewhere")


def test_do_eval_alone_evaluates_a_saved_folder_on_new_data(saved, new_data, tmp_path):
    out = tmp_path / "eval"
    mtime = (saved / "model.safetensors").stat().st_mtime_ns
    results = train("--do_eval", "--model_name_or_path", saved, "--data", new_data, "--output_dir", out, "--report_to", "none")
    model = MVAMModel.from_pretrained(saved)
    split = run.load_splits(str(new_data))[0]["test"]
    assert results == pytest.approx(evaluate_split(model, MVAMProcessor.from_pretrained(saved), split))
    assert json.loads((out / "eval_results.json").read_text()) == pytest.approx(results)
    assert sorted(p.name for p in out.iterdir()) == [".hf_mvam", "eval_results.json"]  # no model, no checkpoints
    assert (saved / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="--output_dir is the model folder itself"):
        run.check_run_setting(*run.parse_arguments(["--do_eval", "--model_name_or_path", str(saved),
                                                    "--output_dir", str(saved)]), 1)
    with pytest.raises(ValueError, match="--do_eval without --do_train evaluates a trained model: pass --model_name_or_path"):
        run.check_run_setting(*run.parse_arguments(["--do_eval"]), 1)


def test_uarda_on_a_pretrained_text_tower_with_region_features(towers, tmp_path, monkeypatch):
    """The SCAN family's setting: a BERT over precomputed regions, its last block trained only
    (embeddings and first block frozen), gradient checkpointing on, gradients clipped."""
    import numpy as np

    _, text = towers
    data = tmp_path / "scan"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        np.save(data / f"{split}_ims.npy", rng.standard_normal((n, 6, 12)).astype(np.float32))
        (data / f"{split}_caps.txt").write_text("\n".join(rng.choice(CAPTIONS, 5 * n)) + "\n")
    norms = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]
                                                            if p.grad is not None])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    out = tmp_path / "uarda"
    train("--output_dir", out, "--model_type", "uarda", "--embed_dim", "16", "--text_model_name_or_path", text,
          "--data", data, *FAST, "--freeze_text_model", "--unfrozen_text_layers", "1", "--gradient_checkpointing",
          "--max_grad_norm", "0.05")
    assert len(norms) == 4 and max(norms) <= 0.05 * (1 + 1e-4)
    pretrained, trained = load_file(text / "model.safetensors"), weights(out)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"):
        assert torch.equal(pretrained[name], trained[f"text_model.{name}"]), name
    assert not torch.equal(pretrained["encoder.layer.1.attention.self.query.weight"],
                           trained["text_model.encoder.layer.1.attention.self.query.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["image_feature_dim"] == 12 and config["text_config"]["num_hidden_layers"] == 2
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(text).get_vocab()
    assert "| frozen_backbones | text |" in (out / "README.md").read_text()

    # ... and that UARDA model fine-tuned in turn, in SCAN's mode: an option that only changes the scoring
    tuned = tmp_path / "tuned"
    train("--output_dir", tuned, "--model_name_or_path", out, "--data", data, *FAST, "--threshold_mode", "scan")
    assert json.loads((tuned / "config.json").read_text())["threshold_mode"] == "scan"
    assert not torch.equal(weights(out)["region_projection.weight"], weights(tuned)["region_projection.weight"])


def test_uarda_on_a_pretrained_vision_tower_takes_its_patches_as_regions(towers, tiny_tokenizer):
    vision, text = towers
    model = from_vision_text_pretrained(UARDAModel, str(vision), None, embed_dim=16,
                                        text_config={**TINY_TEXT, "vocab_size": len(tiny_tokenizer)})
    clip = CLIPVisionModel.from_pretrained(vision)
    torch.testing.assert_close(model.vision_model.embeddings.patch_embedding.weight, clip.embeddings.patch_embedding.weight)
    encoded = model.encode_images(pixel_values=torch.randn(2, 3, 32, 32))
    assert encoded.image_fragments.shape == (2, 16, 16) and encoded.grid_size == (4, 4)  # 4 x 4 patches, no CLS
    both = from_vision_text_pretrained(UARDAModel, str(vision), str(text), embed_dim=16)
    assert both.config.text_config.num_hidden_layers == 2


def test_dataloader_workers_decode_without_changing_the_model(saved, tmp_path):
    """Two worker processes give the run the same batches, hence the same weights, as none."""
    train("--output_dir", tmp_path / "workers", *TINY, *SYNTHETIC, *FAST, "--dataloader_num_workers", "2")
    a, b = weights(saved), weights(tmp_path / "workers")
    assert all(torch.equal(a[name], b[name]) for name in a)
    *_, train_args = run.parse_arguments([])
    assert train_args.dataloader_num_workers is None
    split = generate_synthetic_benchmark(num_train=16, num_validation=0, num_test=0, seed=1)["train"]
    loader = run.build_train_loader(split, MVAMProcessor.from_pretrained(saved), *run.parse_arguments(["--per_device_train_batch_size", "2"])[1:])
    assert loader.num_workers == max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def test_streaming_fine_tunes_on_a_stream(saved, new_data, tmp_path):
    """A saved folder fine-tuned on streamed data (the pairs' order and captions are seeded: see
    the next test); modes that need the whole split are refused."""
    common = ["--model_name_or_path", saved, "--data", new_data, "--streaming", *FAST, "--max_steps", "3",
              "--max_eval_samples", "5"]
    results = train("--output_dir", tmp_path / "a", *common)
    a = weights(tmp_path / "a")
    assert not all(torch.equal(a[name], weights(saved)[name]) for name in a) and 0 <= results["rsum"] <= 600
    recorded = json.loads((tmp_path / "a" / "training_args.json").read_text())
    assert recorded["final_step"] == 3 and recorded["data"]["streaming"] is True
    with pytest.raises(SystemExit, match="--streaming cannot train a caption tokenizer"):
        train("--output_dir", tmp_path / "c", "--data", new_data, "--streaming", *FAST)
    with pytest.raises(SystemExit, match="--streaming has no epoch length: set --max_steps"):
        train("--output_dir", tmp_path / "d", *common, "--max_steps", "-1")


def test_streamed_pairs_draw_one_caption_per_image_and_shuffle_per_epoch(new_data):
    from hf_mvam.streaming import load_streaming_splits

    train_pairs, evaluation = load_streaming_splits(str(new_data), seed=3, max_eval_samples=5)
    assert set(evaluation) == {"test"} and len(evaluation["test"]) == 5
    epochs = []
    for epoch in (0, 0, 1):
        train_pairs.set_epoch(epoch)
        epochs.append([(pair["image"].tobytes(), pair["caption"]) for pair in train_pairs])
    assert len(epochs[0]) == 24 and epochs[0] == epochs[1] and epochs[0] != epochs[2]
    assert len({image for image, _ in epochs[0]}) == 24  # every image once an epoch
    split = run.load_splits(str(new_data))[0]["train"]
    known = {caption for captions in split["captions"] for caption in captions}
    assert all(caption in known for _, caption in epochs[0])
