"""training/run.py and training/check_folder.py end to end, on tiny backbones and tiny data.

Runs go through ``run.main(argv)`` in this process (fast); every output folder is then reloaded in a
fresh process, through ``AutoModel``/``AutoProcessor`` with ``trust_remote_code=True``, and
re-evaluated by ``check_folder.py`` against its ``eval_results.json``.
"""

from __future__ import annotations

import json
import math
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from conftest import TINY_TEXT, TINY_VISION, run_fresh_python
from hf_mvam import hub
from hf_mvam.data.synthetic import generate_synthetic_benchmark
from hf_mvam import MVAMConfig, MVAMModel
from hf_mvam.checkpointing import (
    TrainerState, latest_checkpoint, list_checkpoints, save_checkpoint, starting_checkpoint,
)

from training_runs import FAST, REPO, SYNTHETIC, TINY, TINY_UARDA, fake_checkpoint, run, synthetic_cache, train, weights  # noqa: F401


# --- data written the way users have it ---------------------------------------------------------


@pytest.fixture(scope="module")
def scenes():
    """A few synthetic scenes with 5 captions each, to write out as image files."""
    return generate_synthetic_benchmark(num_train=24, num_validation=0, num_test=8, seed=3)


@pytest.fixture(scope="module")
def imagefolder(scenes, tmp_path_factory):
    """train/ and test/ folders with metadata.jsonl, plus one corrupt image in train/."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split in ("train", "test"):
        folder = root / split
        folder.mkdir()
        rows = []
        for i, example in enumerate(scenes[split]):
            example["image"].save(folder / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "captions": example["captions"]})
        if split == "train":
            (folder / "corrupt.png").write_bytes(b"this is not a png")
            rows.append({"file_name": "corrupt.png", "captions": ["never read"]})
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def karpathy(scenes, tmp_path_factory):
    """A Karpathy split JSON (train/val/test) and its image folder."""
    root = tmp_path_factory.mktemp("karpathy")
    (root / "images").mkdir()
    entries = []
    for split, karpathy_split in (("train", "train"), ("test", "val"), ("test", "test")):
        for i, example in enumerate(scenes[split]):
            name = f"{split}_{i}.png"
            example["image"].save(root / "images" / name)
            entries.append({"filename": name, "split": karpathy_split, "sentences": [{"raw": c} for c in example["captions"]]})
    (root / "dataset.json").write_text(json.dumps({"images": entries}))
    return root / "dataset.json", root / "images"


@pytest.fixture(scope="module")
def scan_features(tmp_path_factory):
    """SCAN's precomputed layout: {split}_ims.npy (N x R x F) and {split}_caps.txt (5 per image)."""
    root = tmp_path_factory.mktemp("scan")
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "circle", "square", "star", "small", "large"]
    for split, n in (("train", 16), ("test", 8)):
        np.save(root / f"{split}_ims.npy", rng.standard_normal((n, 6, 12)).astype(np.float32))
        captions = [" ".join(rng.choice(words, 4)) for _ in range(5 * n)]
        (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    return root


# --- the runs (one per kind of data; the checks below share them) -------------------------------


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """MVAM on the synthetic benchmark, pushed to a (fake) Hub: the network calls are recorded."""
    folder = tmp_path_factory.mktemp("mvam_synthetic")
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)) or f"https://hf.co/{repo_id}")
        patch.setattr("huggingface_hub.HfApi.upload_folder", lambda self, **kw: calls.append(("upload_folder", kw["repo_id"], kw)))
        results = train("--output_dir", folder, *TINY, *SYNTHETIC, *FAST, "--push_to_hub", "--hub_model_id", "someone/tiny-mvam", "--hub_token", "hf_secret")
    return folder, results, calls


@pytest.fixture(scope="module")
def uarda_synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uarda_synthetic")
    return folder, train("--output_dir", folder, "--model_type", "uarda", *TINY_UARDA, *SYNTHETIC, *FAST)


@pytest.fixture(scope="module")
def mvam_imagefolder(imagefolder, tmp_path_factory):
    """Also the run that records its curves and figures with tensorboard, and asks for fp16 on a CPU."""
    folder = tmp_path_factory.mktemp("mvam_imagefolder")
    logger = logging.getLogger("hf_mvam.run")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        results = train("--output_dir", folder, "--data", imagefolder, *TINY, *FAST, "--all_pairs",
                        "--report_to", "tensorboard", "--mixed_precision", "fp16")
    finally:
        logger.removeHandler(handler)
    return folder, results, [record.getMessage() for record in records]


@pytest.fixture(scope="module")
def uarda_karpathy(karpathy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uarda_karpathy")
    json_path, image_root = karpathy
    return folder, train("--output_dir", folder, "--model_type", "uarda", "--threshold_mode", "scan", "--direction", "both",
                         "--data", json_path, "--image_root", image_root, *TINY_UARDA, *FAST)


@pytest.fixture(scope="module")
def uarda_features(scan_features, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uarda_features")
    return folder, train("--output_dir", folder, "--model_type", "uarda", "--data", scan_features, "--text_config", json.dumps(TINY_TEXT), *FAST)


def test_mvam_synthetic_folder_checkpoints_and_push(pushed):
    folder, results, calls = pushed
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mvam.MVAMModel"
    for name in ("model.safetensors", "modeling_mvam.py", "processor_config.json", "tokenizer.json", "README.md", "figures/view_attention.png"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "eval_results.json").read_text()) == pytest.approx(results)
    assert {"rsum", "i2t_R@1", "t2i_R@10", "t2i_pair_acc/all", "i2t_pair_acc/all"} <= set(results)
    readme = (folder / "README.md").read_text()
    assert "figures/view_attention.png" in readme and "| num_views | 4 |" in readme
    recorded = json.loads((folder / "training_args.json").read_text())
    assert recorded["eval_split"] == "test" and "hub_token" not in recorded["training"]
    # checkpoints at 2 and 4, each complete, with the processor and the trainer state
    checkpoints = list_checkpoints(folder / "checkpoints")
    assert [c.name for c in checkpoints] == ["checkpoint_2", "checkpoint_4"]
    assert TrainerState.from_file(checkpoints[-1] / "trainer_state.json").global_step == 4
    assert (checkpoints[-1] / "processor" / "tokenizer.json").is_file()
    # the Hub upload: this folder, this repo, the token, and never the checkpoints
    assert [call[:2] for call in calls] == [("create_repo", "someone/tiny-mvam"), ("upload_folder", "someone/tiny-mvam")]
    upload = calls[1][2]
    assert Path(upload["folder_path"]) == folder and "checkpoints/*" in upload["ignore_patterns"]
    sent = hub.list_upload_files(folder)
    assert "model.safetensors" in sent and "README.md" in sent and not any(f.startswith("checkpoints/") for f in sent)


def test_uarda_synthetic_logs_and_plots_the_threshold(uarda_synthetic):
    folder, results = uarda_synthetic
    for name in ("relevance_histograms", "threshold_trajectory", "word_region_attention"):
        assert (folder / "figures" / f"{name}.png").is_file(), name
    state = TrainerState.from_file(latest_checkpoint(folder / "checkpoints") / "trainer_state.json")
    assert [record["step"] for record in state.log_history if "train/threshold" in record] == [1, 2, 3, 4]
    assert "learned_threshold" in (folder / "README.md").read_text()
    assert 0 <= results["rsum"] <= 600


def test_corrupt_image_is_skipped_and_counted(mvam_imagefolder):
    folder, results, messages = mvam_imagefolder
    assert any("skipped 1 unusable image" in message for message in messages), messages
    assert any("corrupt.png" in message and "cannot read image" in message for message in messages), messages
    assert (folder / "eval_results.json").is_file() and results["rsum"] >= 0


def test_karpathy_and_precomputed_features(uarda_karpathy, uarda_features):
    for folder, results in (uarda_karpathy, uarda_features):
        assert json.loads((folder / "eval_results.json").read_text()) == pytest.approx(results)
    assert json.loads((uarda_features[0] / "config.json").read_text())["image_feature_dim"] == 12


def test_every_folder_reloads_in_a_fresh_process_and_reproduces_its_metrics(
    pushed, uarda_synthetic, mvam_imagefolder, uarda_karpathy, uarda_features
):
    folders = [str(run[0]) for run in (pushed, uarda_synthetic, mvam_imagefolder, uarda_karpathy, uarda_features)]
    # Without hf_mvam: AutoModel/AutoProcessor must load everything from the folder itself.
    out = run_fresh_python(
        f"""
        import torch
        from transformers import AutoModel, AutoProcessor
        for folder in {folders[:2]!r}:
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            batch = processor(text=["a red circle", "a blue square"], images=[torch.zeros(3, 40, 40).numpy().transpose(1, 2, 0)] * 3)
            with torch.no_grad():
                print(type(model).__module__.split(".")[0], tuple(model(**batch).logits_per_image.shape))
        """,
        cwd=str(REPO),
    )
    assert out.split("\n")[:2] == ["transformers_modules (3, 2)"] * 2
    # check_folder.py (which re-evaluates with hf_mvam's evaluation code), in one fresh process.
    result = subprocess.run(
        [sys.executable, "-c", "import sys, check_folder; sys.exit(max(check_folder.main([f]) for f in sys.argv[1:]))", *folders],
        cwd=REPO / "training",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("OK: all") == len(folders)
    assert "caption 0" in result.stdout  # the similarity table


# --- resume --------------------------------------------------------------------------------------


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Run A: 6 steps, 2 batches per step, 2 steps per epoch, checkpoints every 3 steps (dropout on).
    Run B starts from A's checkpoint_3 (mid-epoch), beside the half-written folder a process killed
    while saving step 6 would leave, and must end with A's weights, exactly."""
    common = [*TINY, *SYNTHETIC, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
              "--max_steps", "6", "--save_steps", "3", "--eval_steps", "100", "--save_total_limit", "3",
              "--warmup_steps", "2", "--learning_rate", "1e-3", "--report_to", "none"]
    first, second = tmp_path / "a", tmp_path / "b"
    train("--output_dir", first, *common)
    shutil.copytree(first / "checkpoints" / "checkpoint_3", second / "checkpoints" / "checkpoint_3")
    partial = second / "checkpoints" / ".tmp-checkpoint_6"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half written")
    assert latest_checkpoint(second / "checkpoints").name == "checkpoint_3"
    assert TrainerState.from_file(second / "checkpoints" / "checkpoint_3" / "trainer_state.json").batch_in_epoch == 2

    train("--output_dir", second, *common, "--resume_from_checkpoint", "latest")

    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), [n for n in a if not torch.equal(a[n], b[n])]
    assert json.loads((first / "eval_results.json").read_text()) == json.loads((second / "eval_results.json").read_text())
    assert not partial.exists() and [c.name for c in list_checkpoints(second / "checkpoints")] == ["checkpoint_3", "checkpoint_6"]


def test_checkpoints_this_run_would_not_continue_are_refused_or_overwritten(tmp_path):
    """Checkpoints of an earlier run are never deleted silently: a fresh start refuses beside them,
    --resume_from_checkpoint latest continues them, --overwrite_output_dir deletes them; resuming
    from an earlier checkpoint does the same with the later ones (an abandoned run's)."""
    checkpoints = tmp_path / "checkpoints"
    first, later = fake_checkpoint(checkpoints, 9), fake_checkpoint(checkpoints, 12)
    accelerator = Accelerator(cpu=True)

    def start(*flags):
        *_, args = run.parse_arguments(["--output_dir", str(tmp_path), *flags])
        return starting_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)

    try:
        assert start("--resume_from_checkpoint", "latest") == later
        with pytest.raises(ValueError, match=r"holds checkpoints this run would not continue \(checkpoint_9, checkpoint_12\)"):
            start()
        with pytest.raises(ValueError, match=r"would not continue \(checkpoint_12\)"):
            start("--resume_from_checkpoint", str(first))
        assert first.exists() and later.exists()
        assert start("--resume_from_checkpoint", str(first), "--overwrite_output_dir") == first
        assert first.exists() and not later.exists()
        assert start("--overwrite_output_dir") is None and not checkpoints.exists()
        (checkpoints / ".tmp-checkpoint_3").mkdir(parents=True)  # a save killed half-way
        assert start() is None and not checkpoints.exists()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


class _MainProcess:
    """The two calls save_checkpoint makes of an Accelerator, on one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder, "model.safetensors").write_text(Path(folder).name)


class _Processor:
    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def test_save_checkpoint_replaces_the_same_step_and_keeps_the_new_one(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    first = save_checkpoint(_MainProcess(), checkpoints, TrainerState(global_step=5), 1, _Processor())
    (first / "stale.txt").write_text("from the first save")
    again = save_checkpoint(_MainProcess(), checkpoints, TrainerState(global_step=5), 1, _Processor())
    assert again == first and not (again / "stale.txt").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_5"]  # nothing left aside
    # a later step on disk (an older run's) never makes the prune delete the checkpoint just written
    fake_checkpoint(checkpoints, 30)
    newest = save_checkpoint(_MainProcess(), checkpoints, TrainerState(global_step=8), 1, _Processor())
    assert newest.is_dir() and (newest / "trainer_state.json").is_file()


# --- arguments and data that must be refused before training ------------------------------------


def test_logit_scale_is_capped_at_clips_100():
    model = MVAMModel(MVAMConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 50}))
    inputs = {"input_ids": torch.tensor([[2, 5, 3], [2, 6, 3]]), "pixel_values": torch.randn(2, 3, 32, 32)}
    model.logit_scale.data.fill_(8.0)  # exp(8) = 2981
    out = model(**inputs, return_loss=True)
    assert out.logit_scale.item() == pytest.approx(100.0)
    cosines = out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, 100.0 * cosines)
    out.loss.backward()
    assert model.logit_scale.grad.item() == 0.0  # pushed beyond the cap, it learns nothing more
    model.logit_scale.data.fill_(-0.5)
    assert model(**inputs).logit_scale.item() == 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_type", "clip"], "invalid choice: 'clip'"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
        (["--eval_steps", "0"], "--eval_steps must be >= 1"),
        (["--save_steps", "-1"], "--save_steps must be >= 1"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--vision_config", "{not json"], "--vision_config is not valid JSON"),
        (["--text_config", '{"hidden_size": 8}'], "--text_config must be a JSON object with a 'model_type'"),
        (["--vision_model_name_or_path", "some/model", "--vision_config", json.dumps(TINY_VISION)],
         "pass either --vision_model_name_or_path or --vision_config, not both"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "neither 'latest' nor an existing folder"),
        # issue 19: refused before anything is loaded, with one line
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0, got inf"),
        (["--weight_decay", "inf"], "--weight_decay must be a finite number >= 0, got inf"),
        (["--hub_model_id", "owner/na--me"], "Cannot have -- or .. in repo_id"),
        (["--hub_model_id", "a/b/c"], "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
        (["--report_to", "tensorboard,nosuchtracker"], "--report_to: unknown tracker 'nosuchtracker'"),
        (["--report_to", "wandb"], "--report_to wandb: the wandb package is not installed"),
        (["--vision_config", json.dumps({**TINY_VISION, "hidden_size": 30, "num_attention_heads": 4})],
         "the backbone config is invalid: vision_config: Class validation error for validator 'validate_architecture': "
         "ValueError: The hidden size (30) is not a multiple of the number of attention heads (4)"),
        (["--text_config", json.dumps({**TINY_TEXT, "hidden_size": 30, "num_attention_heads": 4})],
         "the backbone config is invalid: The hidden size (30) is not a multiple of the number of attention heads (4)"),
        # issue 21
        (["--unfrozen_text_layers", "1"], "--unfrozen_text_layers applies to a frozen tower: add --freeze_text_model"),
        (["--hub_strategy", "every_save"], "--hub_strategy every_save needs --push_to_hub"),
        (["--streaming", "--data", "someone/data", "--all_pairs"], "--all_pairs visits every pair of the whole split"),
        (["--lr_scheduler_type", "reduce_lr_on_plateau"], "invalid choice: 'reduce_lr_on_plateau'"),
        (["--do_train", "false"], "nothing to do: --do_train and --do_eval are both false"),
        (["--streaming", "--data", "someone/data", "--image_root", "images", "--max_steps", "2"],
         "--image_root does not apply to --streaming"),
    ],
)
def test_bad_arguments_are_refused_with_their_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_arguments(argv)
    err = capsys.readouterr().err
    assert message in err
    assert err.splitlines()[-1].startswith("run.py: error: ") and message in err.splitlines()[-1]


def test_a_batch_without_negatives_is_refused():
    """MVAM gathers the negatives of every process, UARDA takes them from its own batch."""
    from hf_mvam.arguments import check_run_setting

    def check(argv, processes):
        check_run_setting(*run.parse_arguments(argv), processes)

    check(["--per_device_train_batch_size", "1"], 2)  # two processes' pairs: one negative each
    with pytest.raises(ValueError, match="negatives from the other pairs of each process's batch, and there are none"):
        check(["--model_type", "uarda", "--per_device_train_batch_size", "1"], 2)
    check(["--model_type", "uarda", "--per_device_train_batch_size", "2"], 1)


@pytest.mark.parametrize(
    "argv, do_train, do_eval",
    [([], True, True), (["--do_train"], True, False), (["--do_train", "--do_eval", "false"], True, False),
     (["--do_train", "true", "--do_eval"], True, True)],
)
def test_do_train_and_do_eval_are_taken_as_given(argv, do_train, do_eval):
    """Neither flag: train and evaluate. Otherwise each as given (unset: false), so an explicit
    --do_train false never trains."""
    train_args = run.parse_arguments(argv)[2]
    assert (train_args.do_train, train_args.do_eval) == (do_train, do_eval)
    from hf_mvam.arguments import TrainingArguments

    only_eval = TrainingArguments(do_train=False, do_eval=True)  # what --do_train false --do_eval parses to
    assert (only_eval.do_train, only_eval.do_eval) == (False, True)


def test_arguments_from_json_and_yaml(tmp_path):
    options = {"model_type": "uarda", "threshold_mode": "scan", "max_steps": 7, "num_test_images": 20, "all_pairs": True}
    (tmp_path / "args.json").write_text(json.dumps(options))
    (tmp_path / "args.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    for path in ("args.json", "args.yaml"):
        model_args, data_args, train_args = run.parse_arguments([str(tmp_path / path)])
        assert (model_args.model_type, model_args.threshold_mode, train_args.max_steps) == ("uarda", "scan", 7)
        assert (data_args.num_test_images, data_args.all_pairs) == (20, True)


def test_bad_data_is_refused_before_training(tmp_path, imagefolder, scan_features):
    unreadable_test = tmp_path / "unreadable_test"  # every test image skipped: nothing to evaluate
    shutil.copytree(imagefolder / "train", unreadable_test / "train")
    (unreadable_test / "test").mkdir()
    (unreadable_test / "test" / "0.png").write_bytes(b"not a png")
    (unreadable_test / "test" / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "captions": ["a star"]}))
    flat = tmp_path / "flat"  # one folder, no split: nothing to report results on
    shutil.copytree(imagefolder / "train", flat)
    cases = [
        (["--data", unreadable_test], "the test split has no usable image"),
        (["--data", flat], r"a 'test' or 'validation' split; it has \['train'\]\. Give an image folder train/ and test/"),
        (["--data", tmp_path / "missing_folder"], "does not exist"),
        (["--data", imagefolder, "--caption_column", "alt"], "caption column 'alt'"),
        (["--data", scan_features], "precomputed image_features: a vision backbone would go unused"),
        (["--per_device_train_batch_size", "64"], "fewer than --per_device_train_batch_size 64"),
        (["--per_device_train_batch_size", "1"], r"negatives from the other pairs of the 1 process\(es\)' batches, "
                                                 "and there are none; use at least 2 pairs"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            train("--output_dir", tmp_path / "out", *TINY, *SYNTHETIC, *FAST, *argv)
        assert not (tmp_path / "out" / "checkpoints").exists()


# --- what an uploaded folder says about the machine it was trained on (issue 19) ------------------


def test_uploaded_files_carry_no_local_paths(mvam_imagefolder, imagefolder):
    """Every file the Hub would get, tensorboard's curves included, names the data by its folder's
    name; the absolute paths stay in .hf_mvam/local_paths.json, which is never uploaded."""
    folder, _, _ = mvam_imagefolder
    sent = hub.list_upload_files(folder)
    assert any(name.startswith("logs/") for name in sent) and not any(name.startswith(".hf_mvam/") for name in sent)
    for name in sent:
        content = (folder / name).read_bytes()
        for local in {str(imagefolder), str(imagefolder.resolve()), str(folder), str(folder.resolve()), str(REPO)}:
            assert local.encode() not in content, (name, local)
    recorded = json.loads((folder / "training_args.json").read_text())
    assert recorded["data"]["data"] == imagefolder.name and recorded["training"]["output_dir"] == folder.name
    assert recorded["local_data"] is True
    assert f"Trained and evaluated on {imagefolder.name}." in (folder / "README.md").read_text()
    from hf_mvam.output_folder import read_local_paths

    assert read_local_paths(folder)["data.data"] == str(imagefolder.resolve())


def test_fp16_on_a_cpu_falls_back_and_the_card_says_what_ran(mvam_imagefolder):
    folder, _, messages = mvam_imagefolder
    assert any("--mixed_precision fp16 needs a GPU: training in full precision" in m for m in messages)
    assert "| mixed_precision | no (fp16 asked for; a CPU has no fp16 autocast) |" in (folder / "README.md").read_text()


def test_tensorboard_records_the_curves_and_the_figures(mvam_imagefolder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _, _ = mvam_imagefolder
    (events,) = {path.parent for path in (folder / "logs").rglob("events.out.tfevents.*") if path.parent.name == "hf_mvam"}
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "eval/rsum" in accumulator.Tags()["scalars"] and "test/rsum" in accumulator.Tags()["scalars"]
    assert {"figures/view_attention", "figures/training_curves"} <= set(accumulator.Tags()["images"])
    assert (folder / "figures" / "training_curves.png").is_file()


def test_check_folder_takes_the_data_path_when_the_folder_has_none(mvam_imagefolder, imagefolder, tmp_path):
    """A folder copied without its .hf_mvam/ (as the Hub has it) records only the data's name:
    check_folder.py asks for --data, and with it reproduces the results."""
    folder, _, _ = mvam_imagefolder
    copy = tmp_path / "downloaded"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".hf_mvam", "checkpoints", "logs"))
    script = (
        "import sys, check_folder\n"
        "try:\n    check_folder.main([sys.argv[1]])\nexcept SystemExit as stop:\n    print('exit', stop.code)\n"
        "sys.exit(check_folder.main([sys.argv[1], '--data', sys.argv[2]]))"
    )
    result = subprocess.run([sys.executable, "-c", script, str(copy), str(imagefolder)], cwd=REPO / "training",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"records only the name of its local data ('{imagefolder.name}'): pass --data" in result.stderr
    assert "exit 2" in result.stdout and "OK: all" in result.stdout


def test_the_loaders_warnings_are_logged(tmp_path, scenes, caplog):
    """run.py logs each warning line of the loader's statistics: an unknown split, a duplicate
    image, a train image that is also a test image (the loader counts them; run.py wires them)."""
    root = tmp_path / "data"
    for split in ("train", "test", "extra"):
        (root / split).mkdir(parents=True)
        rows = []
        for i, example in enumerate(scenes["train" if split != "test" else "test"].select(range(3))):
            example["image"].save(root / split / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "captions": example["captions"]})
        (root / split / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    shutil.copy(root / "train" / "0.png", root / "train" / "copy.png")
    shutil.copy(root / "train" / "1.png", root / "test" / "leak.png")
    with open(root / "train" / "metadata.jsonl", "a") as file:
        file.write(json.dumps({"file_name": "copy.png", "captions": ["a copy"]}) + "\n")
    with open(root / "test" / "metadata.jsonl", "a") as file:
        file.write(json.dumps({"file_name": "leak.png", "captions": ["a leak"]}) + "\n")
    *_, data_args, _ = run.parse_arguments(["--data", str(root)])
    caplog.set_level("INFO")
    from accelerate import PartialState

    PartialState(cpu=True)  # run.py's logger is accelerate's
    try:
        run.report_data(run.load_splits(**data_args.source())[2])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    warnings = " | ".join(record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    assert "split(s) extra are not train, validation or test" in warnings
    assert "1 image(s) repeat an earlier image of their split" in warnings and "copy.png" in warnings
    assert "1 train image(s) are also in an evaluation split" in warnings and "leak.png" in warnings


def test_allow_paths_outside_data_root_reaches_the_loader(tmp_path, scenes):
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    entries = []
    for i, example in enumerate(scenes["train"].select(range(4))):
        example["image"].save((outside if i == 0 else root) / f"{i}.png")
        entries.append({"filename": f"{i}.png", "filepath": "../elsewhere" if i == 0 else "", "split": "train",
                        "sentences": [{"raw": c} for c in example["captions"]]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    found = {}
    for flags in ([], ["--allow_paths_outside_data_root"]):
        *_, data_args, _ = run.parse_arguments(["--data", str(tmp_path / "karpathy.json"), "--image_root", str(root), *flags])
        splits, _, stats = run.load_splits(**data_args.source())
        found[bool(flags)] = len(splits["train"]), [reason for _, _, reason in stats["skipped_images"]]
    assert found[False][0] == 3 and any("outside the data root" in reason for reason in found[False][1])
    assert found[True] == (4, [])


def test_an_options_file_with_flags_after_it(tmp_path, capsys):
    """A .yaml/.json file of options, then flags that override it (today's HfArgumentParser alone
    refuses the mix with "Some specified arguments are not used")."""
    (tmp_path / "run.yaml").write_text(
        "model_type: uarda\nmax_steps: 7\nsave_total_limit: null\nreport_to: [tensorboard]\n"
        f"vision_config: {json.dumps(TINY_VISION)}\nfreeze_text_model: true\n"
    )
    model_args, data_args, train_args = run.parse_arguments([str(tmp_path / "run.yaml"), "--max_steps", "3",
                                                             "--learning_rate", "1e-4"])
    assert (model_args.model_type, train_args.max_steps, train_args.learning_rate) == ("uarda", 3, 1e-4)
    assert train_args.save_total_limit is None and train_args.report_to == ["tensorboard"]
    assert json.loads(model_args.vision_config) == TINY_VISION and model_args.freeze_text_model is True
    (tmp_path / "bad.json").write_text(json.dumps({"max_step": 3}))
    with pytest.raises(SystemExit):
        run.parse_arguments([str(tmp_path / "bad.json")])
    assert "unknown option 'max_step'" in capsys.readouterr().err


def test_report_to_takes_a_comma_list():
    assert run.parse_arguments(["--report_to", "tensorboard, tensorboard"])[2].report_to == ["tensorboard"]
    assert run.parse_arguments(["--report_to", "none"])[2].report_to == []
    assert run.parse_arguments([])[2].report_to == ["tensorboard"]  # a dependency: curves by default


def test_card_is_named_after_the_hub_repository(pushed):
    from huggingface_hub import ModelCard

    folder, _, _ = pushed
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert data["model-index"][0]["name"] == "tiny-mvam" and folder.name != "tiny-mvam"


@pytest.mark.parametrize("model_type", ["mvam", "uarda"])
def test_the_same_command_twice_gives_the_same_model(model_type, tmp_path):
    """Issue 19: the same training command and seed, in two fresh processes with other hash seeds,
    gives byte-identical tokenizer.json and model.safetensors, and equal eval_results.json (the
    caption tokenizer is trained from scratch in each run)."""
    import os

    tiny = TINY if model_type == "mvam" else TINY_UARDA
    folders = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_MVAM_CACHE": str(tmp_path / "cache")}
        result = subprocess.run([sys.executable, "training/run.py", "--output_dir", str(out), "--model_type", model_type,
                                 *tiny, *SYNTHETIC, *FAST, "--seed", "3"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        folders.append(out)
    first, second = folders
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert json.loads((first / "eval_results.json").read_text()) == json.loads((second / "eval_results.json").read_text())


def test_streaming_passes_allow_paths_outside_data_root(monkeypatch, tmp_path):
    """--allow_paths_outside_data_root reaches the streamed loader too (it was accepted and ignored)."""
    seen = {}

    def fake_streaming_splits(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(run, "load_streaming_splits", fake_streaming_splits)
    for flags, allowed in (([], False), (["--allow_paths_outside_data_root"], True)):
        with pytest.raises(SystemExit):
            train("--streaming", "--data", "someone/data", "--max_steps", "2", "--output_dir", tmp_path / "out", *flags)
        assert seen["allow_paths_outside_data_root"] is allowed
