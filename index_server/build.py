"""Building a sharded Faiss index from embeddings, out of core.

``ttt-index build CORPUS...`` is ``embed`` (into the output's scratch directory) followed by
``build --embeddings EMB``. The build never holds all vectors in RAM: it reads the
memory-mapped embedding parts in blocks, trains the index type once on a random sample
whose size follows from the factory string (IVF centroids, PQ codebooks), then fills S
shards with contiguous id ranges, adding ``add_block`` vectors at a time. Options:

* ``on_disk``: IVF inverted lists in an on-disk file per shard (Faiss
  ``OnDiskInvertedLists``, merged from per-block indexes as in ``contrib/ondisk.py``), so a
  server's resident memory is the coarse quantizer plus the list pages it touches, and the
  build's peak memory is one block whatever the corpus size;
* ``store_vectors`` (``--refine``): a float16 copy of every vector (``vectors.f16.npy``),
  memory-mapped at search time to re-rank approximate candidates exactly.

All output goes to a scratch sibling directory that replaces the target only when complete
(``atomic_output``), and every file is hashed while it is written, so nothing is read twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_output
from .corpus import DOC_TABLE_DTYPE, CorpusFile, CorpusFormatError
from .digest import HashingWriter, file_fingerprint
from .embed import EmbeddingsLayout, PartMeta, missing_parts, part_name
from .encoder import EncoderConfig, manifest_entry
from .manifest import DOC_TABLE_NAME, FileInfo, Manifest, ShardInfo
from .options import MAX_DEFAULT_NPROBE, NLIST_PER_NPROBE
from .search import faiss_chatter_to_stderr

VECTORS_NAME = "vectors.f16.npy"
# Points per centroid / codeword to train on: Faiss warns below 39; 64 is a comfortable default.
TRAIN_POINTS_PER_CENTROID = 64
PQ_CENTROIDS = 256


@dataclass(frozen=True)
class BuildConfig:
    output: Path
    corpus: tuple[Path, ...] = ()  # embed these first ...
    embeddings: Path | None = None  # ... or build from a finished `ttt-index embed` directory
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    factory: str = "Flat"
    metric: str = "l2"
    shards: int = 1
    train_size: int | None = None  # vectors sampled to train IVF / PQ; default from the factory
    seed: int = 0
    on_disk: bool = False
    store_vectors: bool = False  # --refine
    add_block: int = 1 << 16  # vectors read and added per step
    num_parts: int | None = None  # embedding parts when embedding here (default: one per 256 MiB)
    store_dtype: str = "float32"  # embedding parts' dtype when embedding here
    overwrite: bool = False
    device: str = "cpu"
    progress: bool = True


def _metric_type(metric: str) -> int:
    return {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}[metric]


def make_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """``faiss.index_factory`` with an error message that names the bad string. PQ codes skip
    Faiss's polysemous training: it only reorders codewords for Hamming pre-filtering
    (``polysemous_ht``), which no search here uses, and it is most of an IVF-PQ training's time."""
    try:
        index = faiss.index_factory(dim, factory, _metric_type(metric))
    except RuntimeError as e:
        raise ValueError(f"invalid index factory string {factory!r} for dim {dim}: {e}") from e
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexRefine)):  # to the index that holds the codes
        inner = faiss.downcast_index(inner.index if isinstance(inner, faiss.IndexPreTransform) else inner.base_index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False
    return index


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    if not 1 <= shards <= n:
        raise ValueError(f"cannot split {n} vectors into {shards} shards")
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def default_nprobe(nlist: int) -> int:
    """Lists an IVF index probes unless told otherwise: 1/NLIST_PER_NPROBE of them, at most
    MAX_DEFAULT_NPROBE (Faiss's own default of 1 gives poor recall)."""
    return max(1, min(MAX_DEFAULT_NPROBE, nlist // NLIST_PER_NPROBE))


def min_training_points(factory: str, index: faiss.Index) -> int:
    """The fewest training vectors the factory can be trained on (one per centroid/codeword)."""
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    needed = int(ivf.nlist) if ivf is not None else 1
    if re.search(r"PQ\d", factory) or "OPQ" in factory:
        needed = max(needed, PQ_CENTROIDS)
    return needed


def default_train_size(factory: str, index: faiss.Index) -> int:
    """Training sample size from the factory: 64 points per IVF centroid and per PQ codeword."""
    if index.is_trained:
        return 0
    return TRAIN_POINTS_PER_CENTROID * min_training_points(factory, index)


def check_factory(config: BuildConfig, dim: int, n: int) -> faiss.Index:
    """Refuse a bad factory string, shard count or too small a corpus before any work."""
    shard_ranges(n, config.shards)
    template = make_index(config.factory, dim, config.metric)
    needed = min_training_points(config.factory, template)
    if needed > n:
        raise ValueError(f"index {config.factory!r} needs at least {needed} training vectors; corpus has {n}")
    if config.train_size is not None and config.train_size < needed:
        raise ValueError(f"--train-size {config.train_size} is below the {needed} vectors {config.factory!r} trains on")
    if config.on_disk and faiss.try_extract_index_ivf(template) is None:
        raise ValueError(f"--on-disk needs an IVF index (e.g. IVF4096,PQ64), got {config.factory!r}")
    return template


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, or a CorpusFormatError naming it."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if fortran:
                raise ValueError("Fortran order")
            return shape, dtype, f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise CorpusFormatError([f"{path}: corrupt embedding part ({e}); delete it and its .json, then rerun "
                                 f"`ttt-index embed` to redo it"]) from e


class PartVectors:
    """All embedding parts as one (n, dim) float32 row space, read block by block with
    ``pread`` (not memory-mapped: mapped pages would count in the build's resident memory
    and grow with the corpus)."""

    def __init__(self, directory: Path, layout: EmbeddingsLayout, metas: list[PartMeta]):
        self.files, self.offsets, self.counts, self.paths = [], [], [], []
        self.dtype, self.dim = np.dtype(layout.dtype), layout.dim
        self.expected = [m.sha256.get("npy") for m in metas]
        try:
            for meta in metas:
                path = directory / f"{part_name(meta.index)}.npy"
                shape, dtype, offset = _npy_header(path)
                if shape != (meta.n_docs, layout.dim) or dtype != self.dtype:
                    raise CorpusFormatError([f"{path}: holds {shape} {dtype}, expected ({meta.n_docs}, {layout.dim}) "
                                             f"{layout.dtype} (a part of another run?)"])
                if path.stat().st_size != offset + meta.n_docs * layout.dim * dtype.itemsize:
                    raise CorpusFormatError([f"{path}: wrong size for its shape (truncated?); delete it and its .json, "
                                             f"then rerun `ttt-index embed` to redo it"])
                self.files.append(os.open(path, os.O_RDONLY))
                self.paths.append(path)
                self.offsets.append(offset)
                self.counts.append(meta.n_docs)
        except BaseException:
            self.close()
            raise
        self.starts = np.cumsum([0] + self.counts)
        self.n = int(self.starts[-1])
        self.row_bytes = self.dim * self.dtype.itemsize
        # each part is hashed as the build reads it front to back (once), and checked at the end
        self.hashers = [hashlib.sha256() for _ in metas]
        self.hashed = [0] * len(metas)  # rows hashed so far, per part
        for part, offset in enumerate(self.offsets):
            with open(self.paths[part], "rb") as f:
                self.hashers[part].update(f.read(offset))  # the .npy header

    def _read(self, part: int, a: int, b: int, hashing: bool = True) -> np.ndarray:
        data = os.pread(self.files[part], (b - a) * self.row_bytes, self.offsets[part] + a * self.row_bytes)
        if hashing and a == self.hashed[part]:
            self.hashers[part].update(data)
            self.hashed[part] = b
        return np.frombuffer(data, dtype=self.dtype).reshape(b - a, self.dim)

    def verify(self) -> None:
        """Every part was read whole: its bytes are the ones `ttt-index embed` wrote."""
        for part, expected in enumerate(self.expected):
            if expected is None:
                continue
            if self.hashed[part] < self.counts[part]:
                self.rows(int(self.starts[part]) + self.hashed[part], int(self.starts[part + 1]))
            if self.hashers[part].hexdigest() != expected:
                raise CorpusFormatError([f"{self.paths[part]}: contents differ from what the embedding run wrote "
                                         f"(corrupted); delete it and its .json, then rerun `ttt-index embed`"])

    def rows(self, start: int, end: int) -> np.ndarray:
        out = np.empty((end - start, self.dim), dtype=np.float32)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        for p in range(first, len(self.counts)):
            if pos >= end:
                break
            a = pos - int(self.starts[p])
            b = min(self.counts[p], end - int(self.starts[p]))
            out[pos - start : pos - start + (b - a)] = self._read(p, a, b)
            pos += b - a
        return out

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows at sorted ids (a training sample), one read per row."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        for row, (p, i) in enumerate(zip(which, ids)):
            local = int(i - self.starts[p])
            out[row] = self._read(int(p), local, local + 1, hashing=False)[0]
        return out

    def close(self) -> None:
        for fd in self.files:
            os.close(fd)
        self.files = []


class _IndexFile:
    """A new file of the index, hashed while written (``digest.HashingWriter``); ``close``
    gives its ``FileInfo``."""

    def __init__(self, path: Path):
        self.path, self.file = path, open(path, "wb")
        self.hashing = HashingWriter(self.file)

    def __call__(self, data: bytes) -> int:
        return self.hashing.write(data)

    def close(self) -> FileInfo:
        self.file.close()
        # the fingerprint reads only the sampled 3 MiB back (page cache), not the file
        return FileInfo(self.path.name, self.hashing.size, self.hashing.sha.hexdigest(), file_fingerprint(self.path))


def _write_faiss(index: faiss.Index, path: Path) -> FileInfo:
    writer = _IndexFile(path)
    faiss.write_index(index, faiss.PyCallbackIOWriter(writer))
    return writer.close()


class _NpyStream:
    """A .npy file written front to back (header first, then row blocks), hashed on the way:
    never the whole array in memory, never mapped."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.writer = _IndexFile(path)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self, header)
        self.dtype = np.dtype(dtype)

    def write(self, data) -> int:  # the header writer's file protocol
        return self.writer(bytes(data))

    def append(self, block: np.ndarray) -> None:
        self.writer(np.ascontiguousarray(block, dtype=self.dtype).tobytes())

    def close(self) -> FileInfo:
        return self.writer.close()


def load_parts(directory: Path) -> tuple[EmbeddingsLayout, list[PartMeta]]:
    """The layout and every part's metadata, or an error naming the missing parts and the
    command that makes them. Nothing is written before this succeeds."""
    layout = EmbeddingsLayout.load(directory)
    missing = missing_parts(directory, layout)
    if missing:
        listed = " ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise FileNotFoundError(f"{directory}: {len(missing)} of {layout.num_parts} embedding parts are missing "
                                f"({listed}); run `ttt-index embed ... --out {directory} --num-parts "
                                f"{layout.num_parts} --part N` for each")
    metas = []
    for p in range(layout.num_parts):
        path = directory / f"{part_name(p)}.json"
        try:
            metas.append(PartMeta(**json.loads(path.read_text())))
        except (ValueError, TypeError) as e:
            raise CorpusFormatError([f"{path}: corrupt part metadata ({e})"]) from e
        if (metas[-1].index, metas[-1].start, metas[-1].end) != (p, layout.bounds[p], layout.bounds[p + 1]):
            raise CorpusFormatError([f"{path}: belongs to another embedding layout"])
        table = directory / f"{part_name(p)}.docs.npy"
        shape, dtype, _ = _npy_header(table)
        if shape != (metas[-1].n_docs,) or dtype != DOC_TABLE_DTYPE:
            raise CorpusFormatError([f"{table}: holds {shape} rows of {dtype}, expected {metas[-1].n_docs} document "
                                     f"table rows (a part of another run?)"])
    return layout, metas


def corpus_files(layout: EmbeddingsLayout, metas: list[PartMeta]) -> list[CorpusFile]:
    """Manifest entries of the corpus files from the parts' chunk hashes (no re-read)."""
    files = []
    for i, source in enumerate(layout.files):
        chunks = [m.files[str(i)] for m in metas if str(i) in m.files]
        digest = hashlib.sha256("".join(c["sha256"] for c in chunks).encode())
        files.append(CorpusFile(source.path, source.size, digest.hexdigest(), source.fingerprint,
                                tuple(c["hi"] for c in chunks)))
    return files


def doc_tables(directory: Path, metas: list[PartMeta]):
    """Each part's table in order (checked against its recorded sha256), line numbers made
    absolute per file; one part in memory at a time."""
    lines_before: dict[int, int] = {}
    for meta in metas:
        path = directory / f"{part_name(meta.index)}.docs.npy"
        data = path.read_bytes()
        if meta.sha256.get("docs") not in (None, hashlib.sha256(data).hexdigest()):
            raise CorpusFormatError([f"{path}: contents differ from what the embedding run wrote (corrupted); "
                                     f"delete it and its part's .json, then rerun `ttt-index embed`"])
        table = np.load(io.BytesIO(data))
        if table.dtype != DOC_TABLE_DTYPE or len(table) != meta.n_docs:
            raise CorpusFormatError([f"{directory / part_name(meta.index)}.docs.npy: does not match its part"])
        for key, info in meta.files.items():
            f = int(key)
            offset = lines_before.get(f, 0) + (0 if info["at_line_start"] else 1)
            table["line"][table["file"] == f] += offset
            lines_before[f] = lines_before.get(f, 0) + info["newlines"]
        yield table


def write_doc_table(path: Path, directory: Path, metas: list[PartMeta]) -> FileInfo:
    stream = _NpyStream(path, DOC_TABLE_DTYPE, (sum(m.n_docs for m in metas),))
    for table in doc_tables(directory, metas):
        stream.append(table)
    return stream.close()


def _add_blocks(index: faiss.Index, vectors: PartVectors, start: int, end: int, block: int) -> None:
    for a in range(start, end, block):
        index.add(vectors.rows(a, min(end, a + block)))


def _write_shard(scratch: Path, template: faiss.Index, vectors: PartVectors, i: int, count: int,
                 start: int, end: int, config: BuildConfig) -> ShardInfo:
    name = f"shard-{i:05d}-of-{count:05d}"
    if not config.on_disk:
        index = faiss.clone_index(template)
        _add_blocks(index, vectors, start, end, config.add_block)
        return ShardInfo(i, _write_faiss(index, scratch / f"{name}.faiss"), start, end)
    # Out of core: one small index per block, merged into on-disk lists (faiss contrib/ondisk.py).
    from faiss.contrib.ondisk import merge_ondisk

    with tempfile.TemporaryDirectory(dir=scratch) as blocks:
        block_files = []
        for a in range(start, end, config.add_block):
            index = faiss.clone_index(template)
            b = min(end, a + config.add_block)
            index.add_with_ids(vectors.rows(a, b), np.arange(a - start, b - start, dtype=np.int64))  # shard-local ids
            block_files.append(str(Path(blocks) / f"block-{len(block_files):06d}.faiss"))
            faiss.write_index(index, block_files[-1])
            del index
        merged = faiss.clone_index(template)
        with faiss_chatter_to_stderr():
            merge_ondisk(merged, block_files, str(scratch / f"{name}.ivfdata"))
        info = _write_faiss(merged, scratch / f"{name}.faiss")
        del merged
    ivfdata = FileInfo.of(scratch, f"{name}.ivfdata")
    return ShardInfo(i, info, start, end, ivfdata)


def _write_vectors(scratch: Path, vectors: PartVectors, block: int) -> FileInfo:
    stream = _NpyStream(scratch / VECTORS_NAME, np.float16, (vectors.n, vectors.dim))
    for a in range(0, vectors.n, block):
        stream.append(vectors.rows(a, min(vectors.n, a + block)))
    return stream.close()


def write_index(scratch: Path, directory: Path, config: BuildConfig) -> Manifest:
    """Train once, write the shards, the document table, optional stored vectors and the
    manifest into ``scratch``, from the embeddings in ``directory``."""
    layout, metas = load_parts(directory)
    vectors = PartVectors(directory, layout, metas)
    try:
        return _write_index(scratch, directory, config, layout, metas, vectors)
    finally:
        vectors.close()


def _write_index(scratch: Path, directory: Path, config: BuildConfig, layout: EmbeddingsLayout,
                 metas: list[PartMeta], vectors: PartVectors) -> Manifest:
    if vectors.n == 0:
        raise CorpusFormatError([f"{directory}: no non-empty documents in the corpus"])
    template = check_factory(config, vectors.dim, vectors.n)
    if not template.is_trained:
        size = min(vectors.n, config.train_size or default_train_size(config.factory, template))
        ids = np.sort(np.random.default_rng(config.seed).choice(vectors.n, size=size, replace=False))
        template.train(vectors.take(ids))
    ranges = shard_ranges(vectors.n, config.shards)
    shards = [
        _write_shard(scratch, template, vectors, i, len(ranges), a, b, config)
        for i, (a, b) in enumerate(tqdm(ranges, desc="write shards", disable=not config.progress))
    ]
    vectors.verify()
    ivf = faiss.try_extract_index_ivf(template)
    manifest = Manifest(
        encoder=manifest_entry(layout.encoder, layout.encoder_dtype),
        dim=vectors.dim,
        metric=config.metric,
        factory=config.factory,
        n_vectors=vectors.n,
        empty_documents=sum(m.empty_documents for m in metas),
        corpus_root=layout.corpus_root,
        corpus=corpus_files(layout, metas),
        doc_table=write_doc_table(scratch / DOC_TABLE_NAME, directory, metas),
        shards=shards,
        vectors=_write_vectors(scratch, vectors, config.add_block) if config.store_vectors else None,
        layout={"on_disk": config.on_disk, "refine": config.store_vectors,
                **({"nprobe": default_nprobe(ivf.nlist)} if ivf is not None else {})},
    )
    manifest.save(scratch)
    return manifest


def is_index(directory: Path) -> bool:
    """A directory ``ttt-index build`` wrote: its manifest loads."""
    try:
        Manifest.load(directory)
    except (OSError, RuntimeError, ValueError):
        return False
    return True


def build_index(config: BuildConfig) -> Manifest:
    """``build CORPUS...`` (embed, then build) or ``build --embeddings EMB``."""
    from .embed import EmbedConfig, run_embed

    if config.corpus and config.embeddings:
        raise ValueError("give either corpus files or --embeddings, not both")
    if not config.corpus and not config.embeddings:
        raise ValueError("nothing to index: give corpus files or --embeddings DIR")
    inputs = [*config.corpus, *([config.embeddings] if config.embeddings else [])]
    with atomic_output(Path(config.output), config.overwrite, is_ours=is_index, inputs=inputs) as scratch:
        directory = config.embeddings
        if directory is None:
            directory = scratch / "embeddings"
            run_embed(EmbedConfig(corpus=config.corpus, output=directory, encoder=config.encoder,
                                  num_parts=config.num_parts, store_dtype=config.store_dtype, device=config.device,
                                  progress=config.progress, precheck=lambda dim, n: check_factory(config, dim, n),
                                  use_rank=False))
        manifest = write_index(scratch, Path(directory), config)
        if config.embeddings is None:
            shutil.rmtree(directory)
    return manifest

