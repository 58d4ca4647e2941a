"""The index manifest: what an index was built from, and the checks run before searching.

An index directory holds ``manifest.json``, ``docs.npy`` (the corpus document table) and one
Faiss file per shard. The manifest's ``identity`` is a hash over everything that decides
search results (encoder, dims, metric, factory, corpus checksums, shard ranges), so a shard
server and a client can tell in one comparison whether they belong to the same index.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .corpus import CorpusFile, file_sha256

MANIFEST_NAME = "manifest.json"
DOC_TABLE_NAME = "docs.npy"
FORMAT_VERSION = 1
METRICS = ("l2", "ip")


class ManifestMismatchError(RuntimeError):
    """A shard, corpus or encoder does not belong to the index the caller expects."""


@dataclass(frozen=True)
class ShardInfo:
    index: int
    file: str
    start: int  # first global vector id held by the shard
    end: int  # one past the last
    sha256: str

    @property
    def count(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Manifest:
    encoder: dict
    dim: int
    metric: str
    factory: str
    n_vectors: int
    empty_documents: int
    corpus: list[CorpusFile]
    shards: list[ShardInfo]
    format_version: int = FORMAT_VERSION
    identity: str = field(default="", compare=False)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        object.__setattr__(self, "identity", self.compute_identity())

    def compute_identity(self) -> str:
        body = self.to_dict()
        body.pop("identity")
        for entry in body["corpus"]:
            entry.pop("path")  # the same corpus may be mounted elsewhere on another machine
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {raw.get('format_version')} != {FORMAT_VERSION}")
            recorded = raw.pop("identity", None)
            manifest = cls(
                **{k: v for k, v in raw.items() if k not in ("corpus", "shards")},
                corpus=[CorpusFile(**c) for c in raw["corpus"]],
                shards=[ShardInfo(**s) for s in raw["shards"]],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestMismatchError(f"{source}: not a valid ttt-nn index manifest: {e}") from e
        if recorded and recorded != manifest.identity:
            raise ManifestMismatchError(f"{source}: identity field does not match its contents")
        return manifest

    @classmethod
    def load(cls, index_dir: Path | str) -> Manifest:
        path = Path(index_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no index manifest (build one with `ttt-index build`)")
        return cls.from_json(path.read_text(), source=str(path))

    def save(self, index_dir: Path) -> None:
        (Path(index_dir) / MANIFEST_NAME).write_text(self.to_json() + "\n")

    def verify(self, index_dir: Path | str, full: bool = False, shards: list[int] | None = None) -> None:
        """Check that corpus files and shard files on disk are the ones recorded.

        Quick by default (corpus size + head/tail hash, shard sizes exist); ``full`` re-hashes
        every corpus and shard file.
        """
        for corpus_file in self.corpus:
            corpus_file.check(full=full)
        for shard in self.shards if shards is None else [self.shards[i] for i in shards]:
            path = Path(index_dir) / shard.file
            if not path.is_file():
                raise ManifestMismatchError(f"{path}: shard {shard.index} file is missing")
            if full and file_sha256(path) != shard.sha256:
                raise ManifestMismatchError(f"{path}: shard {shard.index} checksum differs from manifest")

    def shard_of(self, vector_id: int) -> ShardInfo:
        for shard in self.shards:
            if shard.start <= vector_id < shard.end:
                return shard
        raise IndexError(f"vector id {vector_id} outside [0, {self.n_vectors})")
