"""Test doubles of the retrieval seams: an encoder and a ``KnnIndex`` that answer in
microseconds, so retrieval, selection, filters, logs, resume and report logic are tested
without MiniLM or Faiss. Real end-to-end runs use the real ones."""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

from index_server.manifest import FileInfo, Manifest, ShardInfo
from index_server.options import MAX_K
from index_server.search import SearchKnobs, SearchResult, check_queries, merge_topk


class FakeEncoder:
    """Hashed bag of words, rows normalised: texts that share words get near vectors."""

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text[:4000]):
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)


def _file(name: str) -> FileInfo:
    return FileInfo(name, 0, "", "")


class FakeIndex:
    """A ``KnnIndex`` over texts in memory: exact search over their encoder vectors, the
    shards' answers merged by the real ``merge_topk``. ``down`` holds shards that do not
    answer (as under ``failure_policy=degrade``); ``lossy`` hides the vectors (as PQ codes)."""

    def __init__(self, texts: Sequence[str], encoder: FakeEncoder | None = None, shards: int = 1,
                 metric: str = "l2", lossy: bool = False, factory: str = "Flat"):
        self.encoder = encoder or FakeEncoder()
        self.documents = list(texts)
        self.data = self.encoder.encode(self.documents)
        bounds = np.linspace(0, len(self.documents), shards + 1).round().astype(int)
        self.manifest = Manifest(
            encoder={"name_or_path": "fake", "max_tokens": 0, "pooling": "hashed words"}, dim=self.encoder.dim,
            metric=metric, factory=factory, n_vectors=len(self.documents), empty_documents=0, corpus_root="",
            corpus=[], doc_table=_file("docs.npy"),
            shards=[ShardInfo(i, _file(f"shard-{i}.faiss"), int(a), int(b)) for i, (a, b) in
                    enumerate(zip(bounds[:-1], bounds[1:]))])
        self.knobs = SearchKnobs()
        self.lossy = lossy
        self.down: set[int] = set()
        self.calls: Counter = Counter()
        self.closed = False

    def _live(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.manifest.shard_of(int(i)).index not in self.down for i in ids], dtype=bool)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        assert not self.closed, "search on a closed index"
        self.calls["search"] += 1
        queries = check_queries(queries, k, self.manifest.dim, MAX_K)
        ids = np.arange(len(self.data))
        if self.manifest.metric == "l2":
            distances = ((queries[:, None, :] - self.data[None]) ** 2).sum(-1)
        else:
            distances = queries @ self.data.T
        live = self._live(ids)
        distances, top = merge_topk([(distances[:, live], np.broadcast_to(ids[live], (len(queries), live.sum())))],
                                    k, self.manifest.metric)
        return SearchResult(top, distances, [sorted(self.down) for _ in range(len(queries))])

    def texts(self, ids: Sequence[int]) -> list[str | None]:
        self.calls["texts"] += 1
        return [self.documents[int(i)] if live else None for i, live in zip(ids, self._live(np.asarray(ids)))]

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray | None, str]:
        self.calls["vectors"] += 1
        if self.lossy or not self._live(np.asarray(ids)).all():
            return None, "none"
        return self.data[np.asarray(ids, dtype=np.int64)], "exact"

    def close(self) -> None:
        self.closed = True
