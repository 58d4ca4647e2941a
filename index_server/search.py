"""Searching shards: the exact top-k merge and the in-process index over all shards.

``merge_topk`` is the one place where per-shard answers become a global answer; the
in-process ``LocalIndex`` and the gRPC client both use it, which is why they agree to the
last bit. Order is nearest first with ties broken by the smaller global id, so the answer
does not depend on how many shards there are or which one answered first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .corpus import CorpusStore
from .manifest import DOC_TABLE_NAME, Manifest, ShardInfo


@dataclass
class SearchResult:
    """Global top-k for a batch of queries; rows padded with id -1 where fewer were found."""

    ids: np.ndarray  # (n, k) int64
    distances: np.ndarray  # (n, k) float32
    missing_shards: list[list[int]] = field(default_factory=list)  # per query, degrade mode


@dataclass(frozen=True)
class SearchParams:
    """Query-time knobs of approximate indexes (ignored by Flat)."""

    nprobe: int | None = None  # IVF: inverted lists visited per query
    ef_search: int | None = None  # HNSW: candidate list size


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


def read_shard_index(path: Path) -> faiss.Index:
    """Load a shard, memory-mapped where the index type allows it (IVF lists, flat codes)."""
    for flags in (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY):
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
    return faiss.read_index(str(path))


def apply_search_params(index: faiss.Index, params: SearchParams) -> None:
    space = faiss.ParameterSpace()
    if params.nprobe is not None:
        space.set_index_parameter(index, "nprobe", params.nprobe)
    if params.ef_search is not None:
        space.set_index_parameter(index, "efSearch", params.ef_search)


class ShardSearcher:
    """One loaded shard answering in global ids."""

    def __init__(self, index_dir: Path, shard: ShardInfo, params: SearchParams = SearchParams()):
        self.shard = shard
        self.index = read_shard_index(Path(index_dir) / shard.file)
        if self.index.ntotal != shard.count:
            raise RuntimeError(f"{shard.file}: holds {self.index.ntotal} vectors, manifest says {shard.count}")
        apply_search_params(self.index, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances, local = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.shard.count))
        return distances, np.where(local >= 0, local + self.shard.start, -1)


def open_corpus(index_dir: Path | str, manifest: Manifest) -> CorpusStore:
    table = np.load(Path(index_dir) / DOC_TABLE_NAME, mmap_mode="r")
    return CorpusStore(manifest.corpus, table)


class LocalIndex:
    """All shards of an index in this process: exact global top-k plus texts.

    The default, serverless backend. Opening verifies the manifest against the files.
    """

    def __init__(self, index_dir: Path | str, params: SearchParams = SearchParams()):
        self.index_dir = Path(index_dir)
        self.manifest = Manifest.load(self.index_dir)
        self.manifest.verify(self.index_dir)
        self.shards = [ShardSearcher(self.index_dir, s, params) for s in self.manifest.shards]
        self.corpus = open_corpus(self.index_dir, self.manifest)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        queries = np.atleast_2d(queries)
        if queries.shape[1] != self.manifest.dim:
            raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self.manifest.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        distances, ids = merge_topk([s.search(queries, k) for s in self.shards], k, self.manifest.metric)
        return SearchResult(ids=ids, distances=distances, missing_shards=[[] for _ in range(len(ids))])

    def texts(self, ids: Sequence[int]) -> list[str]:
        return self.corpus.texts(ids)

    def close(self) -> None:
        self.corpus.close()
