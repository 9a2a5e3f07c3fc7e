"""Shared fixtures: tiny backbones and processors so each test builds a model in milliseconds."""

from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

TINY_VISION = {
    "model_type": "clip_vision_model",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
TINY_TEXT = {
    "model_type": "bert",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 32,
    "pad_token_id": 0,
}
CAPTIONS = [
    "a red circle left of a blue square",
    "a small green star above a large yellow triangle",
    "two objects: a purple cross and an orange diamond",
    "a blue square next to a red circle",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from hf_mvam.tokenization import train_caption_tokenizer

    return train_caption_tokenizer(CAPTIONS * 3, model_max_length=32)


def tiny_text_config(tokenizer) -> dict:
    return {**TINY_TEXT, "vocab_size": len(tokenizer)}


@pytest.fixture(scope="session")
def mvam_processor(tiny_tokenizer):
    from hf_mvam import MVAMProcessor
    from hf_mvam.builders import default_image_processor

    return MVAMProcessor(image_processor=default_image_processor(32), tokenizer=tiny_tokenizer)


def run_fresh_python(code: str, cwd: str, block_hf_mvam: bool = True, timeout: int = 300) -> str:
    """Run ``code`` in a new interpreter, offline, where ``import hf_mvam`` fails (when asked), so
    whatever loads must come from the saved folder. Returns stdout; raises with stderr on failure."""
    prelude = "import sys\nsys.modules['hf_mvam'] = None  # hf_mvam must not be importable here\n" if block_hf_mvam else ""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{result.stderr[-4000:]}")
    return result.stdout


# Tensor methods that read a value back to the host: on a GPU each one is a device sync.
VALUE_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero")


@contextlib.contextmanager
def no_value_reads():
    """Make every Tensor method of ``VALUE_READS`` raise when hf_mvam's own code calls it (the
    libraries it calls into, e.g. transformers' attention-mask shortcuts, are not ours to change)."""
    import hf_mvam

    ours = os.path.dirname(os.path.abspath(hf_mvam.__file__))
    originals = {name: getattr(torch.Tensor, name) for name in VALUE_READS}

    def guarded(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            caller = inspect.currentframe().f_back
            if os.path.abspath(caller.f_code.co_filename).startswith(ours):
                raise AssertionError(f"Tensor.{name} read a value at {caller.f_code.co_filename}:{caller.f_lineno}")
            return original(self, *args, **kwargs)

        return read

    for name in VALUE_READS:
        setattr(torch.Tensor, name, guarded(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
