"""An offline tokenizer for from-scratch models: a lower-cased WordPiece vocabulary counted from the
training captions, wrapped as a `PreTrainedTokenizerFast` (BERT-style special tokens), so it saves to
``tokenizer.json`` and reloads with ``AutoTokenizer``. Nothing is downloaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # [PAD] is id 0, as the default text config expects


def train_caption_tokenizer(
    captions: Iterable[str], vocab_size: int = 2048, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer whose vocabulary is counted from ``captions``.

    The vocabulary is, in this order: the special tokens, every character of the captions (sorted),
    the same characters as ``##`` continuations, then whole words by decreasing count (ties in
    alphabetical order) until ``vocab_size``. So the same captions give the same ``tokenizer.json``
    in every process: ``tokenizers``' WordPiece trainer breaks ties between equally frequent merges
    by the order of Rust hash maps, which differs from process to process. A word outside the
    vocabulary splits, WordPiece's greedy way, into its longest known prefix and then pieces down to
    single characters, so only characters never seen in training become ``[UNK]``.

    Args:
        captions: training captions (any iterable of strings).
        vocab_size: upper bound on the vocabulary; it must hold the special tokens and both forms
            of every character.
        model_max_length: captions are truncated to this many tokens, [CLS] and [SEP] included.

    Raises:
        ValueError: the captions contain no words, or ``vocab_size`` is too small for their
            characters.
    """
    normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for caption in captions for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))
    )
    if not counts:
        raise ValueError("cannot train a tokenizer: the captions contain no words")
    characters = sorted({character for word in counts for character in word})
    pieces = SPECIAL_TOKENS + characters + [f"##{character}" for character in characters]
    if vocab_size < len(pieces):
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold the {len(SPECIAL_TOKENS)} special tokens and the "
            f"{len(characters)} characters of the captions (each also as a ##continuation): "
            f"use at least {len(pieces)}"
        )
    by_count = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    words = [word for word, _ in by_count if word not in characters][: vocab_size - len(pieces)]
    vocab = {token: index for index, token in enumerate(pieces + words)}

    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=model_max_length,
    )
