"""Tests of the caption tokenizer trained for from-scratch models (hf_mvam.tokenization)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoTokenizer

from hf_mvam.tokenization import SPECIAL_TOKENS, train_caption_tokenizer

CAPTIONS = [
    "A small red circle left of a big blue square.",
    "The image shows two shapes: a tiny green star and a large cyan cross",
    "a picture of a little pink hexagon beside a purple diamond; the star is above the cross",
    "Two cats and a café",
]


def test_same_captions_give_the_same_tokenizer_json_in_fresh_processes(tmp_path):
    """Each process has its own hash seeds (also inside the Rust trainer, which PYTHONHASHSEED does
    not reach): the saved tokenizer must not depend on them."""
    code = textwrap.dedent(
        f"""
        import sys
        from hf_mvam.tokenization import train_caption_tokenizer
        captions = {CAPTIONS!r} * 3
        train_caption_tokenizer(captions, vocab_size=300).save_pretrained(sys.argv[1])
        """
    )
    saved = []
    for run, hash_seed in enumerate(("1", "2", "random")):
        folder = tmp_path / f"run{run}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code, str(folder)], env=env, check=True, timeout=120)
        saved.append((folder / "tokenizer.json").read_bytes())
    assert saved[0] == saved[1] == saved[2]


def test_vocabulary_is_counted_words_in_a_fixed_order(tmp_path):
    tokenizer = train_caption_tokenizer(CAPTIONS, vocab_size=1000, model_max_length=16)
    vocab = tokenizer.get_vocab()
    assert [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])][:4] == SPECIAL_TOKENS
    assert vocab["[PAD]"] == 0
    assert tokenizer.tokenize("A small red circle") == ["a", "small", "red", "circle"]
    assert tokenizer.tokenize("cafe") == ["cafe"]  # accents stripped, as at training time
    assert tokenizer.tokenize("cats") == ["cats"] and tokenizer.tokenize("circles") == ["circle", "##s"]
    assert tokenizer.tokenize("bigger") == ["big", "##g", "##e", "##r"]  # seen letters: never [UNK]
    assert tokenizer.tokenize("€") == ["[UNK]"]

    # A budget keeps the most frequent words after the characters: "the" 3 times, then "and",
    # "cross" and "star" twice each (ties alphabetical); "a" is already there as a character.
    characters = sorted({c for caption in CAPTIONS for c in caption.lower().replace("é", "e") if not c.isspace()})
    small = train_caption_tokenizer(CAPTIONS, vocab_size=len(SPECIAL_TOKENS) + 2 * len(characters) + 3)
    words = [token for token, _ in sorted(small.get_vocab().items(), key=lambda item: item[1])][-3:]
    assert words == ["the", "and", "cross"]

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    assert again("A big star")["input_ids"] == tokenizer("A big star")["input_ids"]
    assert again.decode(again("A big star")["input_ids"], skip_special_tokens=True) == "a big star"


def test_errors():
    with pytest.raises(ValueError, match="contain no words"):
        train_caption_tokenizer(["   ", ""])
    with pytest.raises(ValueError, match=r"vocab_size 10 cannot hold .* special tokens and"):
        train_caption_tokenizer(CAPTIONS, vocab_size=10)
