"""Image search over an indexed gallery, with the attention behind each result (a gradio app laid
out as a Hugging Face Space).

    python demo/app.py outputs/mvam                              # MVAM alone
    python demo/app.py outputs/mvam --uarda_model outputs/uarda  # MVAM shortlist reranked by UARDA
    python demo/app.py outputs/mvam --data path/to/dataset --split test

Type a query: the page shows the best images of the gallery, and for each one MVAM's per-view
attention (where each view looks in the image and in the query) and, with a UARDA model, UARDA's
word-region attention (what each word of the query looks at). By default the gallery is the split
the MVAM folder was evaluated on (the built-in synthetic test set for a default
``training/run.py`` run). The index is built on the first start and kept in ``--index_dir``
(default: a folder under the hf_mvam cache named after the models and the data).

In a Space (``python app.py`` without arguments), the model folders or Hub ids come from the
``HF_MVAM_MODEL`` and ``HF_MVAM_UARDA_MODEL`` variables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from hf_mvam.image_loading import load_image
from hf_mvam.retrieval import RetrievalIndex, load_split
from hf_mvam.visualization import plot_view_attention, plot_word_region_attention

RESULTS = 4  # images shown per query
SHORTLIST = 64  # MVAM candidates reranked by UARDA


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mvam_model", nargs="?", default=os.environ.get("HF_MVAM_MODEL"),
                        help="MVAM output folder or Hub id (default: $HF_MVAM_MODEL)")
    parser.add_argument("--uarda_model", default=os.environ.get("HF_MVAM_UARDA_MODEL"),
                        help="UARDA output folder or Hub id: reranking and word-region attention (default: $HF_MVAM_UARDA_MODEL)")
    parser.add_argument("--data", help="the gallery's dataset (default: the split the MVAM folder was evaluated on)")
    parser.add_argument("--image_root")
    parser.add_argument("--image_column")
    parser.add_argument("--caption_column")
    parser.add_argument("--split", default="test")
    parser.add_argument("--index_dir", help="where the index is kept (built there on the first start)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (default: 127.0.0.1; a Space sets GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    if not args.mvam_model:
        parser.error("give an MVAM output folder (or set HF_MVAM_MODEL)")
    return args


def open_index(args) -> RetrievalIndex:
    """The gallery's index: opened from ``--index_dir`` when it was built from the same models (and
    weights) and data, else built there."""
    split, source = load_split(args.mvam_model, args.data, image_root=args.image_root, image_column=args.image_column,
                               caption_column=args.caption_column, split=args.split)
    wanted = {"mvam_model": _absolute(args.mvam_model), "uarda_model": _absolute(args.uarda_model), "source": source}
    folder = Path(args.index_dir) if args.index_dir else _cache_dir() / hashlib.sha256(
        json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    config = folder / "retrieval_index.json"
    if config.is_file():
        recorded = json.loads(config.read_text())
        if {key: recorded.get(key) for key in wanted} == wanted:
            try:
                return RetrievalIndex.load(folder)
            except ValueError as stale:  # e.g. a model folder trained again since
                print(f"building the index again: {stale}", flush=True)
    print(f"indexing {len(split)} images into {folder}", flush=True)
    return RetrievalIndex.build(folder, split, args.mvam_model, args.uarda_model, source=source, overwrite=True, progress=True)


def _absolute(path):
    return None if path is None else str(Path(path).resolve()) if Path(path).exists() else str(path)


def _cache_dir() -> Path:
    root = os.environ.get("HF_MVAM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "hf_mvam") / "indexes"


class SearchPage:
    """What the page does on a query: search, then draw the attention panels of each result."""

    def __init__(self, index: RetrievalIndex):
        self.index = index
        self.split = index.load_split()
        self.figures = Path(tempfile.mkdtemp(prefix="hf-mvam-demo-"))
        grid = index.config.get("region_grid")
        self.region_grid = tuple(grid) if grid else None

    @torch.no_grad()
    def search(self, query: str, rerank: bool):
        """Per result slot: (visible, image, views figure, words figure, label); and a status line."""
        query = (query or "").strip()
        if not query:
            return self._empty("Type a query.")
        rerank = bool(rerank) and self.index.uarda is not None
        start = time.perf_counter()
        hits = self.index.search(texts=[query], k=RESULTS, rerank=rerank, shortlist_size=SHORTLIST)
        seconds = time.perf_counter() - start
        method = f"MVAM's top {SHORTLIST} reranked by UARDA" if rerank else "MVAM"
        status = (f"**{query}**: the best {RESULTS} of {len(self.index)} images ({method}), "
                  f"found in {1000 * seconds:.0f} ms.")
        query_views = self._query_views(query)
        outputs = []
        stamp = time.time_ns()
        for rank, (image_id, position, score) in enumerate(zip(hits.ids[0], hits.positions[0], hits.scores[0])):
            image = load_image(self.split[int(position)]["image"])  # the loaders keep images undecoded
            views = self._views_figure(image, query_views, self.figures / f"{stamp}-views-{rank}.png")
            words = None
            if self.index.uarda is not None:
                words = self._words_figure(image, query, int(position), self.figures / f"{stamp}-words-{rank}.png")
            caption = f"**{rank + 1}.** image `{image_id}`, score {score:.3f}"
            shown = image.resize((4 * image.width, 4 * image.height), Image.NEAREST) if image.width < 128 else image
            outputs += [gr.update(visible=True), caption, shown, str(views), None if words is None else str(words)]
        return outputs + [status]

    def _empty(self, status: str):
        return [gr.update(visible=False), "", None, None, None] * RESULTS + [status]

    def _query_views(self, query: str):
        """MVAM's view attention over the query's tokens, and the tokens."""
        mvam, processor = self.index.mvam, self.index.mvam_processor
        tokens = processor(text=[query], return_tensors="pt")
        encoded = mvam.encode_texts(tokens["input_ids"], tokens["attention_mask"], output_attentions=True)
        words, keep = _words(processor.tokenizer, tokens["input_ids"][0])
        return words, encoded.view_attentions[0][:, keep]  # [L'], [K, L'] without special tokens

    def _views_figure(self, image, query_views, path: Path) -> Path:
        words, text_attention = query_views
        mvam, processor = self.index.mvam, self.index.mvam_processor
        encoded = mvam.encode_images(**processor(images=[image], return_tensors="pt"), output_attentions=True)
        return plot_view_attention(image, encoded.view_attentions[0], encoded.grid_size, words, text_attention, path,
                                   title="MVAM: where each view looks")

    def _words_figure(self, image, query: str, position: int, path: Path) -> Path:
        uarda, processor = self.index.uarda, self.index.uarda_processor
        tokens = processor(text=[query], return_tensors="pt")
        text = uarda.encode_texts(tokens["input_ids"], tokens["attention_mask"])
        regions = torch.from_numpy(np.array(self.index.image_fragments[position]))  # [R, D], read from the cache
        attention, relevant = uarda.word_region_attention(regions, text.text_fragments[0], text.text_mask[0])
        words, keep = _words(processor.tokenizer, tokens["input_ids"][0])
        return plot_word_region_attention(image, words, attention[keep], self.region_grid, path,
                                          threshold_mask=relevant[keep], title="UARDA: what each word looks at")


def _words(tokenizer, input_ids: torch.Tensor):
    """The query's tokens without the special ones ([CLS], [SEP]), and their positions."""
    special = set(tokenizer.all_special_ids)
    keep = [i for i, token in enumerate(input_ids.tolist()) if token not in special]
    return tokenizer.convert_ids_to_tokens(input_ids[keep].tolist()), torch.tensor(keep)


def build_app(index: RetrievalIndex) -> gr.Blocks:
    page = SearchPage(index)
    with gr.Blocks(title="hf-mvam image search") as app:
        gr.Markdown(
            "# hf-mvam image search\n"
            f"A gallery of {len(index)} images indexed by MVAM (`{index.config['mvam_model']}`)"
            + (f", reranked by UARDA (`{index.config['uarda_model']}`)." if index.uarda is not None else ".")
        )
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="a small red circle left of a blue square", elem_id="query", scale=4)
            rerank = gr.Checkbox(value=index.uarda is not None, interactive=index.uarda is not None,
                                 label="Rerank with UARDA", elem_id="rerank", scale=1)
            button = gr.Button("Search", variant="primary", elem_id="search", scale=1)
        status = gr.Markdown(elem_id="status")
        slots = []
        for rank in range(RESULTS):
            with gr.Row(visible=False, elem_id=f"hit-{rank}") as row:
                with gr.Column(scale=1, min_width=200):
                    caption = gr.Markdown(elem_id=f"caption-{rank}")
                    image = gr.Image(type="pil", show_label=False, elem_id=f"result-{rank}", height=220)
                views = gr.Image(type="filepath", label="MVAM per-view attention", elem_id=f"views-{rank}", scale=3)
                words = gr.Image(type="filepath", label="UARDA word-region attention", elem_id=f"words-{rank}", scale=3,
                                 visible=index.uarda is not None)
            slots += [row, caption, image, views, words]
        for trigger in (button.click, query.submit):
            trigger(page.search, inputs=[query, rerank], outputs=slots + [status])
    return app


def main(argv=None):
    args = parse_arguments(argv)
    app = build_app(open_index(args))
    # No allowed_paths: gradio serves every file under those to every visitor. The figures, written
    # to the temp folder, reach the page through gradio's cache like any returned file.
    app.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
