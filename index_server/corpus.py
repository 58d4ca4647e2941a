"""Pile-format JSONL corpus store: documents addressed by integer id, read lazily.

A corpus is one or more JSONL files, one document per line: ``{"text": ..., "meta": {...}}``.
The store never holds the texts in memory: the embedding step (``embed.scan_part``)
validates every line once with ``check_line`` and records a table of ``(file, line, byte
offset, byte length)`` per document; texts are then read with ``os.pread`` at those offsets,
so memory stays at ``DOC_TABLE_DTYPE.itemsize`` bytes per document whatever the corpus
size.

Why ``pread`` and not a memory map: a mapped file that is truncated or rewritten while a
server reads it kills the process with SIGBUS. Each read here first compares the file's
size and modification time with those seen when it was opened (one ``fstat``), so a corpus
edited in place becomes a ``CorpusChangedError`` naming the file.

Ids are the positions of *non-empty* documents in file order, so id ``i`` is row ``i`` of the
table and vector ``i`` of the index. Documents whose text is empty or whitespace-only cannot be
embedded meaningfully; they are counted (``empty_documents`` in the manifest) and left out.

Paths: a manifest records each file relative to the corpus root (the files' common parent
at build time), so an index and its corpus can move to another machine or mount point
together; ``corpus_root`` remaps them and the checksums still decide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .digest import chunked_sha256, file_fingerprint

DOC_TABLE_DTYPE = np.dtype(
    [("file", "<u4"), ("line", "<u8"), ("offset", "<u8"), ("length", "<u8")]
)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class CorpusFormatError(ValueError):
    """One or more malformed lines; each problem is reported as ``path:line: reason``."""

    def __init__(self, problems: Sequence[str], truncated: bool = False):
        self.problems = list(problems)
        more = "\n  ... (further problems not listed)" if truncated else ""
        super().__init__(
            "malformed corpus, nothing was written:\n  " + "\n  ".join(self.problems) + more
        )


class CorpusChangedError(RuntimeError):
    """The corpus on disk no longer matches the manifest of the index built from it."""


def resolve(path: str, root: Path | None) -> Path:
    """Where a corpus path recorded relative to the corpus root lies on this machine."""
    return Path(path) if root is None else Path(root) / path


@dataclass(frozen=True)
class CorpusFile:
    """Identity of one corpus file as recorded in an index manifest.

    ``path`` is relative to the corpus root. ``sha256`` is the sha256 of the hex sha256s of
    the file's chunks, which end at the byte offsets ``chunks`` (the embedding parts it was
    read in), so it is computed during the one read that embeds the corpus."""

    path: str
    size: int
    sha256: str
    fingerprint: str
    chunks: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "chunks", tuple(self.chunks))

    def resolve(self, root: Path | None) -> Path:
        return resolve(self.path, root)

    def check(self, root: Path | None, full: bool = False) -> None:
        """Raise ``CorpusChangedError`` if the file on disk is not the one that was indexed.

        The quick check (size + hash of the first, middle and last MiB) runs before every search
        session; ``full=True`` re-hashes the whole file.
        """
        path = self.resolve(root)
        if not path.is_file():
            raise CorpusChangedError(f"{path}: corpus file is missing (moved? pass --corpus-root / corpus_root= "
                                     f"with the directory that holds {self.path})")
        size = path.stat().st_size
        if size != self.size:
            raise CorpusChangedError(f"{path}: size {size} != {self.size} recorded at build time")
        if file_fingerprint(path) != self.fingerprint:
            raise CorpusChangedError(f"{path}: contents changed since the index was built")
        if full and chunked_sha256(path, self.chunks) != self.sha256:
            raise CorpusChangedError(f"{path}: sha256 differs from the one recorded at build time")


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str
    meta: dict
    path: str
    line: int


def json_problem(e: json.JSONDecodeError, line: str) -> str:
    """json's message as a sentence: its ``msg`` leaves the position out ("Unterminated string
    starting at"), so the column goes where the message expects it."""
    msg = e.msg[0].lower() + e.msg[1:]
    where = f"{msg} column {e.colno}" if msg.endswith(" at") else f"{msg} at column {e.colno}"
    return where + (" (a truncated line?)" if e.pos >= len(line.rstrip()) - 1 or msg.startswith("unterminated")
                    else "")


def check_line(raw: bytes) -> tuple[str | None, bool]:
    """Validate one JSONL line. Returns (problem or None, is_empty_document)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"byte offset {e.start} is not valid UTF-8 (0x{raw[e.start]:02x})", False
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON: {json_problem(e, line)}", False
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}", False
    if "text" not in record:
        return 'missing "text" field', False
    text = record["text"]
    if not isinstance(text, str):
        return f'"text" must be a string, got {type(text).__name__}', False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON escape such as "\ud800": valid JSON, not encodable text
        return (f'"text" holds a lone surrogate {text[e.start]!r} at character {e.start} '
                f"(not encodable as UTF-8; no tokenizer can read it)"), False
    if "meta" in record and not isinstance(record["meta"], (dict, type(None))):
        return '"meta" must be an object', False
    return None, not text.strip()


def refuse_compressed(path: Path) -> None:
    """Compressed corpora cannot be read at byte offsets: say so before any work, with the
    command that fixes it (the Pile ships as .jsonl.zst)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZSTD_MAGIC) or path.suffix == ".zst":
        raise CorpusFormatError([f"{path}: zstd-compressed; documents are read at byte offsets, so decompress "
                                 f"it first: zstd -d {path} -o {path.with_suffix('')}"])
    if head.startswith(_GZIP_MAGIC) or path.suffix == ".gz":
        raise CorpusFormatError([f"{path}: gzip-compressed; decompress it first: gunzip -k {path}"])


def corpus_root_of(paths: Sequence[Path]) -> Path:
    """The directory the manifest's relative paths start from: the files' common parent."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


class _OpenFile:
    """A corpus file opened for ``pread``, with the identity it had when opened (which must
    have the size recorded at build time)."""

    def __init__(self, path: Path, size: int):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorpusChangedError(f"{path}: corpus file is missing") from None
        st = os.fstat(self.fd)
        self.identity = (st.st_size, st.st_mtime_ns, st.st_ino)
        if st.st_size != size:
            os.close(self.fd)
            raise CorpusChangedError(f"{path}: size {st.st_size} != {size} recorded at build time")

    def read(self, offset: int, length: int) -> bytes:
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self.identity or offset + length > st.st_size:
            raise CorpusChangedError(f"{self.path}: corpus file changed while the index was being served "
                                     f"(size {self.identity[0]} -> {st.st_size}); restart on the indexed corpus")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise CorpusChangedError(f"{self.path}: short read at byte {offset} (file truncated?)")
        return data

    def close(self) -> None:
        os.close(self.fd)


class CorpusStore:
    """Random access to document texts through byte offsets into JSONL files. Every file is
    opened (and its size checked) up front; reads are thread-safe ``pread`` calls.

    ``files`` are a manifest's ``CorpusFile`` entries or an embedding run's source files:
    whatever records a ``path`` relative to ``root`` and a ``size``; ``table`` is the
    document table (``DOC_TABLE_DTYPE`` rows) of the documents it reads."""

    def __init__(self, files: Sequence[CorpusFile], table: np.ndarray, root: Path | None):
        self.files = list(files)
        self.table = table
        self.root = root
        self._open = [_OpenFile(resolve(f.path, root), f.size) for f in self.files]

    def __len__(self) -> int:
        return len(self.table)

    def path(self, file_idx: int) -> Path:
        return resolve(self.files[file_idx].path, self.root)

    def byte_length(self, doc_ids: Sequence[int]) -> int:
        """Bytes the given documents occupy on disk, known without reading them."""
        ids = np.asarray(doc_ids, dtype=np.int64)
        self._check_ids(ids)
        return int(self.table["length"][ids].sum())

    def _check_ids(self, ids: np.ndarray) -> None:
        bad = ids[(ids < 0) | (ids >= len(self.table))]
        if len(bad):
            raise IndexError(f"document id {int(bad[0])} out of range [0, {len(self.table)})")

    def _raw(self, doc_id: int) -> bytes:
        self._check_ids(np.asarray([doc_id]))
        row = self.table[doc_id]
        return self._open[int(row["file"])].read(int(row["offset"]), int(row["length"]))

    def _record(self, doc_id: int) -> dict:
        raw = self._raw(doc_id)
        try:
            record = json.loads(raw)
            record["text"]  # noqa: B018  (validated at build time: its absence means the file changed)
        except (ValueError, KeyError, TypeError) as e:
            row = self.table[doc_id]
            raise CorpusChangedError(f"{self.path(int(row['file']))}:{int(row['line'])}: no longer the document that "
                                     f"was indexed ({e}); the corpus changed since the build") from e
        return record

    def document(self, doc_id: int) -> Document:
        record = self._record(doc_id)
        row = self.table[doc_id]
        return Document(
            doc_id=doc_id,
            text=record["text"],
            meta=record.get("meta") or {},
            path=str(self.path(int(row["file"]))),
            line=int(row["line"]),
        )

    def text(self, doc_id: int) -> str:
        return self._record(doc_id)["text"]

    def texts(self, doc_ids: Sequence[int]) -> list[str]:
        return [self.text(int(i)) for i in doc_ids]

    def close(self) -> None:
        for handle in self._open:
            handle.close()
        self._open = []
