"""Pile-format JSONL corpus store: documents addressed by integer id, read lazily.

A corpus is one or more JSONL files, one document per line: ``{"text": ..., "meta": {...}}``.
The store never holds the texts in memory: a scan validates every line once and records a
table of ``(file, line, byte offset, byte length)`` per document; texts are then read by
slicing memory-mapped files. The reference code loaded a 43 GB JSONL per shard into a
Python dict; this keeps memory at ~28 bytes per document.

Ids are the positions of *non-empty* documents in file order, so id ``i`` is row ``i`` of the
table and vector ``i`` of the index. Documents whose text is empty or whitespace-only cannot be
embedded meaningfully; they are counted (``CorpusScan.empty_documents``) and left out.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DOC_TABLE_DTYPE = np.dtype(
    [("file", "<u4"), ("line", "<u8"), ("offset", "<u8"), ("length", "<u8")]
)
_FINGERPRINT_SPAN = 1 << 20  # bytes hashed at each end of a file for the quick check
_MAX_REPORTED_ERRORS = 20


class CorpusFormatError(ValueError):
    """One or more malformed lines; each problem is reported as ``path:line: reason``."""

    def __init__(self, problems: Sequence[str], truncated: bool = False):
        self.problems = list(problems)
        more = "\n  ... (further problems not listed)" if truncated else ""
        super().__init__(
            "malformed corpus, nothing was written:\n  " + "\n  ".join(self.problems) + more
        )


@dataclass(frozen=True)
class CorpusFile:
    """Identity of one corpus file as recorded in an index manifest."""

    path: str
    size: int
    sha256: str
    fingerprint: str

    def check(self, full: bool = False) -> None:
        """Raise ``CorpusChangedError`` if the file on disk is not the one that was indexed.

        The quick check (size + hash of the first and last MiB) runs before every search
        session; ``full=True`` re-hashes the whole file.
        """
        path = Path(self.path)
        if not path.is_file():
            raise CorpusChangedError(f"{path}: corpus file is missing")
        size = path.stat().st_size
        if size != self.size:
            raise CorpusChangedError(f"{path}: size {size} != {self.size} recorded at build time")
        if file_fingerprint(path) != self.fingerprint:
            raise CorpusChangedError(f"{path}: contents changed since the index was built")
        if full and file_sha256(path) != self.sha256:
            raise CorpusChangedError(f"{path}: sha256 differs from the one recorded at build time")


class CorpusChangedError(RuntimeError):
    """The corpus on disk no longer matches the manifest of the index built from it."""


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str
    meta: dict
    path: str
    line: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    """Hash of size, first MiB and last MiB: cheap enough to check on every open."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        if size > _FINGERPRINT_SPAN:
            f.seek(max(_FINGERPRINT_SPAN, size - _FINGERPRINT_SPAN))
            digest.update(f.read())
    return digest.hexdigest()


def _check_line(raw: bytes) -> tuple[str | None, bool]:
    """Validate one JSONL line. Returns (problem or None, is_empty_document)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"byte offset {e.start} is not valid UTF-8 (0x{raw[e.start]:02x})", False
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON at column {e.colno}: {e.msg} (truncated line?)", False
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}", False
    if "text" not in record:
        return 'missing "text" field', False
    if not isinstance(record["text"], str):
        return f'"text" must be a string, got {type(record["text"]).__name__}', False
    if "meta" in record and not isinstance(record["meta"], (dict, type(None))):
        return '"meta" must be an object', False
    return None, not record["text"].strip()


@dataclass
class CorpusScan:
    """Result of validating corpus files: the document table plus what was left out."""

    files: list[CorpusFile]
    table: np.ndarray
    empty_documents: int


def scan_corpus(paths: Sequence[Path | str], progress: bool = True) -> CorpusScan:
    """Validate every line of every file and build the document table.

    Raises ``CorpusFormatError`` listing (up to 20) malformed lines with file and line
    number; raises before anything is written, so a failed build leaves no partial output.
    """
    from tqdm.auto import tqdm

    if not paths:
        raise ValueError("no corpus files given")
    problems: list[str] = []
    files: list[CorpusFile] = []
    # One compact column per field (8 bytes a value), not a Python tuple per document.
    columns = {name: array("Q") for name in DOC_TABLE_DTYPE.names}
    empty = 0
    total = sum(Path(p).stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="scan corpus", disable=not progress) as bar:
        for file_idx, path in enumerate(map(Path, paths)):
            path = path.resolve()
            size = path.stat().st_size
            if size == 0:
                problems.append(f"{path}:1: file is empty (expected one JSON document per line)")
                continue
            digest = hashlib.sha256()
            offset = 0
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    digest.update(raw)
                    bar.update(len(raw))
                    body = raw.rstrip(b"\r\n")
                    if body.strip():
                        problem, is_empty = _check_line(body)
                        if problem:
                            problems.append(f"{path}:{line_no}: {problem}")
                            if len(problems) >= _MAX_REPORTED_ERRORS:
                                raise CorpusFormatError(problems, truncated=True)
                        elif is_empty:
                            empty += 1
                        else:
                            for name, value in zip(DOC_TABLE_DTYPE.names, (file_idx, line_no, offset, len(body))):
                                columns[name].append(value)
                    offset += len(raw)
            files.append(CorpusFile(str(path), size, digest.hexdigest(), file_fingerprint(path)))
    if problems:
        raise CorpusFormatError(problems)
    if not columns["line"]:
        raise CorpusFormatError([f"{paths[0]}: no non-empty documents in the corpus"])
    table = np.empty(len(columns["line"]), dtype=DOC_TABLE_DTYPE)
    for name, values in columns.items():
        table[name] = np.frombuffer(values, dtype=np.uint64)
    return CorpusScan(files, table, empty)


class CorpusStore:
    """Random access to document texts through byte offsets into memory-mapped JSONL."""

    def __init__(self, files: Sequence[CorpusFile], table: np.ndarray):
        self.files = list(files)
        self.table = table
        self._maps: dict[int, mmap.mmap] = {}

    @classmethod
    def from_scan(cls, scan: CorpusScan) -> CorpusStore:
        return cls(scan.files, scan.table)

    def __len__(self) -> int:
        return len(self.table)

    def _raw(self, doc_id: int) -> bytes:
        if not 0 <= doc_id < len(self.table):
            raise IndexError(f"document id {doc_id} out of range [0, {len(self.table)})")
        row = self.table[doc_id]
        file_idx = int(row["file"])
        mapped = self._maps.get(file_idx)
        if mapped is None:
            with open(self.files[file_idx].path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[file_idx] = mapped
        start = int(row["offset"])
        return mapped[start : start + int(row["length"])]

    def document(self, doc_id: int) -> Document:
        record = json.loads(self._raw(doc_id))
        row = self.table[doc_id]
        return Document(
            doc_id=doc_id,
            text=record["text"],
            meta=record.get("meta") or {},
            path=self.files[int(row["file"])].path,
            line=int(row["line"]),
        )

    def text(self, doc_id: int) -> str:
        return json.loads(self._raw(doc_id))["text"]

    def texts(self, doc_ids: Sequence[int]) -> list[str]:
        return [self.text(int(i)) for i in doc_ids]

    def iter_texts(self, start: int = 0, end: int | None = None) -> Iterator[str]:
        for doc_id in range(start, len(self) if end is None else end):
            yield self.text(doc_id)

    def release_pages(self) -> None:
        """Drop the mapped pages from this process's resident set (they stay in the page
        cache). A sequential pass over a large corpus calls this between blocks so the RSS
        stays flat instead of growing with every page read."""
        for mapped in self._maps.values():
            mapped.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
