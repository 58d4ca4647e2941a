"""Embedding a corpus as its own, parallel, resumable step: ``ttt-index embed``.

The corpus (its files in order, as one byte stream) is cut into ``num_parts`` byte ranges
that depend only on the file sizes, so N independent jobs (a Slurm array, N GPUs under
``torchrun``) agree on the parts without talking to each other. A part owns the documents
whose line starts in its range. For each part, one read of its bytes validates every line,
builds its slice of the document table, counts its newlines (for line numbers) and hashes
its bytes (for the corpus checksums: a file's sha256 in the manifest is the hash of its
parts' hashes, so the 1.3 TB Pile is never read twice). Then its documents are embedded in
length-sorted batches and the part is written atomically: ``part-00003.npy`` (vectors),
``part-00003.docs.npy`` (document table slice) and ``part-00003.json`` (counts, hashes). A
killed job resumes at its first missing part; ``ttt-index build --embeddings`` checks that
every part is there before it starts.

Layout of an embeddings directory::

    embeddings.json        encoder, dim, dtype, files (relative to the corpus root), part ranges
    part-00000.npy ...     (n_docs, dim) float32 or float16
    part-00000.docs.npy    document table rows (file, line within the part, offset, length)
    part-00000.json        counts, per-file newline counts and chunk hashes
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write, remove_stale_temporaries
from .corpus import DOC_TABLE_DTYPE, CorpusFormatError, CorpusStore, check_line, corpus_root_of, refuse_compressed
from .digest import file_fingerprint
from .encoder import EncoderConfig, check_encoder_dtype

EMBEDDINGS_NAME = "embeddings.json"
DEFAULT_PART_BYTES = 256 << 20
STORE_DTYPES = ("float32", "float16")
_MAX_REPORTED_ERRORS = 20
_READ_BLOCK = 1 << 22


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the corpus root
    size: int
    fingerprint: str


@dataclass(frozen=True)
class EmbeddingsLayout:
    """What every job of one embedding run must agree on (``embeddings.json``)."""

    encoder: dict  # EncoderConfig.identity()
    encoder_dtype: str  # the encoder's arithmetic: float16 and float32 jobs must not fill one directory
    dim: int
    dtype: str  # storage dtype of the part files
    corpus_root: str
    files: list[SourceFile]
    bounds: list[int]  # num_parts + 1 global byte offsets
    format_version: int = 1

    @property
    def num_parts(self) -> int:
        return len(self.bounds) - 1

    def file_ranges(self) -> list[tuple[int, int]]:
        """Global [start, end) byte range of each file."""
        starts = np.cumsum([0] + [f.size for f in self.files])
        return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: Path) -> EmbeddingsLayout:
        path = Path(directory) / EMBEDDINGS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not an embeddings directory (run `ttt-index embed` first)")
        try:
            raw = json.loads(path.read_text())
            return cls(**{**raw, "files": [SourceFile(**f) for f in raw["files"]]})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid embeddings layout ({e}); re-run `ttt-index embed`") from e


def part_bounds(total_bytes: int, num_parts: int) -> list[int]:
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    return [total_bytes * p // num_parts for p in range(num_parts + 1)]


def default_num_parts(total_bytes: int, part_bytes: int = DEFAULT_PART_BYTES) -> int:
    return max(1, math.ceil(total_bytes / part_bytes))


def plan_layout(paths: Sequence[Path], encoder: EncoderConfig, dim: int, dtype: str,
                num_parts: int | None = None, encoder_dtype: str = "float32") -> EmbeddingsLayout:
    if dtype not in STORE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    check_encoder_dtype(encoder_dtype)  # before any part is scanned or embedded
    if not paths:
        raise ValueError("no corpus files given")
    paths = [Path(p).resolve() for p in paths]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: corpus file not found")
        refuse_compressed(path)
        if path.stat().st_size == 0:
            raise CorpusFormatError([f"{path}:1: file is empty (expected one JSON document per line)"])
    root = corpus_root_of(paths)
    files = [SourceFile(p.relative_to(root).as_posix(), p.stat().st_size, file_fingerprint(p)) for p in paths]
    total = sum(f.size for f in files)
    parts = num_parts or default_num_parts(total)
    if parts > total:
        raise ValueError(f"cannot cut {total} bytes into {parts} parts")
    return EmbeddingsLayout(encoder.identity(), encoder_dtype, dim, dtype, str(root), files, part_bounds(total, parts))


@dataclass
class PartMeta:
    """``part-XXXXX.json``: what one part holds, written last (its presence marks it done)."""

    index: int
    start: int
    end: int
    n_docs: int
    empty_documents: int
    # per file index touched: its byte range [lo, hi) inside this part, their sha256 and newlines,
    # whether lo starts a line
    files: dict[str, dict] = field(default_factory=dict)
    # sha256 of the part's .npy and .docs.npy, checked by the build as it reads them
    sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class ScannedPart:
    meta: PartMeta
    table: np.ndarray  # DOC_TABLE_DTYPE; "line" counts lines from the part's start in that file


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def _newlines_before(path: Path, end: int) -> int:
    """Newlines in the first ``end`` bytes (for exact line numbers in error messages)."""
    count = 0
    with open(path, "rb") as f:
        while f.tell() < end:
            block = f.read(min(_READ_BLOCK, end - f.tell()))
            if not block:
                break
            count += block.count(b"\n")
    return count


def scan_part(layout: EmbeddingsLayout, index: int) -> ScannedPart:
    """Validate and table the documents whose line starts inside part ``index``.

    Reads each byte of the part once (plus the tail of its last line), hashing and counting
    newlines of exactly the bytes inside the part. Line numbers in the table count from the
    part's first line in each file; the manifest adds the earlier parts' newlines once all
    parts are known. Raises ``CorpusFormatError`` naming ``file:line`` of each problem.
    """
    a, b = layout.bounds[index], layout.bounds[index + 1]
    root = Path(layout.corpus_root)
    columns = {name: array("Q") for name in DOC_TABLE_DTYPE.names}
    meta = PartMeta(index, a, b, 0, 0)
    problems: list[str] = []
    for file_idx, (fa, fb) in enumerate(layout.file_ranges()):
        lo, hi = max(a, fa) - fa, min(b, fb) - fa  # this part's bytes of the file, file-local
        if lo >= hi:
            continue
        path = root / layout.files[file_idx].path
        digest, newlines, line_no, before = hashlib.sha256(), 0, 0, None
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != layout.files[file_idx].size:
                raise CorpusFormatError([f"{path}: size changed since the embedding run was planned"])
            if lo > 0:
                f.seek(lo - 1)
            at_line_start = lo == 0 or f.read(1) == b"\n"
            f.seek(lo)
            offset = lo
            for raw in f:
                if offset >= hi:
                    break
                inside = raw[: hi - offset]
                digest.update(inside)
                newlines += inside.count(b"\n")
                line_offset, offset = offset, offset + len(raw)
                if line_offset == lo and not at_line_start:
                    continue  # the tail of a line owned by the previous part
                line_no += 1
                body = raw.rstrip(b"\r\n")
                if not body.strip():
                    continue
                problem, is_empty = check_line(body)
                if problem:
                    if before is None:
                        before = 0 if lo == 0 else _newlines_before(path, lo) + (not at_line_start)
                    absolute = line_no + before
                    problems.append(f"{path}:{absolute}: {problem}")
                    if len(problems) >= _MAX_REPORTED_ERRORS:
                        raise CorpusFormatError(problems, truncated=True)
                elif is_empty:
                    meta.empty_documents += 1
                else:
                    for name, value in zip(DOC_TABLE_DTYPE.names, (file_idx, line_no, line_offset, len(body))):
                        columns[name].append(value)
        meta.files[str(file_idx)] = {"lo": lo, "hi": hi, "sha256": digest.hexdigest(), "newlines": newlines,
                                     "at_line_start": at_line_start}
    if problems:
        raise CorpusFormatError(problems)
    table = np.empty(len(columns["line"]), dtype=DOC_TABLE_DTYPE)
    for name, values in columns.items():
        table[name] = np.frombuffer(values, dtype=np.uint64)
    meta.n_docs = len(table)
    return ScannedPart(meta, table)


def write_part(out: Path, part: ScannedPart, vectors: np.ndarray) -> None:
    """Write one part; its ``.json`` goes last, so a part is done exactly when that exists."""
    name = part_name(part.meta.index)
    part.meta.sha256 = {
        "npy": atomic_write(out / f"{name}.npy", lambda f: np.save(f, vectors)),
        "docs": atomic_write(out / f"{name}.docs.npy", lambda f: np.save(f, part.table)),
    }
    atomic_write(out / f"{name}.json", json.dumps(asdict(part.meta), indent=1))


def part_done(out: Path, index: int) -> bool:
    return (Path(out) / f"{part_name(index)}.json").is_file()


def embed_part(encoder, layout: EmbeddingsLayout, part: ScannedPart, progress=None,
               block: int = 4096) -> np.ndarray:
    """Vectors of a part's documents, embedded in length-sorted batches (padding kept small)."""
    out = np.empty((part.meta.n_docs, layout.dim), dtype=layout.dtype)
    order = np.argsort(part.table["length"], kind="stable")
    store = CorpusStore(layout.files, part.table, Path(layout.corpus_root))
    try:
        for start in range(0, len(order), block):
            rows = order[start : start + block]
            # the bar moves with every encoder batch, not once per block of texts read
            out[rows] = encoder.encode([encoder.clip(t) for t in store.texts(rows)],
                                       on_batch=progress.update if progress is not None else None)
    finally:
        store.close()
    return out


def write_layout(out: Path, layout: EmbeddingsLayout) -> None:
    """Create ``embeddings.json`` (the first of concurrent jobs wins: ``link`` fails if the
    file exists) and check that ours agrees with it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / EMBEDDINGS_NAME
    try:
        atomic_write(path, layout.to_json() + "\n", exclusive=True)
    except FileExistsError:
        pass
    existing = EmbeddingsLayout.load(out)
    if existing != layout:
        differs = [k for k in asdict(layout) if asdict(layout)[k] != asdict(existing)[k]]
        raise ValueError(f"{path} belongs to another embedding run (differs in {', '.join(differs)}); "
                         f"use another --out or the same corpus, encoder, dtypes and --num-parts")


def parts_for_job(num_parts: int, part: Sequence[int] | None, rank: int | None, world: int | None) -> list[int]:
    """The parts this job embeds: ``--part`` if given, else its RANK's share, else all."""
    if part:
        bad = [p for p in part if not 0 <= p < num_parts]
        if bad:
            raise ValueError(f"--part {bad[0]} out of range: the corpus is cut into {num_parts} parts "
                             f"(0..{num_parts - 1})")
        return sorted(set(part))
    if world and world > 1:
        return list(range(rank, num_parts, world))
    return list(range(num_parts))


def missing_parts(out: Path, layout: EmbeddingsLayout) -> list[int]:
    return [p for p in range(layout.num_parts) if not part_done(out, p)]


@dataclass(frozen=True)
class EmbedConfig:
    corpus: tuple[Path, ...]
    output: Path
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    num_parts: int | None = None  # default: one part per 256 MiB of corpus
    parts: tuple[int, ...] = ()  # --part: only these; default: this RANK's share, else all
    store_dtype: str = "float32"
    device: str = "cpu"
    dtype: str = "float32"  # encoder arithmetic (encoder.ENCODER_DTYPES), recorded for the queries
    progress: bool = True
    precheck: Callable[[int, int], object] | None = None  # (dim, documents) -> raises before embedding
    vectors: np.ndarray | None = None  # precomputed vectors in document order (benchmarks): no encoder
    use_rank: bool = True  # under torchrun, embed this RANK's share (build CORPUS embeds everything)


def job_rank() -> tuple[int | None, int | None]:
    """RANK / WORLD_SIZE under torchrun or accelerate launch, else (None, None)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None, None


def run_embed(config: EmbedConfig) -> EmbeddingsLayout:
    """Embed this job's missing parts of the corpus into ``config.output``.

    Every selected part is scanned (validated) before the first one is embedded, so a bad
    line stops the job before the slow work; finished parts are skipped.
    """
    from tqdm.auto import tqdm

    from .encoder import TextEncoder, encoder_dim

    dim = config.vectors.shape[1] if config.vectors is not None else encoder_dim(config.encoder)
    layout = plan_layout(config.corpus, config.encoder, dim, config.store_dtype, config.num_parts, config.dtype)
    rank, world = job_rank() if config.use_rank else (None, None)
    selected = parts_for_job(layout.num_parts, config.parts, rank, world)
    out = Path(config.output)
    write_layout(out, layout)
    remove_stale_temporaries(out)
    todo = [p for p in selected if not part_done(out, p)]
    scanned = [scan_part(layout, p) for p in tqdm(todo, desc="scan parts", unit="part", disable=not config.progress)]
    if config.precheck is not None:
        config.precheck(dim, sum(s.meta.n_docs for s in scanned))
    if config.vectors is not None and len(todo) != layout.num_parts:
        raise ValueError("precomputed vectors need every part embedded in one job")
    encoder = None
    if scanned and config.vectors is None:
        device = config.device
        if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per rank under torchrun / accelerate
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        encoder = TextEncoder(config.encoder, device=device, dtype=config.dtype)
    offset = 0
    with tqdm(total=sum(s.meta.n_docs for s in scanned), desc="embed documents", unit="doc",
              disable=not config.progress) as bar:
        for part in scanned:
            if encoder is None:
                vectors = np.asarray(config.vectors[offset : offset + part.meta.n_docs], dtype=layout.dtype)
                bar.update(len(vectors))
            else:
                vectors = embed_part(encoder, layout, part, bar)
            offset += part.meta.n_docs
            write_part(out, part, vectors)
    return layout
