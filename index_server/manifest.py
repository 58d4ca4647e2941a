"""The index manifest: what an index was built from, and the checks run before searching.

An index directory holds ``manifest.json``, ``docs.npy`` (the corpus document table), one
Faiss file per shard, and optionally more files a layout needs (``vectors.f16.npy`` for
exact re-ranking, ``*.ivfdata`` for on-disk inverted lists). Every one of them is listed
with its size, sha256 and sampled fingerprint, so a truncated, swapped or copied-over file
is caught by the quick check on open, and ``--full`` re-hashes everything.

The manifest's ``identity`` is a hash over everything that decides search results (encoder,
dims, metric, factory, corpus checksums, shard ranges, file checksums), so a shard server and
a client can tell in one comparison whether they belong to the same index. Corpus paths are
relative to ``corpus_root`` (recorded at build time, remappable on open), so the identity of
an index does not change when it moves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .corpus import CorpusChangedError, CorpusFile
from .digest import file_digests, file_fingerprint, file_sha256

MANIFEST_NAME = "manifest.json"
DOC_TABLE_NAME = "docs.npy"
FORMAT_VERSION = 2
METRICS = ("l2", "ip")


class ManifestMismatchError(RuntimeError):
    """A shard, corpus or encoder does not belong to the index the caller expects."""


@dataclass(frozen=True)
class FileInfo:
    """An index file and its checksums."""

    file: str
    size: int
    sha256: str
    fingerprint: str

    @classmethod
    def of(cls, directory: Path, name: str) -> FileInfo:
        size, sha, quick = file_digests(Path(directory) / name)
        return cls(name, size, sha, quick)

    def check(self, directory: Path, what: str, full: bool = False) -> None:
        path = Path(directory) / self.file
        if not path.is_file():
            raise ManifestMismatchError(f"{path}: {what} file is missing")
        size = path.stat().st_size
        if size != self.size:
            raise ManifestMismatchError(f"{path}: {what} is {size} bytes, the manifest says {self.size} (truncated or "
                                        f"replaced)")
        if file_fingerprint(path) != self.fingerprint:
            raise ManifestMismatchError(f"{path}: {what} contents differ from the manifest (swapped or modified)")
        if full and file_sha256(path) != self.sha256:
            raise ManifestMismatchError(f"{path}: {what} sha256 differs from the manifest")


@dataclass(frozen=True)
class ShardInfo:
    index: int
    file: FileInfo
    start: int  # first global vector id held by the shard
    end: int  # one past the last
    ivfdata: FileInfo | None = None  # on-disk inverted lists of this shard

    @property
    def count(self) -> int:
        return self.end - self.start

    def files(self) -> list[FileInfo]:
        return [self.file] + ([self.ivfdata] if self.ivfdata else [])


@dataclass(frozen=True)
class Manifest:
    encoder: dict
    dim: int
    metric: str
    factory: str
    n_vectors: int
    empty_documents: int
    corpus_root: str  # where the corpus lay at build time; corpus paths are relative to it
    corpus: list[CorpusFile]
    doc_table: FileInfo
    shards: list[ShardInfo]
    vectors: FileInfo | None = None  # float16 copy of every vector (exact re-ranking, SIFT)
    layout: dict = field(default_factory=dict)  # on_disk, refine, build options
    format_version: int = FORMAT_VERSION
    identity: str = field(default="", compare=False)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        object.__setattr__(self, "identity", self.compute_identity())

    def compute_identity(self) -> str:
        body = self.to_dict()
        body.pop("identity")
        body.pop("corpus_root")  # the same corpus may be mounted elsewhere on another machine
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
            if raw.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {raw.get('format_version')} != {FORMAT_VERSION} (rebuild the index "
                                 f"with this version of ttt-index)")
            recorded = raw.pop("identity", None)

            def info(d):
                return FileInfo(**d) if d is not None else None

            manifest = cls(
                **{k: v for k, v in raw.items() if k not in ("corpus", "shards", "doc_table", "vectors")},
                corpus=[CorpusFile(**c) for c in raw["corpus"]],
                doc_table=info(raw["doc_table"]),
                vectors=info(raw.get("vectors")),
                shards=[ShardInfo(**{**s, "file": info(s["file"]), "ivfdata": info(s.get("ivfdata"))})
                        for s in raw["shards"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestMismatchError(f"{source}: not a valid ttt-nn index manifest: {e}") from e
        manifest._check_paths_confined(source)
        if recorded and recorded != manifest.identity:
            raise ManifestMismatchError(f"{source}: identity field does not match its contents")
        return manifest

    def _check_paths_confined(self, source: str) -> None:
        """Refuse a manifest that names files outside its own directories.

        Index files are bare names inside the index directory and corpus paths are relative to the
        corpus root without ``..``: a hand-edited or hostile manifest must not make ``verify`` or a
        server open files outside the index directory and the corpus root (``corpus_root`` itself
        is the operator's to set: ``--corpus-root`` remaps it)."""
        index_files = [self.doc_table] + ([self.vectors] if self.vectors else [])
        index_files += [f for shard in self.shards for f in shard.files()]
        for info in index_files:
            name = info.file
            if not isinstance(name, str) or not name or name != PurePosixPath(name).name or name in (".", ".."):
                raise ManifestMismatchError(f"{source}: index file {info.file!r} is not a plain file name inside "
                                            f"the index directory")
        for corpus_file in self.corpus:
            if not isinstance(corpus_file.path, str):
                raise ManifestMismatchError(f"{source}: corpus path {corpus_file.path!r} is not a string")
            path = PurePosixPath(corpus_file.path)
            if not corpus_file.path or path.is_absolute() or ".." in path.parts or "\\" in corpus_file.path:
                raise ManifestMismatchError(f"{source}: corpus path {corpus_file.path!r} is not relative to the "
                                            f"corpus root (absolute or with '..')")

    @classmethod
    def load(cls, index_dir: Path | str) -> Manifest:
        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise FileNotFoundError(f"{index_dir}: no such index directory")
        path = index_dir / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no index manifest (build one with `ttt-index build`)")
        return cls.from_json(path.read_text(), source=str(path))

    def save(self, index_dir: Path) -> None:
        (Path(index_dir) / MANIFEST_NAME).write_text(self.to_json() + "\n")

    def corpus_dir(self, corpus_root: Path | str | None = None) -> Path:
        return Path(corpus_root) if corpus_root is not None else Path(self.corpus_root)

    def verify(self, index_dir: Path | str, full: bool = False, shards: list[int] | None = None,
               corpus_root: Path | str | None = None) -> None:
        """Check corpus and index files against the manifest.

        Quick by default (sizes plus head/middle/tail hashes of every file); ``full``
        re-hashes every corpus and index file. ``shards`` limits the shard files checked
        (a server checks only those it serves).
        """
        root = self.corpus_dir(corpus_root)
        try:
            for corpus_file in self.corpus:
                corpus_file.check(root, full=full)
        except CorpusChangedError as e:
            raise ManifestMismatchError(str(e)) from e
        self.doc_table.check(index_dir, "document table", full)
        if self.vectors is not None:
            self.vectors.check(index_dir, "stored vectors", full)
        for shard in self.shards if shards is None else [self.shards[i] for i in shards]:
            for info in shard.files():
                info.check(index_dir, f"shard {shard.index}", full)

    def shard_of(self, vector_id: int) -> ShardInfo:
        for shard in self.shards:
            if shard.start <= vector_id < shard.end:
                return shard
        raise IndexError(f"vector id {vector_id} outside [0, {self.n_vectors})")
