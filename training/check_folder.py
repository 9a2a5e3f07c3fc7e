"""Check a model folder written by ``training/run.py``, the way a user of the Hub repository would
load it: in a fresh process, through ``AutoModel`` / ``AutoProcessor`` with ``trust_remote_code``.

    python training/check_folder.py outputs/demo
    python training/check_folder.py downloaded_model --data path/to/dataset.json --image_root path/to/images

It prints an image × caption similarity table for a few test examples, evaluates the test split
again and checks that every metric equals ``eval_results.json`` within 1e-4. Exit status 1 on a
mismatch. The data settings come from the folder's ``training_args.json``; where the data was a
local file or folder, that records only its name (the file is uploaded), and the path comes from
the run's ``.hf_mvam/local_paths.json`` (never uploaded) or from ``--data`` / ``--image_root``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from hf_mvam.data.splits import TRAINING_ARGS_NAME, load_recorded_eval_split
from hf_mvam.evaluation import evaluate_split

TOLERANCE = 1e-4
NUM_EXAMPLES = 4


def similarity_table(model, processor, split) -> str:
    """Scores of the first ``NUM_EXAMPLES`` images against their first captions (the diagonal
    should win each row)."""
    examples = split.select(range(min(NUM_EXAMPLES, len(split))))
    captions = [captions[0] for captions in examples["captions"]]
    if "image_features" in examples.column_names:
        inputs = processor(text=captions, return_tensors="pt")
        inputs["image_features"] = torch.as_tensor(examples.with_format("numpy")["image_features"])
    else:
        inputs = processor(text=captions, images=list(examples["image"]), return_tensors="pt")
    with torch.no_grad():
        scores = model(**inputs).logits_per_image  # [n_images, n_captions]
    lines = [f"{'':8}" + "".join(f"{f'caption {j}':>12}" for j in range(len(captions)))]
    for i, row in enumerate(scores.tolist()):
        cells = "".join(f"{f'[{value:.3f}]' if i == j else f'{value:.3f}':>12}" for j, value in enumerate(row))
        lines.append(f"image {i:<2}{cells}")
    lines += [f"caption {j}: {caption}" for j, caption in enumerate(captions)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a folder written by training/run.py")
    parser.add_argument("--data", help="the data to evaluate on, where the folder has no local path of its data")
    parser.add_argument("--image_root", help="the images of that data (a Karpathy JSON's, or relative paths')")
    options = parser.parse_args(argv)
    folder = Path(options.output_dir)
    for name in ("config.json", "eval_results.json", TRAINING_ARGS_NAME):
        if not (folder / name).is_file():
            parser.error(f"{folder} has no {name}: is it an output folder of training/run.py?")

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    expected = json.loads((folder / "eval_results.json").read_text())
    try:
        split, _, recorded = load_recorded_eval_split(folder, options.data, options.image_root)
    except ValueError as error:
        parser.error(str(error))
    dataset_name = recorded["data"]["data"] or "hf-mvam synthetic benchmark"
    print(f"{type(model).__name__} ({type(model).__module__}) and {type(processor).__name__} loaded from {folder}")
    print(similarity_table(model, processor, split))

    results = evaluate_split(model, processor, split, batch_size=recorded["training"]["per_device_eval_batch_size"])
    print(f"\nre-evaluated on {dataset_name} ({recorded['eval_split']} split, {len(split)} images):")
    mismatches = []
    for key, value in expected.items():
        again = results.get(key)
        ok = again is not None and abs(again - value) <= TOLERANCE
        mismatches += [] if ok else [key]
        print(f"  {key:<20} saved {value:9.4f}   now {again if again is None else f'{again:9.4f}'}   {'ok' if ok else 'MISMATCH'}")
    if mismatches:
        print(f"FAILED: {len(mismatches)} metric(s) differ from eval_results.json: {mismatches}")
        return 1
    print(f"OK: all {len(expected)} metrics reproduce eval_results.json within {TOLERANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
