"""An offline tokenizer for from-scratch models: a lower-cased WordPiece vocabulary trained with
`tokenizers` on the training captions, wrapped as a `PreTrainedTokenizerFast` (BERT-style special
tokens), so it saves to ``tokenizer.json`` and reloads with ``AutoTokenizer``. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # [PAD] is id 0, as the default text config expects


def train_caption_tokenizer(
    captions: Iterable[str], vocab_size: int = 2048, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """Train a WordPiece tokenizer on ``captions`` (deterministic for the same captions).

    Args:
        captions: training captions (any iterable of strings).
        vocab_size: upper bound on the vocabulary (a small caption set yields fewer entries).
        model_max_length: captions are truncated to this many tokens, [CLS] and [SEP] included.
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tokenizer.train_from_iterator(captions, trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ValueError("cannot train a tokenizer: the captions contain no words")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
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
