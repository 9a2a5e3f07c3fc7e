"""Karpathy split JSON files (``dataset_flickr30k.json``, ``dataset_coco.json``): the entries of a
top-level ``images`` list, with the image files under ``image_root``."""

from __future__ import annotations

import json
import os
from typing import Any

import datasets

from .common import CAPTIONS_FEATURE, check_utf8, ordered_splits, split_name


def load_karpathy(
    json_path: str, image_root: str | None, skipped_images: list[tuple[str, str, str]]
) -> datasets.DatasetDict:
    """Read ``images[].{filepath, filename, split, sentences[].raw}`` into common-format splits.

    Entries that are not objects or lack a string filename are skipped into ``skipped_images``;
    a sentence may also be a plain string, or give only its ``tokens``. Image paths are
    ``image_root/filepath/filename`` as written; the cleaning step confines them to ``image_root``.
    """
    if image_root is None:
        raise ValueError(
            f"{json_path} is read as a Karpathy split JSON, whose images live elsewhere: pass "
            "image_root= (the folder holding the image files, or their filepath subfolders)"
        )
    check_utf8(json_path)
    with open(json_path, encoding="utf-8") as file:
        try:
            content = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{json_path} is not valid JSON: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(
            f"{json_path} is not a Karpathy split JSON: it needs a top-level 'images' list"
        )

    columns: dict[str, dict[str, list]] = {}
    for index, entry in enumerate(content["images"]):
        if not isinstance(entry, dict):
            # Its split is unknown: reported under the default one.
            reason = f"the JSON entry is a {type(entry).__name__}, not an object"
            skipped_images.append(("train", f"images[{index}]", reason))
            continue
        split = split_name(str(entry.get("split", "train")))
        filename, filepath = entry.get("filename"), entry.get("filepath") or ""
        reason = ""
        if not filename:
            reason = "no filename in the JSON entry"
        elif not isinstance(filename, str):
            reason = f"filename {filename!r} in the JSON entry is not a string"
        elif not isinstance(filepath, str):
            reason = f"filepath {filepath!r} in the JSON entry is not a string"
        if reason:
            skipped_images.append((split, f"images[{index}]", reason))
            continue
        path = os.path.join(image_root, filepath, filename)
        sentences = entry.get("sentences") or []
        if not isinstance(sentences, list):  # a single sentence
            sentences = [sentences]
        captions = [_karpathy_caption(sentence) for sentence in sentences]
        split_columns = columns.setdefault(split, {"image": [], "captions": []})
        split_columns["image"].append(path)
        split_columns["captions"].append(captions)

    features = datasets.Features(
        {"image": datasets.Image(decode=False), "captions": CAPTIONS_FEATURE}
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(columns[split], features=features)
            for split in ordered_splits(columns)
        }
    )


def _karpathy_caption(sentence: Any) -> str:
    """A sentence's text: the sentence itself if it is a string, else its ``raw`` string, else
    its ``tokens`` joined. Anything else is ``""``: dropped (and counted) with the empty captions.
    """
    if isinstance(sentence, str):
        return sentence
    if not isinstance(sentence, dict):
        return ""
    raw, tokens = sentence.get("raw"), sentence.get("tokens")
    if isinstance(raw, str) and raw.strip():
        return raw
    if isinstance(tokens, list) and all(isinstance(token, str) for token in tokens):
        return " ".join(tokens)
    return ""
