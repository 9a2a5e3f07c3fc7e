"""Tests for hf_mvam.hub: model card rendering, folder extras and (network-free) Hub pushing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

from hf_mvam import hub

EVAL_RESULTS = {
    "i2t_R@1": 78.9,
    "i2t_R@5": 94.9,
    "i2t_R@10": 98.2,
    "t2i_R@1": 58.8,
    "t2i_R@5": 83.6,
    "t2i_R@10": 90.0,
    "rsum": 504.4,
    "pair_acc/colour": 99.5,
}
HYPERPARAMETERS = {"num_views": 4, "learning_rate": 3e-4, "batch_size": 128, "diversity_weight": 0.1}


def _card(model_type="mvam", **overrides):
    kwargs = dict(
        model_type=model_type,
        model_name=f"{model_type}-tiny-shapes",
        eval_results=EVAL_RESULTS,
        dataset_name="Synthetic shapes",
        dataset_id="someone/synthetic-shapes",
        hyperparameters=HYPERPARAMETERS,
        figures=["figures/view_attention.png", "figures/relevance_histograms.png"],
        repo_id="someone/tiny-model",
    )
    kwargs.update(overrides)
    return hub.build_model_card(**kwargs)


def test_default_template_is_at_repository_root():
    assert hub.DEFAULT_TEMPLATE_PATH == Path(__file__).resolve().parents[1] / "model_cards" / "template.md"
    assert hub.DEFAULT_TEMPLATE_PATH.is_file()


def test_installed_wheel_carries_the_template(tmp_path):
    """A non-editable install has no repository around it: the wheel ships the template."""
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    for name in ("src", "model_cards"):
        shutil.copytree(repo / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("hf_mvam-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import hf_mvam.hub as h; print(h.__file__); print(h.DEFAULT_TEMPLATE_PATH); print(h.DEFAULT_TEMPLATE_PATH.is_file())"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    module, template, exists = out.stdout.split()
    assert Path(module).is_relative_to(site)  # the wheel's copy, not the checkout
    assert Path(template) == site / "hf_mvam" / "model_cards" / "template.md" and exists == "True"
    assert Path(template).read_text() == (repo / "model_cards" / "template.md").read_text()


def test_mvam_card_metadata_has_model_index_with_seven_metrics():
    data = _card("mvam").data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "zero-shot-image-classification"
    assert {"image-text-matching", "mvam", "custom_code"} <= set(data["tags"])
    assert data["datasets"] == ["someone/synthetic-shapes"]

    (model_index,) = data["model-index"]
    assert model_index["name"] == "mvam-tiny-shapes"
    (result,) = model_index["results"]  # one task and one dataset: metrics grouped together
    assert result["task"]["type"] == "image-text-retrieval"
    assert result["dataset"] == {"name": "Synthetic shapes", "type": "someone/synthetic-shapes", "split": "test"}
    metrics = {m["type"]: (m["name"], m["value"]) for m in result["metrics"]}
    assert len(metrics) == 7  # the extra pair_acc/colour key stays out of model-index
    assert metrics["recall_at_1_image_to_text"] == ("Image→Text R@1", 78.9)
    assert metrics["recall_at_10_text_to_image"] == ("Text→Image R@10", 90.0)
    assert metrics["rsum"] == ("rSum", 504.4)


def test_mvam_card_body():
    text = str(_card("mvam"))
    assert text.startswith("---\n")
    assert "# mvam-tiny-shapes" in text
    assert "Multi-View Attention" in text and "2402.17237" in text
    assert 'AutoModel.from_pretrained("someone/tiny-model", trust_remote_code=True)' in text
    assert 'AutoProcessor.from_pretrained("someone/tiny-model", trust_remote_code=True)' in text
    assert 'pipeline("zero-shot-image-classification", model="someone/tiny-model", trust_remote_code=True)' in text
    # hyper-parameter table, one row per entry
    assert "| Hyper-parameter | Value |" in text
    for name, value in HYPERPARAMETERS.items():
        assert f"| {name} | {value} |" in text
    # evaluation tables: rows have no blank lines in between (a blank line would end the table)
    assert "| Direction | R@1 | R@5 | R@10 |\n|---|---|---|---|\n| Image → Text | 78.90 | 94.90 | 98.20 |\n" in text
    assert "| Text → Image | 58.80 | 83.60 | 90.00 |" in text
    assert "rSum: 504.40" in text
    assert "| pair_acc/colour | 99.50 |" in text
    # figures and dataset link
    assert "![view attention](figures/view_attention.png)" in text
    assert "![relevance histograms](figures/relevance_histograms.png)" in text
    assert "https://huggingface.co/datasets/someone/synthetic-shapes" in text
    assert "Adaptive Relevance" not in text and "TMM" not in text


def test_uarda_card_differs_where_it_should():
    card = _card("UARDA", dataset_id=None, figures=[])
    data, text = card.data.to_dict(), str(card)
    assert "uarda" in data["tags"] and "mvam" not in data["tags"]
    assert "pipeline_tag" not in data
    assert "datasets" not in data
    assert data["model-index"][0]["results"][0]["dataset"]["type"] == "synthetic-shapes"
    assert "10.1109/TMM.2022.3141603" in text and "1320" in text
    assert "trust_remote_code=True" in text
    assert "zero-shot-image-classification" not in text
    assert "## Figures" not in text


def test_card_without_results_has_no_model_index():
    card = _card("uarda", eval_results={}, hyperparameters={})
    data = card.data.to_dict()
    assert "model-index" not in data and "model_name" not in data
    assert "No evaluation results were recorded." in str(card)


def test_card_rejects_bad_inputs():
    with pytest.raises(ValueError, match="model_type"):
        _card("clip")
    with pytest.raises(ValueError, match="relative"):
        _card(figures=["/tmp/abs.png"])
    with pytest.raises(ValueError, match="relative"):
        _card(figures=["../outside.png"])
    with pytest.raises(ValueError, match="rsum"):
        _card(eval_results={"rsum": "n/a"})


def test_custom_template_path(tmp_path):
    template = tmp_path / "t.md"
    template.write_text("---\n{{ card_data }}\n---\n\nCustom {{ model_type }} card for {{ model_name }}\n")
    card = _card("mvam", template_path=template)
    assert "Custom mvam card for mvam-tiny-shapes" in str(card)
    assert len(card.data.to_dict()["model-index"][0]["results"][0]["metrics"]) == 7


def test_write_extras_and_load_round_trip(tmp_path):
    folder = tmp_path / "model"
    (folder / "figures").mkdir(parents=True)
    for name in ("view_attention.png", "relevance_histograms.png"):
        (folder / "figures" / name).write_bytes(b"\x89PNG")
    card = _card("mvam")
    readme, results_path = hub.write_model_folder_extras(folder, card, EVAL_RESULTS)

    assert readme == folder / "README.md" and results_path == folder / "eval_results.json"
    assert json.loads(results_path.read_text()) == EVAL_RESULTS
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "eval_results.json", "figures"]  # no temp left

    loaded = ModelCard.load(readme)
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.text.strip() == card.text.strip()
    assert loaded.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 78.9


def test_write_extras_warns_about_missing_figures(tmp_path):
    with pytest.warns(UserWarning, match="view_attention.png"):
        hub.write_model_folder_extras(tmp_path, _card("mvam"), EVAL_RESULTS)


def _model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    files = [
        "config.json",
        "model.safetensors",
        "configuration_mvam.py",
        "modeling_mvam.py",
        "processor_config.json",
        "tokenizer.json",
        "figures/view_attention.png",
        "figures/relevance_histograms.png",
        # never uploaded:
        "checkpoints/checkpoint_3/model.safetensors",
        "checkpoints/checkpoint_3/optimizer.bin",
        "__pycache__/modeling_mvam.cpython-311.pyc",
        ".README.md.abc123.tmp",
        ".git/HEAD",
    ]
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}" if name.endswith(".json") else "x")
    hub.write_model_folder_extras(folder, _card("mvam"), EVAL_RESULTS)
    return folder


EXPECTED_UPLOAD = sorted(
    [
        "README.md",
        "config.json",
        "configuration_mvam.py",
        "eval_results.json",
        "figures/relevance_histograms.png",
        "figures/view_attention.png",
        "model.safetensors",
        "modeling_mvam.py",
        "processor_config.json",
        "tokenizer.json",
    ]
)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace only the two network calls of HfApi; record what they would send."""
    calls = []

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        sent = {"repo_id": repo_id, "private": private, "repo_type": repo_type, "exist_ok": exist_ok}
        calls.append(("create_repo", sent))
        full_id = repo_id if "/" in repo_id else f"token-owner/{repo_id}"  # the Hub adds the namespace
        return RepoUrl(f"https://huggingface.co/{full_id}")

    def upload_folder(
        self, *, repo_id, folder_path, repo_type=None, commit_message=None, ignore_patterns=None, **kwargs
    ):
        # the same listing and filtering HfApi.upload_folder does before it hashes and sends files
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
        sent = list(filter_repo_objects(files, ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS))
        calls.append(
            (
                "upload_folder",
                {
                    "repo_id": repo_id,
                    "folder_path": str(folder),
                    "repo_type": repo_type,
                    "commit_message": commit_message,
                    "files": sent,
                    "token": self.token,
                },
            )
        )
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd",
            commit_message=commit_message,
            commit_description="",
            oid="0123abcd",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_folder_to_hub_sends_the_folder_without_checkpoints(tmp_path, fake_hub):
    folder = _model_folder(tmp_path)
    url = hub.push_folder_to_hub(folder, "someone/tiny-model", token="hf_fake", private=True, commit_message="first")

    assert url == "https://huggingface.co/someone/tiny-model/commit/0123abcd"
    assert [name for name, _ in fake_hub] == ["create_repo", "upload_folder"]
    assert fake_hub[0][1] == {"repo_id": "someone/tiny-model", "private": True, "repo_type": "model", "exist_ok": True}
    upload = fake_hub[1][1]
    assert upload["repo_id"] == "someone/tiny-model"
    assert upload["folder_path"] == str(folder)
    assert upload["repo_type"] == "model"
    assert upload["commit_message"] == "first"
    assert upload["token"] == "hf_fake"
    assert upload["files"] == EXPECTED_UPLOAD
    assert hub.list_upload_files(folder) == EXPECTED_UPLOAD
    # the card that goes up is ours, not an automatic one
    assert "trust_remote_code=True" in (folder / "README.md").read_text()


def test_push_accepts_bare_name(tmp_path, fake_hub):
    folder = _model_folder(tmp_path)
    url = hub.push_folder_to_hub(folder, "tiny-model")
    assert fake_hub[0][1]["repo_id"] == "tiny-model" and fake_hub[0][1]["private"] is False
    assert fake_hub[1][1]["repo_id"] == "token-owner/tiny-model"  # the id create_repo resolved
    assert url == "https://huggingface.co/token-owner/tiny-model/commit/0123abcd"


@pytest.mark.parametrize(
    "repo_id", ["", "a/b/c", "owner/", "/name", "has space", "owner/na--me", "owner/..name", "owner/name.git", "ü/x"]
)
def test_push_rejects_bad_repo_id(tmp_path, fake_hub, repo_id):
    folder = _model_folder(tmp_path)
    with pytest.raises(ValueError, match="repo_id"):
        hub.push_folder_to_hub(folder, repo_id)
    assert fake_hub == []


@pytest.mark.parametrize("missing", ["config.json", "README.md"])
def test_push_rejects_incomplete_folder(tmp_path, fake_hub, missing):
    folder = _model_folder(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=missing):
        hub.push_folder_to_hub(folder, "someone/tiny-model")
    with pytest.raises(ValueError, match="not a directory"):
        hub.push_folder_to_hub(tmp_path / "nope", "someone/tiny-model")
    assert fake_hub == []


def test_upload_list_matches_huggingface_hub_filtering(tmp_path, monkeypatch):
    """list_upload_files agrees with the file selection inside the real HfApi.upload_folder."""
    prepare = getattr(HfApi, "_prepare_upload_folder_additions", None)
    if prepare is None:
        pytest.skip("huggingface_hub internals changed")
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *args, **kwargs: None)  # a network call
    folder = _model_folder(tmp_path)
    operations = prepare(
        HfApi(), folder, "", ignore_patterns=hub.UPLOAD_IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS, repo_type="model"
    )
    assert sorted(op.path_in_repo for op in operations) == EXPECTED_UPLOAD == hub.list_upload_files(folder)


def test_card_names_the_split_the_results_come_from():
    """Data without a test split is evaluated on validation: the card and model-index say so."""
    assert "on the test split of Synthetic shapes" in str(_card())
    card = _card(dataset_split="validation")
    assert "on the validation split of Synthetic shapes" in str(card)
    splits = {result.dataset_split for result in card.data.eval_results}
    assert splits == {"validation"}


def test_zero_shot_snippet_passes_a_template_the_tokenizer_covers(tiny_tokenizer):
    """A tokenizer trained on the captions splits the pipeline's "This is a photo of {}." into
    pieces it never trained on; the card's snippet then passes the labels alone."""
    from hf_mvam.tokenization import train_caption_tokenizer

    assert tiny_tokenizer.tokenize("photo") != ["photo"]
    assert hub.zero_shot_template(tiny_tokenizer) == "{}"
    assert hub.zero_shot_template(train_caption_tokenizer(["this is a photo of a red circle"] * 5)) is None
    assert 'candidate_labels=["a red circle", "a blue square", "a green star"], hypothesis_template="{}")' in str(
        _card("mvam", hypothesis_template="{}"))
    assert "hypothesis_template" not in str(_card("mvam"))


def test_card_states_base_model_and_license():
    data = _card("mvam", base_model=["openai/clip-vit-base-patch32", "bert-base-uncased"], license="mit").data.to_dict()
    assert data["base_model"] == ["openai/clip-vit-base-patch32", "bert-base-uncased"] and data["license"] == "mit"
    assert "base_model" not in _card("mvam").data.to_dict()


def test_run_card_inputs_name_hub_backbones_and_the_repo(mvam_processor, tmp_path):
    from hf_mvam.model_folder import card_inputs
    from training_runs import run

    local = tmp_path / "my-bert"
    local.mkdir()
    args = run.parse_arguments(["--vision_model_name_or_path", "openai/clip-vit-base-patch32", "--text_model_name_or_path",
                                str(local), "--hub_model_id", "someone/shapes-mvam", "--data", "someone/shapes",
                                "--output_dir", str(tmp_path / "out")])
    card = card_inputs(args, mvam_processor, "test", "bf16", num_processes=2)
    assert card["base_model"] == ["openai/clip-vit-base-patch32"]  # a local folder is no Hub id
    assert card["model_name"] == "shapes-mvam" and card["repo_id"] == "someone/shapes-mvam"
    assert card["dataset_id"] == "someone/shapes" and card["hyperparameters"]["text_model_name_or_path"] == "my-bert"
    assert card["hyperparameters"]["mixed_precision"] == "bf16" and card["hypothesis_template"] == "{}"
