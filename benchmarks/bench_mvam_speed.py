"""MVAM speed: K views against the same backbone with K = 1 (the CLIP-style baseline).

Measures, side by side in one process with the contenders interleaved round by round (this
machine is noisy: only the ratios are comparable across runs):
- image encode throughput (images/s, inference, no grad),
- caption encode throughput (captions/s),
- training step time (forward + backward + AdamW step on a paired batch).

Usage: python benchmarks/bench_mvam_speed.py [--views 4] [--rounds 11] [--tiny] [--out-dir DIR]
Writes benchmarks/results/mvam_speed.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hf_mvam import MVAMConfig, MVAMModel
from hf_mvam.backbones import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG

RESULTS = Path(__file__).resolve().parent / "results"
TINY_VISION = {**DEFAULT_VISION_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
TINY_TEXT = {**DEFAULT_TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def build_pair(num_views: int, vision: dict, text: dict) -> tuple[MVAMModel, MVAMModel]:
    """The baseline (K=1, no diversity) and MVAM (K views) sharing identical backbone weights."""
    torch.manual_seed(0)
    baseline = MVAMModel(MVAMConfig(vision_config=vision, text_config=text, num_views=1, diversity_weight=0.0))
    mvam = MVAMModel(MVAMConfig(vision_config=vision, text_config=text, num_views=num_views))
    mvam.vision_model.load_state_dict(baseline.vision_model.state_dict())
    mvam.text_model.load_state_dict(baseline.text_model.state_dict())
    return baseline, mvam


def interleaved_medians(calls: dict, rounds: int) -> dict:
    """Median seconds per contender, timing one call of each contender in turn, ``rounds`` times,
    so that changes in machine load hit all contenders alike."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--encode_batch", type=int, default=256)
    parser.add_argument("--train_batch", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="tiny towers and batches: a smoke run of seconds")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    vision, text = (TINY_VISION, TINY_TEXT) if args.tiny else (DEFAULT_VISION_CONFIG, DEFAULT_TEXT_CONFIG)
    encode_batch, train_batch = (8, 8) if args.tiny else (args.encode_batch, args.train_batch)
    rounds = 2 if args.tiny else args.rounds

    baseline, mvam = build_pair(args.views, vision, text)
    size = vision["image_size"]
    pixels = torch.randn(encode_batch, 3, size, size)
    ids = torch.randint(4, text["vocab_size"], (encode_batch, 16))
    mask = torch.ones_like(ids)
    mask[::2, 10:] = 0  # half the captions padded
    contenders = {"K=1 (CLIP-style)": baseline, f"MVAM K={args.views}": mvam}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in contenders.items()}

    def train_step(name):
        model = contenders[name].train()
        optimizers[name].zero_grad()
        out = model(
            input_ids=ids[:train_batch], attention_mask=mask[:train_batch], pixel_values=pixels[:train_batch], return_loss=True
        )
        out.loss.backward()
        optimizers[name].step()

    for name in contenders:  # warm-up: first calls pay one-off allocation and kernel selection
        train_step(name)
    with torch.no_grad():
        image_s = interleaved_medians({n: (lambda m=m: m.eval().encode_images(pixels)) for n, m in contenders.items()}, rounds)
        text_s = interleaved_medians({n: (lambda m=m: m.eval().encode_texts(ids, mask)) for n, m in contenders.items()}, rounds)
    step_s = interleaved_medians({n: (lambda n=n: train_step(n)) for n in contenders}, rounds)
    rows = {
        name: {
            "images_per_s": encode_batch / image_s[name],
            "captions_per_s": encode_batch / text_s[name],
            "train_step_s": step_s[name],
        }
        for name in contenders
    }
    base, multi = rows["K=1 (CLIP-style)"], rows[f"MVAM K={args.views}"]
    ratios = {
        "encode_images_ratio": multi["images_per_s"] / base["images_per_s"],
        "encode_captions_ratio": multi["captions_per_s"] / base["captions_per_s"],
        "train_step_time_ratio": multi["train_step_s"] / base["train_step_s"],
    }
    table = [
        f"MVAM speed, {torch.get_num_threads()} threads, encode batch {encode_batch}, train batch {train_batch}, "
        f"{rounds} interleaved rounds (medians){' [tiny]' if args.tiny else ''}",
        "",
        "| model | images/s | captions/s | train step (s) |",
        "|---|---:|---:|---:|",
    ]
    table += [f"| {n} | {r['images_per_s']:.1f} | {r['captions_per_s']:.1f} | {r['train_step_s']:.3f} |" for n, r in rows.items()]
    table += [
        "",
        f"encode throughput ratio MVAM / K=1: images {ratios['encode_images_ratio']:.3f}, "
        f"captions {ratios['encode_captions_ratio']:.3f} (target >= 0.85)",
        f"train step time ratio MVAM / K=1: {ratios['train_step_time_ratio']:.3f}",
    ]
    text_out = "\n".join(table)
    print(text_out)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "mvam_speed.md").write_text(text_out + "\n")
    (args.out_dir / "mvam_speed.json").write_text(json.dumps({"rows": rows, "ratios": ratios, "tiny": args.tiny}, indent=2))


if __name__ == "__main__":
    main()
