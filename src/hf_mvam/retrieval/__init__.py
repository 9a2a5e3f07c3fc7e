"""Gallery-scale retrieval: MVAM embeddings in a faiss index, MVAM's shortlist reranked by UARDA's
cross attention (two-stage search, as BLIP retrieves then reranks), and its evaluation.

- :class:`RetrievalIndex` — build an index folder from a split (images and captions, with a UARDA
  model also their fragments, memory-mapped), open it, ``search(texts=...)`` for images and
  ``search(images=...)`` for captions, reranked or not.
- :class:`EmbeddingIndex` — the faiss part alone: exact, IVF or HNSW, ids beside it.
- :func:`pair_scores` — UARDA's scores of given (image, caption) pairs only.
- :func:`evaluate` — Recall@K of MVAM, UARDA and two-stage search at several shortlist sizes.

Command line: ``python -m hf_mvam.retrieval index|search|evaluate --help``.
"""

from .evaluation import DEFAULT_SHORTLIST_SIZES, evaluate, shortlist_recall
from .gallery import DEFAULT_SHORTLIST_SIZE, RetrievalIndex, SearchResults, load_model, load_split
from .index import EXACT_SEARCH_LIMIT, INDEX_TYPES, EmbeddingIndex
from .rerank import pair_scores

__all__ = [
    "DEFAULT_SHORTLIST_SIZE", "DEFAULT_SHORTLIST_SIZES", "EXACT_SEARCH_LIMIT", "INDEX_TYPES", "EmbeddingIndex",
    "RetrievalIndex", "SearchResults", "evaluate", "load_model", "load_split", "pair_scores", "shortlist_recall",
]
