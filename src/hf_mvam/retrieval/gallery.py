"""A gallery indexed for search: MVAM embeddings in faiss, UARDA fragments memory-mapped on disk.

An index folder (written by :meth:`RetrievalIndex.build`, read by :meth:`RetrievalIndex.load`)::

    retrieval_index.json     what it holds: the models it was built with (and a digest of their
                             weights), counts, the data source
    images.faiss             MVAM image embeddings (EmbeddingIndex), images_ids.json beside it
    captions.faiss           MVAM caption embeddings, captions_ids.json ("<image id>#<k>")
    captions.json            every caption's text and the position of its image
    image_fragments.npy      UARDA region fragments [N_images, R, D] float32      } with a UARDA
    caption_fragments.npy    UARDA word fragments [N_captions, L, D] float32      } model only,
    caption_mask.npy         their real-word mask [N_captions, L] bool            } memory-mapped

Search (:meth:`RetrievalIndex.search`) encodes the queries with MVAM, takes the ``shortlist_size``
nearest items from faiss and, with a UARDA model, reranks that shortlist by UARDA's cross
attention (:func:`~hf_mvam.retrieval.rerank.pair_scores`), reading only the shortlisted items'
fragments from disk. Text queries find images; image queries find captions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from .. import MODEL_CLASSES
from ..data.collate import flatten_captions, stack_region_features
from ..evaluation import _process_group, image_batches
from .index import EmbeddingIndex
from .rerank import pair_scores

__all__ = ["DEFAULT_SHORTLIST_SIZE", "INDEX_CONFIG_NAME", "RetrievalIndex", "SearchResults", "load_model", "load_split"]

INDEX_CONFIG_NAME = "retrieval_index.json"
INDEX_FORMAT = "hf-mvam-retrieval-index"
INDEX_VERSION = 1
#: Candidates MVAM hands to UARDA per query (BLIP reranks 128 on Flickr30K, 256 on COCO).
DEFAULT_SHORTLIST_SIZE = 64


def load_model(name_or_path: str | os.PathLike, model_type: str, device=None):
    """An hf-mvam model of ``model_type`` and its processor from a folder or Hub id, in eval mode.

    Raises:
        ValueError: the folder holds another type of model (e.g. a UARDA folder given as MVAM).
    """
    config = PretrainedConfig.get_config_dict(str(name_or_path))[0]
    found = config.get("model_type")
    if found != model_type:
        raise ValueError(f"{name_or_path} holds a {found!r} model, expected {model_type!r}")
    _, model_class, processor_class = MODEL_CLASSES[model_type]
    model = model_class.from_pretrained(str(name_or_path)).eval()
    if device is not None:
        model.to(device)
    return model, processor_class.from_pretrained(str(name_or_path))


def weights_digest(model) -> str:
    """The sha256 of a model's weights and buffers: an index is valid for the weights it was built
    with only (a folder trained again holds the same config, other embeddings)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class SearchResults:
    """Results of :meth:`RetrievalIndex.search`, best first.

    Attributes:
        ids: ``Q`` lists of ``k`` item ids (image ids for text queries, caption ids for image
            queries); ``None`` where an approximate index found fewer than ``k`` items.
        scores: ``[Q, k]`` float32: UARDA scores when reranked, else MVAM similarities.
        positions: ``[Q, k]`` int64 positions of the items in the index (-1 where missing).
        texts: for image queries, the captions' texts (``None`` for text queries).
    """

    ids: list
    scores: np.ndarray
    positions: np.ndarray
    texts: list | None = None


class RetrievalIndex:
    """A gallery of images and their captions, searchable in both directions. See the module
    docstring for the folder layout; build with :meth:`build`, open with :meth:`load`."""

    def __init__(self, folder: str | os.PathLike, device=None):
        self.folder = Path(folder)
        path = self.folder / INDEX_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} has no {INDEX_CONFIG_NAME}: not a folder written by RetrievalIndex.build")
        self.config = json.loads(path.read_text())
        if self.config.get("format") != INDEX_FORMAT or self.config.get("version") != INDEX_VERSION:
            raise ValueError(f"{path} is not a version-{INDEX_VERSION} {INDEX_FORMAT} file")
        self.mvam, self.mvam_processor = load_model(self.config["mvam_model"], "mvam", device)
        self.uarda = self.uarda_processor = None
        if self.config["uarda_model"] is not None:
            self.uarda, self.uarda_processor = load_model(self.config["uarda_model"], "uarda", device)
        for kind, model in (("mvam", self.mvam), ("uarda", self.uarda)):
            if model is not None and self.config.get(f"{kind}_weights") != weights_digest(model):
                raise ValueError(f"{self.folder} was built with other weights of {self.config[f'{kind}_model']}: "
                                 "build it again (RetrievalIndex.build, or python -m hf_mvam.retrieval index)")
        self.images = EmbeddingIndex.load(self.folder, "images")
        self.captions = EmbeddingIndex.load(self.folder, "captions")
        if self.images.dim != self._embedding_dim(self.mvam):
            raise ValueError(f"{self.folder} holds {self.images.dim}-wide embeddings; {self.config['mvam_model']} makes "
                             f"{self._embedding_dim(self.mvam)}-wide ones: not the model it was built with")
        captions = json.loads((self.folder / "captions.json").read_text())
        self.caption_texts, self.caption_images = captions["texts"], np.asarray(captions["images"], dtype=np.int64)
        self.image_fragments = self.caption_fragments = self.caption_mask = None
        if self.uarda is not None:
            self.image_fragments = np.load(self.folder / "image_fragments.npy", mmap_mode="r")  # [N_i, R, D]
            self.caption_fragments = np.load(self.folder / "caption_fragments.npy", mmap_mode="r")  # [N_t, L, D]
            self.caption_mask = np.load(self.folder / "caption_mask.npy", mmap_mode="r")  # [N_t, L]

    @classmethod
    def load(cls, folder: str | os.PathLike, device=None) -> "RetrievalIndex":
        """Open an index folder; its models load from the paths it records (on ``device``)."""
        return cls(folder, device)

    @staticmethod
    def _embedding_dim(mvam) -> int:
        return mvam.config.num_views * mvam.config.projection_dim

    @property
    def image_ids(self) -> list[str]:
        return self.images.ids

    @property
    def caption_ids(self) -> list[str]:
        return self.captions.ids

    def __len__(self) -> int:
        return len(self.images)

    # --- building ---------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        output_dir: str | os.PathLike,
        split,
        mvam_model: str | os.PathLike,
        uarda_model: str | os.PathLike | None = None,
        ids: list[str] | None = None,
        index_type: str = "auto",
        batch_size: int = 256,
        source: dict | None = None,
        overwrite: bool = False,
        progress: bool = False,
        distributed: bool = False,
        device=None,
    ) -> "RetrievalIndex":
        """Encode a split's images and captions and write an index folder.

        The arrays are written batch by batch into memory-mapped files, so the gallery never has
        to fit in memory; the folder is assembled under ``<output_dir>.partial`` and renamed when
        complete.

        Args:
            output_dir: the index folder to write.
            split: a ``datasets.Dataset`` with ``captions`` and ``image`` (or ``image_features``).
            mvam_model: folder or Hub id of an MVAM model (recorded in the index).
            uarda_model: folder or Hub id of a UARDA model for two-stage search, or ``None``.
            ids: an id per image (default: the row numbers).
            index_type: see :meth:`EmbeddingIndex.build` (the same type for images and captions).
            batch_size: images or captions per forward pass.
            source: how to load ``split`` again (recorded for :meth:`load_split`), e.g.
                ``{"data": ..., "split": "test"}``.
            overwrite: replace an existing ``output_dir``.
            distributed: every process of the ``torch.distributed`` group calls this with the same
                arguments; each encodes every ``world_size``-th batch into the shared files (one
                machine, or a shared file system), the first process builds the faiss indexes.
            device: where the models run while encoding (default: the CPU).
        """
        output_dir = Path(output_dir).resolve()
        rank, world = _process_group(distributed)
        if output_dir.exists() and not overwrite:
            raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite_output_dir) to replace it")
        if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / INDEX_CONFIG_NAME).is_file():
            raise FileExistsError(f"{output_dir} holds files but no index: not replacing it (choose another output_dir)")
        if len(split) == 0:
            raise ValueError("the split has no images")
        ids = [str(i) for i in range(len(split))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(split):
            raise ValueError(f"{len(ids)} ids for {len(split)} images")
        device = torch.device(device or "cpu")
        mvam, mvam_processor = load_model(mvam_model, "mvam", device)
        uarda = uarda_processor = None
        if uarda_model is not None:
            uarda, uarda_processor = load_model(uarda_model, "uarda", device)
        captions, text_to_image = flatten_captions(split)
        partial = output_dir.with_name(output_dir.name + ".partial")
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier(distributed)

        # 1. The arrays' shapes, from the first image and the longest caption.
        _, probe = next(image_batches(split.select([0]), mvam_processor, 1, device))
        dim = mvam.encode_images(**probe).pooler_output.shape[1]
        arrays = {"image_embeddings": ((len(split), dim), np.float32), "caption_embeddings": ((len(captions), dim), np.float32)}
        grid = None
        if uarda is not None:
            _, probe = next(image_batches(split.select([0]), uarda_processor, 1, device))
            probe = uarda.encode_images(**probe)
            _, n_regions, frag_dim = probe.image_fragments.shape
            grid = list(probe.grid_size) if probe.grid_size is not None else None
            length = max(len(tokens) for tokens in uarda_processor.tokenizer(captions, truncation=True)["input_ids"])
            arrays.update(
                image_fragments=((len(split), n_regions, frag_dim), np.float32),
                caption_fragments=((len(captions), length, frag_dim), np.float32),
                caption_mask=((len(captions), length), np.bool_),
            )
        if rank == 0:
            for name, (shape, dtype) in arrays.items():
                np.lib.format.open_memmap(partial / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
        _barrier(distributed)
        files = {name: np.load(partial / f"{name}.npy", mmap_mode="r+") for name in arrays}

        # 2. Every process encodes its batches into the files.
        num_batches = -(-len(split) // batch_size)
        mine = set(range(rank, num_batches, world))
        batches = image_batches(split, mvam_processor, batch_size, device, mine)
        if uarda is not None:  # the same batches through UARDA's processor
            batches = zip(batches, image_batches(split, uarda_processor, batch_size, device, mine))
        for batch in tqdm(batches, total=len(mine), desc="indexing images", disable=not progress):
            (index, inputs), (_, uarda_inputs) = batch if uarda is not None else (batch, (None, None))
            rows = slice(index * batch_size, index * batch_size + batch_size)
            files["image_embeddings"][rows] = mvam.encode_images(**inputs).pooler_output.cpu().numpy()
            if uarda is not None:
                files["image_fragments"][rows] = uarda.encode_images(**uarda_inputs).image_fragments.cpu().numpy()
        starts = range(0, len(captions), batch_size)
        for index in tqdm(range(rank, len(starts), world), desc="indexing captions", disable=not progress):
            rows = slice(starts[index], starts[index] + batch_size)
            tokens = mvam_processor(text=captions[rows], return_tensors="pt").to(device)
            encoded = mvam.encode_texts(tokens["input_ids"], tokens["attention_mask"])
            files["caption_embeddings"][rows] = encoded.pooler_output.cpu().numpy()
            if uarda is not None:
                tokens = uarda_processor(text=captions[rows], return_tensors="pt").to(device)
                encoded = uarda.encode_texts(tokens["input_ids"], tokens["attention_mask"])
                width = encoded.text_fragments.shape[1]  # this batch's longest caption
                files["caption_fragments"][rows, :width] = encoded.text_fragments.cpu().numpy()
                files["caption_mask"][rows, :width] = encoded.text_mask.cpu().numpy()
        for array in files.values():
            array.flush()
        del files
        _barrier(distributed)

        # 3. The first process builds the faiss indexes and writes the rest.
        if rank == 0:
            for name, array_name, item_ids in (
                ("images", "image_embeddings", ids),
                ("captions", "caption_embeddings", [f"{ids[i]}#{k}" for i, k in _caption_numbers(text_to_image)]),
            ):
                embeddings = np.load(partial / f"{array_name}.npy", mmap_mode="r")
                EmbeddingIndex.build(embeddings, item_ids, index_type=index_type).save(partial, name)
                del embeddings
                (partial / f"{array_name}.npy").unlink()  # faiss holds the vectors
            (partial / "captions.json").write_text(json.dumps({"texts": captions, "images": text_to_image.tolist()}))
            config = {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "mvam_model": _recorded_path(mvam_model),
                "uarda_model": None if uarda_model is None else _recorded_path(uarda_model),
                "mvam_weights": weights_digest(mvam),
                "uarda_weights": None if uarda is None else weights_digest(uarda),
                "num_images": len(split),
                "num_captions": len(captions),
                "region_grid": grid,  # (h, w) of the UARDA regions when they come from a vision grid
                "source": source,
            }
            (partial / INDEX_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            if output_dir.exists():
                shutil.rmtree(output_dir)
            partial.rename(output_dir)
        _barrier(distributed)
        return cls(output_dir, device)

    # --- searching --------------------------------------------------------------------------

    @torch.no_grad()
    def search(
        self,
        texts: str | list[str] | None = None,
        images=None,
        k: int = 10,
        rerank: bool | None = None,
        shortlist_size: int = DEFAULT_SHORTLIST_SIZE,
    ) -> SearchResults:
        """The ``k`` best images for each text query, or the ``k`` best captions for each image.

        Args:
            texts: a query string or a list of them (finds images).
            images: a query image or a list of them (PIL images, paths, arrays; ``[R, F]`` region
                features for a model that takes them) (finds captions).
            k: results per query.
            rerank: rerank MVAM's shortlist with UARDA's cross attention. Default: when the index
                has a UARDA model.
            shortlist_size: candidates taken from MVAM per query for reranking (at least ``k``).
        """
        if (texts is None) == (images is None):
            raise ValueError("pass exactly one of texts and images")
        rerank = self.uarda is not None if rerank is None else rerank
        if rerank and self.uarda is None:
            raise ValueError(f"rerank=True needs a UARDA model; {self.folder} was built without one")
        gallery = self.images if texts is not None else self.captions
        k = min(int(k), len(gallery))
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        shortlist = min(max(int(shortlist_size), k), len(gallery)) if rerank else k

        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            tokens = self.mvam_processor(text=texts, return_tensors="pt").to(self.mvam.device)
            queries = self.mvam.encode_texts(tokens["input_ids"], tokens["attention_mask"]).pooler_output
        else:
            images = images if isinstance(images, (list, tuple)) else [images]
            queries = self.mvam.encode_images(**self._image_inputs(self.mvam, self.mvam_processor, images)).pooler_output
        scores, positions = gallery.search(queries, shortlist)  # [Q, shortlist]
        if rerank:
            scores = self._rerank(texts, images, positions)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, positions = np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)
        ids = [[gallery.ids[p] if p >= 0 else None for p in row] for row in positions.tolist()]
        found_texts = None if texts is not None else [
            [self.caption_texts[p] if p >= 0 else None for p in row] for row in positions.tolist()
        ]
        return SearchResults(ids=ids, scores=scores, positions=positions, texts=found_texts)

    def _rerank(self, texts, images, positions: np.ndarray) -> np.ndarray:
        """UARDA scores ``[Q, shortlist]`` of each query with its candidates (-inf where missing)."""
        num_queries, shortlist = positions.shape
        found = positions >= 0
        query = np.repeat(np.arange(num_queries), shortlist)[found.ravel()]
        candidate = positions[found]
        if texts is not None:
            tokens = self.uarda_processor(text=texts, return_tensors="pt").to(self.uarda.device)
            encoded = self.uarda.encode_texts(tokens["input_ids"], tokens["attention_mask"])
            values = pair_scores(self.uarda, self.image_fragments, encoded.text_fragments, encoded.text_mask,
                                 torch.from_numpy(candidate), torch.from_numpy(query))
        else:
            regions = self.uarda.encode_images(**self._image_inputs(self.uarda, self.uarda_processor, images)).image_fragments
            values = pair_scores(self.uarda, regions, self.caption_fragments, self.caption_mask,
                                 torch.from_numpy(query), torch.from_numpy(candidate))
        scores = np.full(positions.shape, -np.inf, dtype=np.float32)
        scores[found] = values.numpy()
        return scores

    @staticmethod
    def _image_inputs(model, processor, images) -> dict:
        if model.config.image_feature_dim is not None:
            return {"image_features": stack_region_features([torch.as_tensor(np.asarray(f)) for f in images]).to(model.device)}
        return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"].to(model.device)}

    # --- the gallery's data -----------------------------------------------------------------

    def load_split(self):
        """The split the index was built from, loaded again from its recorded ``source``."""
        source = self.config.get("source") or {}
        if "model_folder" in source:
            from ..data.splits import load_recorded_eval_split

            return load_recorded_eval_split(source["model_folder"])[0]
        if "data" in source:
            from ..data.sources import load_image_caption_dataset

            options = {key: source.get(key) for key in ("image_root", "image_column", "caption_column")}
            return load_image_caption_dataset(source["data"], **options)[0][source["split"]]
        raise ValueError(f"{self.folder} records no data source it could load its images from")


def load_split(mvam_model, data=None, *, image_root=None, image_column=None, caption_column=None, split="test"):
    """A gallery split and how to load it again (what :meth:`RetrievalIndex.load_split` reads).

    Without ``data``: the split the MVAM folder was evaluated on (its ``training_args.json``; the
    built-in synthetic test set for a default ``training/run.py`` run). Otherwise split ``split``
    of ``data``, loaded as ``training/run.py`` loads data.

    Returns:
        ``(split, source)``.
    """
    if data is None:
        from ..data.splits import TRAINING_ARGS_NAME, load_recorded_eval_split

        folder = Path(mvam_model)
        if not (folder / TRAINING_ARGS_NAME).is_file():
            raise ValueError(f"{folder} has no {TRAINING_ARGS_NAME} to find its test split in: pass --data")
        return load_recorded_eval_split(folder)[0], {"model_folder": str(folder.resolve())}
    from ..data.sources import load_image_caption_dataset

    splits, _ = load_image_caption_dataset(data, image_root=image_root, image_column=image_column,
                                           caption_column=caption_column)
    if split not in splits:
        raise ValueError(f"{data} has no {split!r} split; it has {sorted(splits)}")
    source = {"data": _recorded_path(data), "image_root": None if image_root is None else _recorded_path(image_root),
              "image_column": image_column, "caption_column": caption_column, "split": split}
    return splits[split], source


def _caption_numbers(text_to_image: torch.Tensor) -> list[tuple[int, int]]:
    """``(image, k)`` for every caption: the caption is the ``k``-th of its image."""
    numbers, previous, k = [], None, 0
    for image in text_to_image.tolist():
        k = k + 1 if image == previous else 0
        numbers.append((image, k))
        previous = image
    return numbers


def _recorded_path(name_or_path) -> str:
    """A local folder as an absolute path (so the index opens from anywhere); a Hub id as it is."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else str(name_or_path)


def _barrier(distributed: bool) -> None:
    if _process_group(distributed)[1] > 1:
        torch.distributed.barrier()
