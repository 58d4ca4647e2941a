"""Neighbours of a document: retrieval, the neighbour cache, filters and selection.

The harness models only see ``Retriever.neighbours(text, k) -> Neighbours`` (and
``prefetch`` to retrieve a whole rank's documents up front in batches). The retriever holds a
``KnnIndex`` (``index_server.index``: opened by ``open_index`` with every option, so the
model never knows which backend answers or how shards lie on disk) and an encoder with
``encode(texts) -> float32 rows`` (by default the one the index manifest names; tests
inject small fakes of both).

Stages: candidates (the index's top K, cached on disk per query: neighbours do not depend on
the LM, so one retrieval serves every model, k and selector) -> filters (ids excluded by the
caller, ``max_distance``, near-duplicates of the query) -> selection (``nearest`` or
``sift``, see ``selection.py``) -> texts of the selected neighbours. A degraded answer (a
shard down under ``failure_policy=degrade``) is returned with its missing shards and never
cached.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from index_server.encoder import encoder_of
from index_server.index import KnnIndex, open_index

from .documents import text_key
from .jsonl import append_record, lock_for, read_records
from .selection import STOP_DISTANCE, STOP_EXHAUSTED, STOP_K, STOP_NONE, Selection, select_sift, sigmas_of
from .settings import NeighbourSettings

# Two texts are near-exact copies when this fraction of their word 5-grams is shared
# (Jaccard). Catches the same file with edited whitespace, headers or a few lines changed.
DUPLICATE_JACCARD = 0.8
_SHINGLE = 5


class RetrievalError(RuntimeError):
    """Retrieval failed for a document; never silently treated as 'no neighbours'."""


@dataclass
class Neighbours:
    ids: list[int]  # in training order; SIFT may repeat an id
    distances: list[float]
    texts: list[str]
    sigmas: list[float] | None = None  # the query's posterior std after each step (None: no vectors)
    stop_reason: str = STOP_NONE
    candidates: int = 0
    missing_shards: list[int] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)  # near-duplicates and excluded ids
    cached: bool = False
    vectors: str | None = None  # where candidate vectors came from

    def record(self) -> dict:
        """The fields of a per-document log record that describe the neighbours."""
        return {"neighbour_ids": self.ids, "distances": self.distances, "sigmas": self.sigmas,
                "stop_reason": self.stop_reason, "candidates": self.candidates,
                "missing_shards": self.missing_shards, "excluded": self.excluded, "vectors": self.vectors}


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\S+", text)
    return {tuple(words[i : i + _SHINGLE]) for i in range(max(1, len(words) - _SHINGLE + 1))}


def is_near_duplicate(a: str, b: str, threshold: float = DUPLICATE_JACCARD) -> bool:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / max(1, len(sa | sb)) >= threshold


def _pack(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _unpack(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


@dataclass
class Candidates:
    ids: list[int]
    distances: list[float]
    query: np.ndarray
    missing_shards: list[int]
    cached: bool


class NeighbourCache:
    """Append-only JSONL of raw retrievals for one index and search setting:
    query hash -> (K, ids, distances, query vector). Safe with several writers."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict] = {}
        self.reload()

    def reload(self) -> None:
        for entry in read_records(self.path):
            if entry.get("k", -1) >= self._entries.get(entry.get("key"), {"k": -1})["k"]:
                self._entries[entry["key"]] = entry

    def get(self, key: str, k: int) -> Candidates | None:
        entry = self._entries.get(key)
        if entry is None or entry["k"] < k:
            return None
        return Candidates(entry["ids"][:k], entry["distances"][:k], _unpack(entry["query"]), [], True)

    def query(self, key: str) -> np.ndarray | None:
        """The query vector of a cached retrieval of ``key`` (at any k), or None."""
        entry = self._entries.get(key)
        return _unpack(entry["query"]) if entry is not None else None

    def put(self, key: str, k: int, found: Candidates) -> None:
        entry = {"key": key, "k": k, "ids": found.ids, "distances": found.distances, "query": _pack(found.query)}
        self._entries[key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with lock_for(self.path):
            append_record(self.path, entry)


class Retriever:
    """Neighbours from an open index, chosen as ``settings`` (``NeighbourSettings``) say."""

    def __init__(self, index: KnnIndex, settings: NeighbourSettings, cache_dir: Path | None = None,
                 device: str = "cpu", encoder=None):
        self.index = index
        self.config = settings
        self.manifest = index.manifest
        if settings.max_distance is not None and self.manifest.metric != "l2":
            raise ValueError("max_distance needs an l2 index (this one ranks by inner product)")
        if encoder is None:
            encoder = encoder_of(self.manifest.encoder, device=device)
        self.encoder = encoder
        # The search settings in effect that change an approximate index's answers (Flat: none).
        knobs = index.knobs
        ivf, hnsw = "IVF" in self.manifest.factory, "HNSW" in self.manifest.factory
        self.signature = {"identity": self.manifest.identity, "nprobe": knobs.nprobe if ivf else None,
                          "ef_search": knobs.ef_search if hnsw else None,
                          "refine_factor": knobs.refine_factor if self.manifest.vectors else None}
        # Flat and IVF answer a smaller k with a prefix of a larger k's answer, so one retrieval
        # serves every k below it. HNSW (efSearch at least k) and exact re-ranking (k x
        # refine_factor candidates) search differently per k: their retrievals are kept per k.
        self._prefix_safe = not hnsw and not self.signature["refine_factor"]
        self.cache = None
        if cache_dir is not None:
            suffix = hashlib.sha256(json.dumps(self.signature, sort_keys=True).encode()).hexdigest()[:8]
            self.cache = NeighbourCache(Path(cache_dir) / f"{self.manifest.identity}-{suffix}.jsonl")
        self._queries: dict[str, Candidates] = {}  # this process's retrievals, cached or not
        self._query_vectors: dict[str, np.ndarray] = {}  # text key -> the vector it was (or will be) searched with

    @classmethod
    def open(cls, settings: NeighbourSettings, cache_dir: Path | None = None, device: str = "cpu") -> Retriever:
        """The index ``settings.index`` opened with every option of ``settings``."""
        if settings.index is None:
            raise ValueError("no index given")
        return cls(open_index(settings.index, settings.index_options()), settings, cache_dir, device)

    def fetch_k(self, k: int, excluded: int = 0) -> int:
        """Candidates to retrieve for k neighbours: K for SIFT, else k plus room for filters."""
        if self.config.select == "sift":
            return max(self.config.candidates, excluded + 1)
        margin = max(5, k // 2) if self.config.exclude_duplicates else 0
        return k + margin + excluded

    # -- candidates -----------------------------------------------------------------------
    def _slot(self, key: str, k: int) -> str:
        return key if self._prefix_safe else f"{key}@{k}"

    def _lookup(self, key: str, k: int) -> Candidates | None:
        slot = self._slot(key, k)
        found = self._queries.get(slot)
        if found is None or len(found.ids) < min(k, self.manifest.n_vectors):
            found = self.cache.get(slot, k) if self.cache else None
        if found is not None:
            self._query_vectors.setdefault(key, found.query)
        return found

    def _store(self, key: str, k: int, found: Candidates) -> None:
        self._query_vectors.setdefault(key, found.query)
        key = self._slot(key, k)
        self._queries[key] = found
        if self.cache and not found.missing_shards:  # never cache a degraded answer
            self.cache.put(key, k, found)

    def _search(self, keys: list[str], texts: list[str], k: int) -> list[Candidates]:
        vectors = self.encoder.encode(texts)
        result = self.index.search(vectors, min(k, self.manifest.n_vectors))
        out = []
        for key, vector, ids, distances, missing in zip(keys, vectors, result.ids, result.distances,
                                                         result.missing_shards):
            keep = ids >= 0
            found = Candidates(ids[keep].tolist(), distances[keep].tolist(), vector, list(missing), False)
            self._store(key, k, found)
            out.append(found)
        return out

    def prefetch(self, texts: list[str], k: int, batch: int = 64, progress: bool = True) -> dict:
        """Retrieve every uncached query up front: one embedding batch and one search call
        (to every shard) per ``batch`` queries. Returns counts and seconds."""
        start = time.perf_counter()
        todo: dict[str, str] = {}
        for text in texts:
            key = text_key(text)
            if key not in todo and self._lookup(key, k) is None:
                todo[key] = text
        keys = list(todo)
        with tqdm(total=len(keys), desc="retrieve neighbours", unit="query", disable=not progress or not keys) as bar:
            for i in range(0, len(keys), batch):
                chunk = keys[i : i + batch]
                try:
                    self._search(chunk, [todo[key] for key in chunk], k)
                except Exception as e:
                    raise RetrievalError(f"retrieval failed for a batch of {len(chunk)} queries: {e}") from e
                bar.update(len(chunk))
        return {"queries": len(set(map(text_key, texts))), "searched": len(keys),
                "seconds": time.perf_counter() - start}

    def query_vector(self, text: str) -> np.ndarray:
        """The embedding retrieval searches with for ``text``: that of its retrieval (in this
        process or the neighbour cache, at any k), else encoded now and kept, so a document
        gets the same vector however it was retrieved before."""
        key = text_key(text)
        if key not in self._query_vectors:
            cached = self.cache.query(key) if self.cache else None  # kept per k (key@k) where k changes the search
            self._query_vectors[key] = cached if cached is not None else self.encoder.encode([text])[0]
        return self._query_vectors[key]

    def candidates(self, text: str, k: int) -> Candidates:
        key = text_key(text)
        return self._lookup(key, k) or self._search([key], [text], k)[0]

    # -- neighbours -----------------------------------------------------------------------
    def _missing_of(self, ids: list[int]) -> list[int]:
        return sorted({self.manifest.shard_of(i).index for i in ids})

    def _nearest(self, text: str, found: Candidates, ids: list[int], distances: list[float], k: int,
                 out: Neighbours) -> None:
        for start in range(0, len(ids), max(k, 1)):
            window = list(range(start, min(len(ids), start + max(k, 1))))
            texts = self.index.texts([ids[i] for i in window])
            for i, neighbour in zip(window, texts):
                if len(out.ids) == k:
                    break
                if neighbour is None:
                    out.missing_shards = sorted(set(out.missing_shards) | set(self._missing_of([ids[i]])))
                elif self.config.exclude_duplicates and is_near_duplicate(text, neighbour):
                    out.excluded.append(ids[i])
                else:
                    out.ids.append(ids[i])
                    out.distances.append(distances[i])
                    out.texts.append(neighbour)
            if len(out.ids) == k:
                break
        if out.ids:
            vectors, out.vectors = self._vectors(out.ids, out.texts)
            out.sigmas = sigmas_of(found.query, vectors, list(range(len(out.ids))), self.config.sift_lambda)

    def _vectors(self, ids: list[int], texts: list[str | None] | None = None) -> tuple[np.ndarray, str]:
        """Embedding vectors of ids: from the index when it keeps them exactly (or as float16
        copies), else the texts re-embedded with the index's encoder."""
        vectors, source = self.index.vectors(ids)
        if vectors is None:  # lossy codes (PQ)
            texts = texts if texts is not None else self.index.texts(ids)
            if any(t is None for t in texts):
                raise RetrievalError("cannot re-embed neighbours on a shard that is down")
            vectors, source = self.encoder.encode(texts), "re-embedded"
        return vectors, source

    def _sift(self, text: str, found: Candidates, ids: list[int], distances: list[float], k: int,
              out: Neighbours) -> None:
        if not ids:
            out.stop_reason = STOP_NONE
            return
        vectors, out.vectors = self._vectors(ids)
        active = list(range(len(ids)))
        while True:  # every round drops at least one candidate, so this ends
            picked: Selection = select_sift(found.query, vectors[active], k, self.config.sift_lambda,
                                            self.config.alpha)
            order = [active[j] for j in picked.order]
            unique = sorted(set(order))
            texts = dict(zip(unique, self.index.texts([ids[i] for i in unique])))
            bad = {i for i, t in texts.items() if t is None
                   or (self.config.exclude_duplicates and is_near_duplicate(text, t))}
            if not bad:
                break
            for i in bad:
                if texts[i] is None:
                    out.missing_shards = sorted(set(out.missing_shards) | set(self._missing_of([ids[i]])))
                else:
                    out.excluded.append(ids[i])
            active = [i for i in active if i not in bad]
        out.ids = [ids[i] for i in order]
        out.distances = [distances[i] for i in order]
        out.texts = [texts[i] for i in order]
        out.sigmas, out.stop_reason = picked.sigmas, picked.stop_reason

    def neighbours(self, text: str, k: int, exclude_ids: frozenset[int] | set[int] = frozenset()) -> Neighbours:
        """Up to k neighbours of ``text`` in training order, with how they were chosen."""
        if k <= 0:
            return Neighbours([], [], [], stop_reason=STOP_K)
        try:
            found = self.candidates(text, self.fetch_k(k, len(exclude_ids)))
            out = Neighbours([], [], [], candidates=len(found.ids), missing_shards=list(found.missing_shards),
                             cached=found.cached, excluded=[i for i in found.ids if i in exclude_ids])
            pairs = [(i, d) for i, d in zip(found.ids, found.distances) if i not in exclude_ids]
            limit = self.config.max_distance
            near = [(i, d) for i, d in pairs if limit is None or d <= limit]
            ids, distances = [i for i, _ in near], [d for _, d in near]
            if self.config.select == "sift":
                self._sift(text, found, ids, distances, k, out)
            else:
                self._nearest(text, found, ids, distances, k, out)
                out.stop_reason = STOP_K if len(out.ids) == k else STOP_EXHAUSTED if ids else STOP_NONE
            if len(near) < len(pairs) and out.stop_reason in (STOP_EXHAUSTED, STOP_NONE):
                out.stop_reason = STOP_DISTANCE  # fewer than k because of the distance cut
            return out
        except RetrievalError:
            raise
        except Exception as e:
            raise RetrievalError(f"retrieval failed for document {text_key(text)[:12]}: {e}") from e

    def close(self) -> None:
        self.index.close()
