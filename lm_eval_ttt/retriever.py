"""One retriever over two backends: the in-process index (default) or gRPC shard servers.

The harness model only sees ``Retriever.retrieve(text, k) -> Neighbours``. Queries are
embedded here, once, with the encoder the index manifest names, so the model never needs to
know which backend answers or how the shards are laid out. Neighbour ids are cached on disk
(``NeighbourCache``): neighbours do not depend on the LM, so one retrieval serves every model
and every smaller k.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from index_server.client import ClientConfig, GrpcIndex, parse_addresses
from index_server.encoder import EncoderConfig, TextEncoder
from index_server.search import LocalIndex

# Two texts are near-exact copies when this fraction of their word 5-grams is shared
# (Jaccard). Catches the same file with edited whitespace, headers or a few lines changed.
DUPLICATE_JACCARD = 0.8
_SHINGLE = 5


class RetrievalError(RuntimeError):
    """Retrieval failed for a document; never silently treated as 'no neighbours'."""


@dataclass
class Neighbours:
    ids: list[int]
    distances: list[float]
    texts: list[str]
    missing_shards: list[int] = field(default_factory=list)
    excluded_duplicates: list[int] = field(default_factory=list)
    cached: bool = False


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\S+", text)
    return {tuple(words[i : i + _SHINGLE]) for i in range(max(1, len(words) - _SHINGLE + 1))}


def is_near_duplicate(a: str, b: str, threshold: float = DUPLICATE_JACCARD) -> bool:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / max(1, len(sa | sb)) >= threshold


class NeighbourCache:
    """Append-only JSONL of raw retrievals for one index identity: (query hash, k) -> ids."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict] = {}
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        entry = json.loads(line)
                        if entry["k"] >= self._entries.get(entry["key"], {"k": -1})["k"]:
                            self._entries[entry["key"]] = entry

    def get(self, key: str, k: int) -> tuple[list[int], list[float]] | None:
        entry = self._entries.get(key)
        if entry is None or entry["k"] < k:
            return None
        return entry["ids"][:k], entry["distances"][:k]

    def put(self, key: str, k: int, ids: list[int], distances: list[float]) -> None:
        entry = {"key": key, "k": k, "ids": ids, "distances": distances}
        self._entries[key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


@dataclass(frozen=True)
class RetrieverConfig:
    index: str  # index directory, or grpc://host:port,host:port
    failure_policy: str = "fail"
    timeout_s: float = 30.0
    cache_dir: Path | None = None
    exclude_duplicates: bool = False
    device: str = "cpu"


class Retriever:
    def __init__(self, config: RetrieverConfig):
        self.config = config
        if config.index.startswith("grpc://"):
            self.backend = GrpcIndex(
                ClientConfig(parse_addresses(config.index), timeout_s=config.timeout_s, failure_policy=config.failure_policy)
            )
        else:
            self.backend = LocalIndex(config.index)
        self.manifest = self.backend.manifest
        encoder = self.manifest.encoder
        self.encoder = TextEncoder(EncoderConfig(encoder["name_or_path"], encoder["max_tokens"]), device=config.device)
        self.cache = NeighbourCache(config.cache_dir / f"{self.manifest.identity}.jsonl") if config.cache_dir else None

    def _search(self, text: str, k: int) -> tuple[list[int], list[float], list[int], bool]:
        key = text_key(text)
        hit = self.cache.get(key, k) if self.cache else None
        if hit is not None:
            return hit[0], hit[1], [], True
        result = self.backend.search(self.encoder.encode([text]), k)
        keep = result.ids[0] >= 0
        ids, distances = result.ids[0][keep].tolist(), result.distances[0][keep].tolist()
        missing = result.missing_shards[0] if result.missing_shards else []
        if self.cache and not missing:  # never cache a degraded answer
            self.cache.put(key, k, ids, distances)
        return ids, distances, missing, False

    def retrieve(self, text: str, k: int) -> Neighbours:
        """The k nearest neighbours of ``text``, nearest first."""
        if k <= 0:
            return Neighbours([], [], [])
        # Excluding duplicates may drop a few: ask for a margin so k remain.
        fetch = k + max(5, k // 2) if self.config.exclude_duplicates else k
        try:
            ids, distances, missing, cached = self._search(text, fetch)
            texts = self.backend.texts(ids)
        except Exception as e:
            raise RetrievalError(f"retrieval failed for document {text_key(text)[:12]}: {e}") from e
        excluded = []
        if self.config.exclude_duplicates:
            kept = [i for i, t in enumerate(texts) if not is_near_duplicate(text, t)]
            excluded = [ids[i] for i in range(len(ids)) if i not in kept]
            ids, distances, texts = ([seq[i] for i in kept] for seq in (ids, distances, texts))
        return Neighbours(ids[:k], distances[:k], texts[:k], missing, excluded, cached)

    def close(self) -> None:
        self.backend.close()
