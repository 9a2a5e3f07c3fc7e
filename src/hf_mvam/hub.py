"""Model cards and Hub uploads for MVAM and UARDA checkpoints.

Three steps turn a folder written by ``model.save_pretrained`` / ``processor.save_pretrained``
into a Hub repository with a useful card:

1. :func:`build_model_card` renders ``model_cards/template.md`` (a Jinja template for
   :meth:`huggingface_hub.ModelCard.from_template`) with the method description, usage snippets,
   training hyper-parameters, the Recall@K table and links to figures, and fills the card's YAML
   metadata (``library_name``, tags, ``pipeline_tag`` and a ``model-index`` with the retrieval
   results).
2. :func:`write_model_folder_extras` writes ``README.md`` and ``eval_results.json`` into the
   folder, atomically.
3. :func:`push_folder_to_hub` creates the repository if needed and uploads the folder as it is.

Why not ``model.push_to_hub``: transformers 5.x saves the model into a temporary folder and
replaces ``README.md`` with an automatic card before committing, which would drop this card.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

__all__ = [
    "DEFAULT_TEMPLATE_PATH",
    "RETRIEVAL_METRICS",
    "UPLOAD_IGNORE_PATTERNS",
    "build_model_card",
    "describe_model",
    "zero_shot_template",
    "list_upload_files",
    "push_folder_to_hub",
    "write_model_folder_extras",
]

#: The card template: ``model_cards/template.md`` of the repository checkout, or the copy an
#: installed wheel carries as ``hf_mvam/model_cards/template.md`` (see pyproject.toml).
_CHECKOUT_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "template.md"
DEFAULT_TEMPLATE_PATH = (
    _CHECKOUT_TEMPLATE if _CHECKOUT_TEMPLATE.is_file() else Path(__file__).resolve().parent / "model_cards" / "template.md"
)

#: eval_results key -> (model-index metric type, human-readable metric name). Values are percent.
RETRIEVAL_METRICS: dict[str, tuple[str, str]] = {
    "i2t_R@1": ("recall_at_1_image_to_text", "Image→Text R@1"),
    "i2t_R@5": ("recall_at_5_image_to_text", "Image→Text R@5"),
    "i2t_R@10": ("recall_at_10_image_to_text", "Image→Text R@10"),
    "t2i_R@1": ("recall_at_1_text_to_image", "Text→Image R@1"),
    "t2i_R@5": ("recall_at_5_text_to_image", "Text→Image R@5"),
    "t2i_R@10": ("recall_at_10_text_to_image", "Text→Image R@10"),
    "rsum": ("rsum", "rSum"),
}

#: Files of a model folder that are never uploaded (training state, temporary and cache files).
UPLOAD_IGNORE_PATTERNS: list[str] = [
    "checkpoints/*",
    "checkpoint-*/*",
    "checkpoint_*/*",
    "*.tmp",
    "*.pyc",
    "*__pycache__*",
    ".ipynb_checkpoints/*",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    ".hf_mvam/*",  # training/run.py's lock and local paths (hf_mvam.output_folder)
]

#: The zero-shot-image-classification pipeline's default ``hypothesis_template``.
PIPELINE_HYPOTHESIS_TEMPLATE = "This is a photo of {}."

_MODEL_TYPES = {
    "mvam": {"tags": ["mvam"], "pipeline_tag": "zero-shot-image-classification"},
    "uarda": {"tags": ["uarda"], "pipeline_tag": None},
}
_TASK_TYPE = "image-text-retrieval"
_TASK_NAME = "Image-Text Retrieval"
# A Hub repo id: "name" or "owner/name"; letters, digits, "-", "_", "."; no "--" or "..".
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def build_model_card(
    *,
    model_type: str,
    model_name: str,
    eval_results: Mapping[str, float],
    dataset_name: str,
    dataset_id: str | None = None,
    dataset_split: str = "test",
    hyperparameters: Mapping[str, Any],
    figures: Iterable[str] = (),
    repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
    license: str | None = None,
    base_model: list[str] | None = None,
    hypothesis_template: str | None = None,
) -> ModelCard:
    """Render the model card of an MVAM or UARDA checkpoint.

    Args:
        model_type: ``"mvam"`` or ``"uarda"`` (case-insensitive); picks the method paragraph,
            the tags, the citation and, for MVAM, the zero-shot pipeline snippet and
            ``pipeline_tag``.
        model_name: title of the card and ``model-index`` name.
        eval_results: metric name -> value in percent. The keys ``i2t_R@1``, ``i2t_R@5``,
            ``i2t_R@10``, ``t2i_R@1``, ``t2i_R@5``, ``t2i_R@10`` and ``rsum`` fill the Recall@K
            table and the YAML ``model-index``; any other key (e.g. ``t2i_pair_acc/colour``) is listed
            in a second table of the card only.
        dataset_name: readable name of the training/evaluation data set.
        dataset_id: Hub id of that data set, if it has one (added to ``datasets`` and used as the
            ``model-index`` dataset type).
        dataset_split: the split ``eval_results`` were measured on (``"validation"`` when the
            data has no test split).
        hyperparameters: name -> value, shown as a table in the given order.
        figures: PNG paths relative to the model folder (e.g. ``"figures/view_attention.png"``),
            embedded as images; the alt text comes from the file name.
        repo_id: id shown in the code snippets; defaults to ``model_name``.
        template_path: Jinja template to render; defaults to :data:`DEFAULT_TEMPLATE_PATH`.
        license: optional license id for the YAML metadata (e.g. ``"apache-2.0"``).
        base_model: Hub ids of the models this one was trained from (pretrained backbones, or the
            hf-mvam model it was fine-tuned from), for the YAML ``base_model``.
        hypothesis_template: the ``hypothesis_template`` the zero-shot snippet passes (MVAM; see
            :func:`zero_shot_template`); ``None`` leaves the pipeline's default.

    Returns:
        The :class:`huggingface_hub.ModelCard`; ``str(card)`` is the README text.

    Raises:
        ValueError: unknown ``model_type``, a figure path that is absolute or leaves the folder,
            or a non-numeric retrieval metric.
        FileNotFoundError: the template does not exist.
    """
    kind = model_type.lower()
    if kind not in _MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(_MODEL_TYPES)}, got {model_type!r}")
    figure_entries = [_figure_entry(f) for f in figures]
    template_path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model card template not found at {template_path} (the default is model_cards/template.md of "
            "the hf-mvam repository, installed as hf_mvam/model_cards/template.md); pass template_path=... to use another one"
        )

    dataset_type = dataset_id or _slug(dataset_name)
    model_index = [
        EvalResult(
            task_type=_TASK_TYPE,
            task_name=_TASK_NAME,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=dataset_split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=_as_number(eval_results[key], key),
        )
        for key, (metric_type, metric_name) in RETRIEVAL_METRICS.items()
        if key in eval_results
    ]
    card_data = ModelCardData(
        # model_name only names the model-index; without results it would be a stray YAML key.
        model_name=model_name if model_index else None,
        library_name="transformers",
        license=license,
        base_model=list(base_model) if base_model else None,
        tags=["image-text-matching", *_MODEL_TYPES[kind]["tags"], "custom_code"],
        pipeline_tag=_MODEL_TYPES[kind]["pipeline_tag"],
        datasets=[dataset_id] if dataset_id else None,
        eval_results=model_index or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_type=kind,
        model_name=model_name,
        repo_id=repo_id or model_name,
        dataset_name=dataset_name,
        dataset_id=dataset_id,
        dataset_split=dataset_split,
        hyperparameters=dict(hyperparameters),
        figures=figure_entries,
        hypothesis_template=hypothesis_template,
        **_eval_table(eval_results),
    )


def zero_shot_template(tokenizer) -> str | None:
    """The ``hypothesis_template`` a model card's zero-shot snippet should pass: ``None`` when the
    tokenizer keeps every word of the pipeline's default template ("This is a photo of {}.")
    whole, else ``"{}"`` (the labels alone), since a tokenizer trained on the training captions may
    split "photo" into ``p ##h ##o ##t ##o`` or know no such word."""
    words = PIPELINE_HYPOTHESIS_TEMPLATE.replace("{}", " ").replace(".", " ").split()
    for word in words:
        tokens = tokenizer.tokenize(word)
        if len(tokens) != 1 or tokens[0] == tokenizer.unk_token:
            return "{}"
    return None


# Bookkeeping entries of a config's diff that say nothing about the model.
_CONFIG_BOOKKEEPING = {"architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "model_type"}


def describe_model(model) -> dict[str, Any]:
    """The model's settings for the card's hyperparameter table: every scalar of
    ``model.config.to_diff_dict()`` (what differs from the defaults), the backbones by model
    type, the parameter count and, for a model with a learned relevance threshold, its value."""
    diff = model.config.to_diff_dict()
    described: dict[str, Any] = {"model_type": model.config.model_type}
    for key, value in diff.items():
        if key in _CONFIG_BOOKKEEPING or isinstance(value, dict) or value is None:
            continue
        described[key] = value
    for tower in ("vision_config", "text_config"):
        sub_config = getattr(model.config, tower, None)
        if sub_config is not None:
            described[tower.replace("_config", "_backbone")] = sub_config.model_type
    described["parameters"] = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"
    threshold = getattr(model, "relevance_threshold", None)
    if threshold is not None:
        described["learned_threshold"] = round(float(threshold.threshold), 4)
    return described


def write_model_folder_extras(
    folder: str | os.PathLike, card: ModelCard | str, eval_results: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``README.md`` (the card) and ``eval_results.json`` into a model folder.

    Each file is written to a temporary file in the same folder and moved into place with
    :func:`os.replace`, so a reader never sees a half-written file. Figures that the card links
    to but that are missing from the folder produce a warning.

    Returns:
        The paths of ``README.md`` and ``eval_results.json``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = str(card)
    if not text.endswith("\n"):
        text += "\n"
    readme = _atomic_write(folder / "README.md", text)
    results = {key: _jsonable(value) for key, value in eval_results.items()}
    results_path = _atomic_write(
        folder / "eval_results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    )
    missing = [
        link
        for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
        if "://" not in link and not (folder / link).is_file()
    ]
    if missing:
        warnings.warn(f"the model card links to figures missing from {folder}: {missing}", stacklevel=2)
    return readme, results_path


def list_upload_files(folder: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the files :func:`push_folder_to_hub` would upload, sorted.

    Applies :data:`UPLOAD_IGNORE_PATTERNS` plus huggingface_hub's own default ignore patterns
    (``.git``, ``.cache/huggingface``), the same filtering ``HfApi.upload_folder`` does.
    """
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return list(
        filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE_PATTERNS + list(DEFAULT_IGNORE_PATTERNS))
    )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload model, processor and model card with hf-mvam",
) -> str:
    """Create ``repo_id`` on the Hub if needed and upload a saved model folder unchanged.

    The folder must contain ``config.json`` and ``README.md`` (see
    :func:`write_model_folder_extras`). Training checkpoints, temporary and cache files
    (:data:`UPLOAD_IGNORE_PATTERNS`) are left out; :func:`list_upload_files` shows what is sent.

    Args:
        folder: the folder written by ``save_pretrained`` (model and processor) plus the card.
        repo_id: ``"name"`` (in the token owner's namespace) or ``"owner/name"``.
        token: Hub token; ``None`` uses the locally saved one.
        private: create the repository as private (ignored if it already exists).
        commit_message: message of the upload commit.

    Returns:
        The URL of the commit, or of the repository if the upload returned no commit URL.

    Raises:
        ValueError: a malformed ``repo_id``, or a folder without ``config.json``/``README.md``.
    """
    _check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} does not exist or is not a directory")
    missing = [name for name in ("config.json", "README.md") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"folder {str(folder)!r} is missing {missing}; save the model and write the card first")

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=getattr(repo_url, "repo_id", None) or repo_id,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
    )
    return getattr(commit, "commit_url", None) or str(repo_url)


# --------------------------------------------------------------------------- helpers


def _eval_table(eval_results: Mapping[str, Any]) -> dict[str, Any]:
    """Template variables for the evaluation section: retrieval rows, rSum and extra metrics."""
    rows = []
    for direction, prefix in (("Image → Text", "i2t"), ("Text → Image", "t2i")):
        cells = {f"r{k}": eval_results.get(f"{prefix}_R@{k}") for k in (1, 5, 10)}
        if any(v is not None for v in cells.values()):
            rows.append({"direction": direction, **{c: _fmt(v) for c, v in cells.items()}})
    extras = [
        {"name": key, "value": _fmt(value)} for key, value in eval_results.items() if key not in RETRIEVAL_METRICS
    ]
    rsum = eval_results.get("rsum")
    return {
        "retrieval_rows": rows,
        "rsum": None if rsum is None else _fmt(rsum),
        "extra_metrics": extras,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _as_number(value: Any, key: str) -> float:
    if hasattr(value, "item"):
        value = value.item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"eval_results[{key!r}] must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"eval_results[{key!r}] must be finite, got {number}")
    return round(number, 4)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def _figure_entry(path: str | os.PathLike) -> dict[str, str]:
    posix = Path(path).as_posix()
    if Path(path).is_absolute() or ".." in Path(posix).parts:
        raise ValueError(f"figure paths must be relative to the model folder, got {str(path)!r}")
    alt = Path(posix).stem.replace("_", " ").replace("-", " ")
    return {"path": posix, "alt": alt}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "dataset"


def _check_repo_id(repo_id: str) -> None:
    if (
        not isinstance(repo_id, str)
        or not _REPO_ID_RE.match(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.endswith(".git")
    ):
        raise ValueError(f"repo_id must look like 'name' or 'owner/name', got {repo_id!r}")


def _atomic_write(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
