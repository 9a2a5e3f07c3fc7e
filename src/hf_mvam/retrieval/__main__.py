"""Command line of hf_mvam.retrieval.

    python -m hf_mvam.retrieval index --mvam_model outputs/mvam --uarda_model outputs/uarda --output_dir outputs/index
    python -m hf_mvam.retrieval search outputs/index "a red circle left of a blue square" --k 5
    python -m hf_mvam.retrieval search outputs/index --images photo.png --k 5
    python -m hf_mvam.retrieval evaluate --mvam_model outputs/mvam --uarda_model outputs/uarda --output_file results.json
    accelerate launch --multi_gpu --num_processes 2 -m hf_mvam.retrieval evaluate ...   # shared across processes

Without ``--data``, ``index`` and ``evaluate`` use the split the MVAM folder was evaluated on (its
``training_args.json``; the built-in synthetic test set for a default ``training/run.py`` run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .evaluation import DEFAULT_SHORTLIST_SIZES
from .gallery import DEFAULT_SHORTLIST_SIZE, RetrievalIndex, load_model, load_split
from .index import INDEX_TYPES


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (default: the split the MVAM folder was evaluated on)")
    group.add_argument("--data", help="a dataset as training/run.py takes it (folder, Karpathy JSON, Hub id)")
    group.add_argument("--image_root", help="folder of the images a Karpathy JSON names")
    group.add_argument("--image_column")
    group.add_argument("--caption_column")
    group.add_argument("--split", default="test", help="the split of --data to use (default: test)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_mvam.retrieval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="encode a gallery and write an index folder")
    index.add_argument("--mvam_model", required=True, help="MVAM model folder or Hub id")
    index.add_argument("--uarda_model", help="UARDA model folder or Hub id, for two-stage search")
    index.add_argument("--output_dir", required=True, help="the index folder to write")
    index.add_argument("--overwrite_output_dir", action="store_true")
    index.add_argument("--index_type", choices=INDEX_TYPES, default="auto",
                       help="faiss index: exact (flat) up to 100K items by default, IVF beyond")
    index.add_argument("--id_column", help="column holding each image's id (default: the row number)")
    index.add_argument("--per_device_eval_batch_size", type=int, default=256)
    _data_arguments(index)

    search = commands.add_parser("search", help="search an index folder with text or image queries")
    search.add_argument("index_dir")
    search.add_argument("queries", nargs="*", help="text queries (find images)")
    search.add_argument("--images", nargs="+", help="image files as queries (find captions)")
    search.add_argument("--k", type=int, default=10, help="results per query")
    search.add_argument("--shortlist_size", type=int, default=DEFAULT_SHORTLIST_SIZE,
                        help="MVAM candidates reranked by UARDA per query")
    search.add_argument("--no_rerank", action="store_true", help="MVAM alone, even if the index has a UARDA model")
    search.add_argument("--json", action="store_true", help="print one JSON object per query")

    evaluate = commands.add_parser("evaluate", help="Recall@K of MVAM, UARDA and two-stage search")
    evaluate.add_argument("--mvam_model", required=True)
    evaluate.add_argument("--uarda_model")
    evaluate.add_argument("--shortlist_sizes", type=int, nargs="+", default=list(DEFAULT_SHORTLIST_SIZES))
    evaluate.add_argument("--skip_full_uarda", action="store_true", help="do not score the whole gallery with UARDA")
    evaluate.add_argument("--per_device_eval_batch_size", type=int, default=256)
    evaluate.add_argument("--output_file", help="write the results here as JSON")
    _data_arguments(evaluate)
    return parser


def load_gallery_split(args):
    """The split to index or evaluate, and how to load it again (see :func:`load_split`)."""
    return load_split(args.mvam_model, args.data, image_root=args.image_root, image_column=args.image_column,
                      caption_column=args.caption_column, split=args.split)


def _distributed() -> bool:
    """Under ``accelerate launch`` with several processes: set up the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from accelerate import PartialState

    return PartialState(cpu=not _accelerator_available()).num_processes > 1


def _accelerator_available() -> bool:
    import torch

    return torch.accelerator.is_available()


def run_index(args) -> None:
    split, source = load_gallery_split(args)
    ids = None
    if args.id_column:
        if args.id_column not in split.column_names:
            raise ValueError(f"the split has no column {args.id_column!r}; it has {split.column_names}")
        ids = [str(value) for value in split[args.id_column]]
    index = RetrievalIndex.build(args.output_dir, split, args.mvam_model, args.uarda_model, ids=ids,
                                 index_type=args.index_type, batch_size=args.per_device_eval_batch_size, source=source,
                                 overwrite=args.overwrite_output_dir, progress=True, distributed=_distributed())
    print(f"indexed {len(index)} images and {len(index.caption_ids)} captions "
          f"({index.images.kind} index{', UARDA fragments' if index.uarda is not None else ''}) in {index.folder}")


def run_search(args) -> None:
    if bool(args.queries) == bool(args.images):
        raise ValueError("give text queries or --images, not both (and not neither)")
    index = RetrievalIndex.load(args.index_dir)
    queries = args.queries or args.images
    results = index.search(texts=args.queries or None, images=args.images or None, k=args.k,
                           rerank=False if args.no_rerank else None, shortlist_size=args.shortlist_size)
    for q, query in enumerate(queries):
        hits = [{"id": results.ids[q][r], "score": float(results.scores[q, r]),
                 **({"text": results.texts[q][r]} if results.texts else {})} for r in range(len(results.ids[q]))]
        if args.json:
            print(json.dumps({"query": query, "results": hits}))
            continue
        print(f"\n{query}")
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank:>3}  {hit['score']:8.4f}  {hit['id']}" + (f"  {hit['text']}" if "text" in hit else ""))


def run_evaluate(args) -> None:
    from .evaluation import evaluate

    split, _ = load_gallery_split(args)
    mvam, mvam_processor = load_model(args.mvam_model, "mvam")
    uarda = uarda_processor = None
    if args.uarda_model:
        uarda, uarda_processor = load_model(args.uarda_model, "uarda")
    distributed = _distributed()
    results = evaluate(mvam, mvam_processor, split, uarda, uarda_processor, shortlist_sizes=args.shortlist_sizes,
                       full_uarda=not args.skip_full_uarda, batch_size=args.per_device_eval_batch_size, progress=True,
                       distributed=distributed)
    if distributed and int(os.environ.get("RANK", "0")) != 0:
        return
    print(results_table(results))
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(results, indent=2) + "\n")


def results_table(results: dict[str, float]) -> str:
    """A markdown table of :func:`~hf_mvam.retrieval.evaluate`'s results, one row per method."""
    methods = list(dict.fromkeys(key.split("/", 1)[0] for key in results))
    columns = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["rsum"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(f"{results[f'{method}/{c}']:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        {"index": run_index, "search": run_search, "evaluate": run_evaluate}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
