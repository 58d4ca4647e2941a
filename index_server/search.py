"""Searching shards: the exact top-k merge and the in-process index over all shards.

``merge_topk`` is the one place where per-shard answers become a global answer; the
in-process ``LocalIndex`` and the gRPC server both search through ``ShardSearcher`` and
merge with it, which is why they agree to the last bit. Order is nearest first with ties
broken by the smaller global id, so the answer does not depend on how many shards there are
or which one answered first.

Indexes built with ``--refine`` keep a float16 copy of every vector; a shard then asks its
approximate index for ``refine_factor * k`` candidates and re-ranks them with exact
distances computed from that memory-mapped copy.

Search settings (``SearchKnobs``: nprobe, efSearch, refine factor) are resolved once per
caller: the caller's value, else the server's (``ttt-index serve --nprobe``), else the index's
own default (an IVF index built here records nprobe = nlist/32 in its manifest). They are
passed to Faiss per call (``SearchParameters``), so concurrent requests with different
settings never race on a shared index.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .corpus import CorpusStore
from .manifest import Manifest, ShardInfo
from .options import REFINE_FACTOR, IndexOptions

# Index types whose stored codes are the vectors themselves (reconstruction is exact).
_EXACT_STORAGE = (faiss.IndexFlat, faiss.IndexHNSWFlat, faiss.IndexIVFFlat)


@dataclass(frozen=True)
class SearchKnobs:
    nprobe: int | None = None
    ef_search: int | None = None
    refine_factor: int | None = None

    def over(self, fallback: SearchKnobs) -> SearchKnobs:
        """These settings, with the unset ones taken from ``fallback``."""
        return SearchKnobs(*(mine if mine is not None else theirs for mine, theirs in
                             zip((self.nprobe, self.ef_search, self.refine_factor),
                                 (fallback.nprobe, fallback.ef_search, fallback.refine_factor))))


def index_defaults(manifest: Manifest) -> SearchKnobs:
    """The settings an index is searched with when nobody says otherwise."""
    return SearchKnobs(nprobe=manifest.layout.get("nprobe"), ef_search=None,
                       refine_factor=REFINE_FACTOR if manifest.vectors else None)


def knobs_of(options: IndexOptions) -> SearchKnobs:
    return SearchKnobs(options.nprobe, options.ef_search, options.refine_factor)


@dataclass
class SearchResult:
    """Global top-k for a batch of queries; rows padded with id -1 where fewer were found."""

    ids: np.ndarray  # (n, k) int64
    distances: np.ndarray  # (n, k) float32
    missing_shards: list[list[int]] = field(default_factory=list)  # per query, degrade mode


class QueryError(ValueError):
    """A query the index refuses (wrong dimension, NaN or infinity, k out of range)."""


def check_queries(queries: np.ndarray, k: int, dim: int, max_k: int, max_batch: int | None = None) -> np.ndarray:
    """The validation every backend applies before searching; returns float32 rows."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.shape[1] != dim:
        raise QueryError(f"query dimension {queries.shape[1]} != index dimension {dim}")
    if not 1 <= k <= max_k:
        raise QueryError(f"k must be in [1, {max_k}], got {k}")
    if max_batch is not None and not 1 <= len(queries) <= max_batch:
        raise QueryError(f"batch must hold 1 to {max_batch} query vectors, got {len(queries)}")
    if not np.isfinite(queries).all():
        raise QueryError("query vectors contain NaN or infinity")
    return queries


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(distances, ids)`` of shape (n, k_s) into the global top-k.

    Rows with id -1 (shard had fewer than k) are dropped. L2 sorts ascending, inner
    product descending; ties go to the smaller id.
    """
    distances = np.concatenate([np.asarray(d, dtype=np.float32) for d, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in parts], axis=1)
    key = distances if metric == "l2" else -distances
    key = np.where(ids < 0, np.inf, key)
    order = np.lexsort((ids, key), axis=1)[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_d = np.take_along_axis(distances, order, axis=1)
    empty = np.take_along_axis(key, order, axis=1) == np.inf
    top_ids[empty] = -1
    top_d[empty] = np.inf if metric == "l2" else -np.inf
    if top_ids.shape[1] < k:  # fewer candidates than k in total
        pad = k - top_ids.shape[1]
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
        top_d = np.pad(top_d, ((0, 0), (0, pad)), constant_values=np.inf if metric == "l2" else -np.inf)
    return top_d, top_ids


def exact_distances(queries: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """(n, m) distances of each query to its own m vectors (n, m, d), as Faiss reports them."""
    if metric == "l2":
        return ((vectors - queries[:, None, :]) ** 2).sum(-1, dtype=np.float32)
    return np.einsum("nd,nmd->nm", queries, vectors, dtype=np.float32)


@contextlib.contextmanager
def faiss_chatter_to_stderr():
    """Faiss's C++ code prints notes (on-disk list paths, resizing) to file descriptor 1;
    a server's stdout carries its one parseable 'serving ... on host:port' line."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def read_shard_index(path: Path, on_disk: bool) -> faiss.Index:
    """Load a shard, memory-mapped where the index type allows it. On-disk inverted lists
    are memory-mapped by Faiss itself and found next to the shard file wherever the index
    directory has moved (mapping the shard file too crashes Faiss 1.15 at search time)."""
    if on_disk:
        with faiss_chatter_to_stderr():
            return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    for flags in (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY):
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
    return faiss.read_index(str(path))


def search_parameters(index: faiss.Index, knobs: SearchKnobs):
    """Faiss per-call parameters for nprobe (IVF) and efSearch (HNSW), through a
    pre-transform (OPQ, PCA) when there is one; None when the index has neither knob."""
    inner = faiss.downcast_index(index)
    wrapped = isinstance(inner, faiss.IndexPreTransform)
    if wrapped:
        inner = faiss.downcast_index(inner.index)
    params = None
    if knobs.nprobe is not None and faiss.try_extract_index_ivf(inner) is not None:
        params = faiss.SearchParametersIVF(nprobe=knobs.nprobe)
    elif knobs.ef_search is not None and isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=knobs.ef_search)
    if params is not None and wrapped:
        params = faiss.SearchParametersPreTransform(index_params=params)
    return params


class ShardSearcher:
    """One loaded shard answering in global ids."""

    def __init__(self, index_dir: Path, manifest: Manifest, shard: ShardInfo, stored: np.ndarray | None):
        self.shard, self.metric, self.stored = shard, manifest.metric, stored
        self.index = read_shard_index(Path(index_dir) / shard.file.file, shard.ivfdata is not None)
        if self.index.ntotal != shard.count:
            raise RuntimeError(f"{shard.file.file}: holds {self.index.ntotal} vectors, manifest says {shard.count}")
        self._direct_map = threading.Lock()

    def search(self, queries: np.ndarray, k: int, knobs: SearchKnobs) -> tuple[np.ndarray, np.ndarray]:
        k_local = min(k, self.shard.count)
        refine = self.stored is not None and knobs.refine_factor
        fetch = min(self.shard.count, k_local * knobs.refine_factor) if refine else k_local
        distances, local = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch,
                                             params=search_parameters(self.index, knobs))
        ids = np.where(local >= 0, local + self.shard.start, -1)
        if not refine:
            return distances, ids
        rows = self.stored[np.where(ids >= 0, ids, 0).ravel()].astype(np.float32).reshape(*ids.shape, -1)
        exact = exact_distances(queries, rows, self.metric)
        exact[ids < 0] = np.inf if self.metric == "l2" else -np.inf
        return merge_topk([(exact, ids)], k_local, self.metric)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray | None:
        """Exact vectors of global ids when the shard's storage is exact, else None."""
        index = faiss.downcast_index(self.index)
        if not isinstance(index, _EXACT_STORAGE):
            return None
        if isinstance(index, faiss.IndexIVFFlat):
            with self._direct_map:  # built once, on the first request; concurrent ones wait for it
                if index.direct_map.type == faiss.DirectMap.NoMap:
                    index.make_direct_map()
        return index.reconstruct_batch(np.asarray(ids, dtype=np.int64) - self.shard.start)


def open_corpus(index_dir: Path | str, manifest: Manifest, corpus_root: Path | None) -> CorpusStore:
    table = np.load(Path(index_dir) / manifest.doc_table.file, mmap_mode="r")
    return CorpusStore(manifest.corpus, table, manifest.corpus_dir(corpus_root))


def open_stored_vectors(index_dir: Path | str, manifest: Manifest) -> np.ndarray | None:
    return np.load(Path(index_dir) / manifest.vectors.file, mmap_mode="r") if manifest.vectors else None


def owned_mask(searchers: Sequence[ShardSearcher], ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` fall in the ranges of the shards held here."""
    owned = np.zeros(len(ids), dtype=bool)
    for searcher in searchers:
        owned |= (ids >= searcher.shard.start) & (ids < searcher.shard.end)
    return owned


def vectors_from(searchers: Sequence[ShardSearcher], stored: np.ndarray | None, ids: Sequence[int]
                 ) -> tuple[np.ndarray | None, str]:
    """Vectors of ``ids`` from stored float16 copies or exact shard storage; (None, "none")
    when the index keeps only lossy codes (the caller re-embeds the texts)."""
    ids = np.asarray(ids, dtype=np.int64)
    owned = owned_mask(searchers, ids)
    if not owned.all():
        raise IndexError(f"vector ids not in this index (or this server): {ids[~owned][:10].tolist()}")
    if stored is not None:
        return stored[ids].astype(np.float32), "stored-f16"
    out = np.empty((len(ids), searchers[0].index.d), dtype=np.float32)
    for searcher in searchers:
        mask = (ids >= searcher.shard.start) & (ids < searcher.shard.end)
        if mask.any():
            rows = searcher.reconstruct(ids[mask])
            if rows is None:
                return None, "none"
            out[mask] = rows
    return out, "exact"


class LocalIndex:
    """All shards of an index in this process: exact global top-k plus texts and vectors
    (a ``KnnIndex``). The default, serverless backend; opening verifies the manifest
    against the files."""

    def __init__(self, index_dir: Path | str, options: IndexOptions = IndexOptions()):
        self.index_dir = Path(index_dir)
        self.options = options
        self.manifest = Manifest.load(self.index_dir)
        self.manifest.verify(self.index_dir, corpus_root=options.corpus_root)
        self.stored = open_stored_vectors(self.index_dir, self.manifest)
        self.shards = [ShardSearcher(self.index_dir, self.manifest, s, self.stored) for s in self.manifest.shards]
        self.corpus = open_corpus(self.index_dir, self.manifest, options.corpus_root)
        self.knobs = knobs_of(options).over(index_defaults(self.manifest))

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        queries = check_queries(queries, k, self.manifest.dim, self.options.max_k)
        distances, ids = merge_topk([s.search(queries, k, self.knobs) for s in self.shards], k, self.manifest.metric)
        return SearchResult(ids=ids, distances=distances, missing_shards=[[] for _ in range(len(ids))])

    def texts(self, ids: Sequence[int]) -> list[str | None]:
        return self.corpus.texts(ids)

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray | None, str]:
        return vectors_from(self.shards, self.stored, ids)

    def close(self) -> None:
        self.corpus.close()
