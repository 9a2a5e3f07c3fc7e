"""Unit-norm embeddings in a faiss index, searched by inner product, next to the ids of the items.

Three kinds of index (``index_type``):

``flat``
    exact search (``IndexFlatIP``): every query is compared with every item. The default up to
    ``EXACT_SEARCH_LIMIT`` items.
``ivf``
    an inverted file (``IndexIVFFlat``): the items are clustered into ``nlist`` cells by k-means
    (trained on a sample) and a query visits the ``nprobe`` cells nearest to it. The default
    beyond ``EXACT_SEARCH_LIMIT`` items: it trains in seconds and keeps the vectors uncompressed,
    so the scores it returns are exact inner products.
``hnsw``
    a navigable small-world graph (``IndexHNSWFlat``, 32 links per item): faster queries than IVF at
    the same recall, but building it costs minutes per million items on a small CPU.

``nprobe`` (IVF) and ``ef_search`` (HNSW) trade speed for recall at search time; both can be
changed after loading (``index.nprobe = 64``). ``benchmarks/bench_retrieval.py`` measures the
trade-off.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

__all__ = ["EXACT_SEARCH_LIMIT", "INDEX_TYPES", "EmbeddingIndex"]

#: Up to this many items, ``index_type="auto"`` searches exactly.
EXACT_SEARCH_LIMIT = 100_000
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
_HNSW_LINKS = 32
_DEFAULT_EF_SEARCH = 128
# Items added to faiss per call (keeps the temporary float32 copy small).
_ADD_ROWS = 1 << 16
# k-means sample per IVF cell (faiss warns below 39).
_TRAINING_POINTS_PER_CELL = 64


def _faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("hf_mvam.retrieval needs faiss: pip install faiss-cpu") from error
    return faiss


def default_nlist(num_items: int) -> int:
    """IVF cells for ``num_items`` items: about sqrt(N) (faiss' rule of thumb is 1-16 sqrt(N);
    the low end keeps k-means training fast on a CPU), at least 39 items a cell."""
    return max(1, min(int(round(math.sqrt(num_items))), num_items // 39))


def default_nprobe(nlist: int) -> int:
    """Cells an IVF query visits by default: 1/16 of them (at least 8)."""
    return min(nlist, max(8, nlist // 16))


class EmbeddingIndex:
    """A faiss inner-product index over ``[N, E]`` unit-norm embeddings, and the ``N`` ids of the
    items in index order.

    Build with :meth:`build`, search with :meth:`search`, write and read with :meth:`save` /
    :meth:`load` (``<name>.faiss`` and ``<name>_ids.json`` in a folder).
    """

    def __init__(self, index, ids: list[str]):
        if index.ntotal != len(ids):
            raise ValueError(f"the faiss index holds {index.ntotal} items but {len(ids)} ids were given")
        self.index = index
        self.ids = list(ids)

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings,
        ids: list[str] | None = None,
        index_type: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        seed: int = 0,
    ) -> "EmbeddingIndex":
        """Index ``embeddings`` (``[N, E]`` float array, tensor or memmap; added in chunks, so a
        memmap is never read into memory whole).

        Args:
            ids: one string per item (default ``"0"``, ``"1"``, ...). Must be unique.
            index_type: ``"auto"`` (``flat`` up to ``EXACT_SEARCH_LIMIT`` items, else ``ivf``),
                ``"flat"``, ``"ivf"`` or ``"hnsw"``.
            nlist: IVF cells (default :func:`default_nlist`).
            nprobe: IVF cells visited per query (default :func:`default_nprobe`).
            ef_search: HNSW search breadth (default 128).
            seed: the k-means sample and initialisation (IVF).
        """
        faiss = _faiss()
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if getattr(embeddings, "ndim", None) != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, E] array, got shape {getattr(embeddings, 'shape', None)}")
        num_items, dim = embeddings.shape
        ids = [str(i) for i in range(num_items)] if ids is None else [str(i) for i in ids]
        if len(ids) != num_items:
            raise ValueError(f"{len(ids)} ids for {num_items} embeddings")
        if len(set(ids)) != len(ids):
            duplicate = next(i for i, n in Counter(ids).items() if n > 1)
            raise ValueError(f"ids must be unique; {duplicate!r} appears more than once")
        if index_type == "auto":
            index_type = "flat" if num_items <= EXACT_SEARCH_LIMIT else "ivf"

        if index_type == "flat":
            index = faiss.IndexFlatIP(dim)
        elif index_type == "hnsw":
            index = faiss.IndexHNSWFlat(dim, _HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search or _DEFAULT_EF_SEARCH
        else:
            nlist = nlist or default_nlist(num_items)
            if not 1 <= nlist <= num_items:
                raise ValueError(f"nlist must be in [1, {num_items}] (the number of items), got {nlist}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            sample = np.random.default_rng(seed).choice(
                num_items, size=min(num_items, _TRAINING_POINTS_PER_CELL * nlist), replace=False
            )
            index.train(_float32_rows(embeddings, np.sort(sample)))
            index.nprobe = nprobe or default_nprobe(nlist)
        for start in range(0, num_items, _ADD_ROWS):
            index.add(_float32_rows(embeddings, slice(start, start + _ADD_ROWS)))
        return cls(index, ids)

    # --- searching --------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``"flat"``, ``"ivf"`` or ``"hnsw"``."""
        name = type(self.index).__name__
        return "ivf" if "IVF" in name else "hnsw" if "HNSW" in name else "flat"

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def nprobe(self) -> int | None:
        return self.index.nprobe if self.kind == "ivf" else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "ivf":
            raise ValueError(f"nprobe applies to an ivf index; this one is {self.kind}")
        self.index.nprobe = int(value)

    @property
    def ef_search(self) -> int | None:
        return self.index.hnsw.efSearch if self.kind == "hnsw" else None

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self.kind != "hnsw":
            raise ValueError(f"ef_search applies to an hnsw index; this one is {self.kind}")
        self.index.hnsw.efSearch = int(value)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items of highest inner product with each query.

        Args:
            queries: ``[Q, E]`` float array or tensor.
            k: results per query (at most the number of items).

        Returns:
            ``(scores [Q, k] float32, positions [Q, k] int64)``, best first; a position of -1
            (score -inf) marks a missing result (an approximate index found fewer than ``k``).
        """
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the number of items), got {k}")
        queries = _float32_rows(queries, slice(None))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        scores, positions = self.index.search(queries, k)
        scores[positions < 0] = -np.inf
        return scores, positions

    # --- saving -----------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike, name: str) -> None:
        """Write ``<name>.faiss`` and ``<name>_ids.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self.index, str(folder / f"{name}.faiss"))
        (folder / f"{name}_ids.json").write_text(json.dumps(self.ids))

    @classmethod
    def load(cls, folder: str | os.PathLike, name: str) -> "EmbeddingIndex":
        folder = Path(folder)
        path = folder / f"{name}.faiss"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {path.name}: not an index written by EmbeddingIndex.save")
        return cls(_faiss().read_index(str(path)), json.loads((folder / f"{name}_ids.json").read_text()))


def _float32_rows(array, rows) -> np.ndarray:
    """``array[rows]`` as a C-contiguous float32 numpy array (tensors are moved to the CPU)."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    rows = np.asarray(array[rows])
    if not np.isfinite(rows).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return np.ascontiguousarray(rows, dtype=np.float32)
