"""Distributed training on CPU (gloo): negatives gathered from every process make W processes with
batch B train exactly like one process with batch W*B, and ``accelerate launch --multi_gpu
--num_processes 2 training/run.py`` works end to end."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import PrepareForLaunch, patch_environment
from safetensors.torch import load_file
from torch.multiprocessing import start_processes
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

from conftest import CAPTIONS, TINY_TEXT, TINY_VISION
from hf_mvam import MVAMConfig, MVAMModel
from hf_mvam.builders import default_image_processor
from hf_mvam.losses import contrastive_loss
from hf_mvam.tokenization import train_caption_tokenizer

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
LOCAL_BATCH = 3


def _gathered_loss_and_gradients_match_one_process():
    """Runs in each of 2 processes: the local loss on 3 pairs, gathered and DDP-averaged, against
    one process's loss and gradients on all 6 pairs."""
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    rank = accelerator.process_index
    config = MVAMConfig(
        vision_config=TINY_VISION, text_config={**TINY_TEXT, **NO_DROPOUT, "vocab_size": 50},
        num_views=2, projection_dim=16, diversity_weight=0.5,
    )
    torch.manual_seed(0)
    model = MVAMModel(config).train()
    reference = copy.deepcopy(model)
    inputs = torch.Generator().manual_seed(1)
    size = 2 * LOCAL_BATCH
    everything = {
        "input_ids": torch.randint(4, 50, (size, 7), generator=inputs),
        "attention_mask": (torch.arange(7) < torch.randint(3, 8, (size, 1), generator=inputs)).long(),
        "pixel_values": torch.randn(size, 3, 32, 32, generator=inputs),
    }
    local = {name: value[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH] for name, value in everything.items()}

    prepared = accelerator.prepare(model)
    loss = prepared(**local, return_loss=True).loss
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), "mean")

    out = reference(**everything, return_loss=True)
    expected = contrastive_loss(out.image_embeds, out.text_embeds, reference.logit_scale) + 0.5 * out.diversity_loss
    expected.backward()
    torch.testing.assert_close(mean_loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for (name, parameter), (_, single) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(parameter.grad, single.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without the gather each process would see only its own negatives: a different loss.
    own = contrastive_loss(out.image_embeds[:LOCAL_BATCH], out.text_embeds[:LOCAL_BATCH], reference.logit_scale)
    assert not torch.allclose(own, contrastive_loss(out.image_embeds, out.text_embeds, reference.logit_scale))


def test_gathered_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path):
    # accelerate.debug_launcher, but spawning instead of forking: a fork of a process whose OpenMP
    # threads have already run (earlier tests) can hang in the child's first parallel region.
    with patch_environment(
        world_size=2, master_addr="127.0.0.1", master_port="29513", accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=str(tmp_path / "rendezvous"), accelerate_use_cpu="yes", omp_num_threads=1,
    ):
        start_processes(PrepareForLaunch(_gathered_loss_and_gradients_match_one_process, debug=True), nprocs=2, start_method="spawn")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny "pretrained" towers saved like Hub checkpoints: a CLIP vision tower with its image
    processor, a BERT (no dropout) with its tokenizer. Both runs below load the same tokenizer."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})).save_pretrained(root / "vision")
    default_image_processor(TINY_VISION["image_size"]).save_pretrained(root / "vision")
    tokenizer = train_caption_tokenizer(CAPTIONS * 3 + ["left right above below big small"], model_max_length=32)
    text = {k: v for k, v in TINY_TEXT.items() if k != "model_type"}
    BertModel(BertConfig(**text, **NO_DROPOUT, vocab_size=len(tokenizer)), add_pooling_layer=False).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    return root / "vision", root / "text"


def test_two_processes_train_like_one_process_with_twice_the_batch(pretrained, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 (gloo on CPU) with batch 4 per process, and
    one process with batch 8: same data, same steps, the same weights at the end."""
    vision, text = pretrained
    common = ["--vision_model_name_or_path", vision, "--text_model_name_or_path", text, "--projection_dim", "16",
              "--num_train_images", "32", "--num_validation_images", "8", "--num_test_images", "16",
              "--max_steps", "4", "--save_steps", "2", "--eval_steps", "3", "--warmup_steps", "1",
              "--learning_rate", "1e-3", "--report_to", "none"]
    env = {**os.environ, "HF_MVAM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    runs = {
        "two": launcher + ["training/run.py", "--output_dir", tmp_path / "two", "--per_device_train_batch_size", "4"],
        "one": [sys.executable, "training/run.py", "--output_dir", tmp_path / "one", "--per_device_train_batch_size", "8"],
    }
    logs = {}
    for name, command in runs.items():
        result = subprocess.run([str(c) for c in command + common], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        logs[name] = result.stderr
    assert "2 process(es) x batch 4" in logs["two"] and "1 process(es) x batch 8" in logs["one"]
    two, one = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    # Key biases cannot change an attention softmax (they shift every logit of a row alike): their
    # gradient is rounding noise, which Adam scales up to learning-rate-sized steps. Skip them.
    compared = [name for name in one if not name.endswith(("key.bias", "k_proj.bias"))]
    assert len(compared) > 0.8 * len(one)
    for name in compared:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint_4"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    card = (tmp_path / "two" / "README.md").read_text()
    assert "| global_batch_size | 8 |" in card
    # Evaluation is shared by the two processes (each encodes and scores its part) and must give
    # the one-process results.
    two_results = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two_results == pytest.approx(json.loads((tmp_path / "one" / "eval_results.json").read_text()))


def test_two_processes_fine_tune_a_saved_folder_with_a_frozen_tower_then_evaluate_it(tmp_path):
    """The 2-process CPU form of issue 21's modes: fine-tuning a saved folder (vision tower frozen)
    on new data, then --do_eval of the result; the evaluation equals the tuned folder's own."""
    from training_runs import FAST, SYNTHETIC, TINY, train

    env = {**os.environ, "HF_MVAM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    with patch_environment(hf_mvam_cache=str(tmp_path / "cache")):
        train("--output_dir", tmp_path / "saved", *TINY, *SYNTHETIC, *FAST)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
                "training/run.py"]
    new_data = ["--num_train_images", "48", "--num_validation_images", "8", "--num_test_images", "12",
                "--per_device_train_batch_size", "4", "--report_to", "none", "--dataloader_num_workers", "0"]
    commands = {
        "fine-tune": ["--model_name_or_path", tmp_path / "saved", "--output_dir", tmp_path / "tuned", "--freeze_vision_model",
                      "--max_steps", "3", "--save_steps", "3", "--eval_steps", "3", "--warmup_steps", "0"],
        "evaluate": ["--do_eval", "--model_name_or_path", tmp_path / "tuned", "--output_dir", tmp_path / "evaluated"],
    }
    logs = {}
    for name, flags in commands.items():
        result = subprocess.run([str(c) for c in launcher + flags + new_data], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        logs[name] = result.stderr
    assert "3 steps of 2 process(es) x batch 4" in logs["fine-tune"]
    saved, tuned = load_file(tmp_path / "saved" / "model.safetensors"), load_file(tmp_path / "tuned" / "model.safetensors")
    assert all(torch.equal(saved[n], tuned[n]) for n in saved if n.startswith("vision_model."))
    assert not torch.equal(saved["text_views.view_codes"], tuned["text_views.view_codes"])
    evaluated = json.loads((tmp_path / "evaluated" / "eval_results.json").read_text())
    assert evaluated == pytest.approx(json.loads((tmp_path / "tuned" / "eval_results.json").read_text()))
