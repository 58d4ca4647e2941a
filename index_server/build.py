"""Building a sharded Faiss index from a corpus.

Order of work: validate the whole corpus (a malformed line stops the build before anything
is written), embed documents block by block into a memory-mapped scratch file, train the
index type once on a sample (IVF, PQ), then fill S shards with contiguous id ranges. All
output goes to a temporary sibling directory that replaces the target only when complete
(``atomic_output``), so an interrupted or failed build never leaves a half index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_output
from .corpus import CorpusScan, CorpusStore, file_sha256, scan_corpus
from .encoder import EncoderConfig, TextEncoder
from .manifest import DOC_TABLE_NAME, Manifest, ShardInfo

# Documents read from the store and embedded per step: large enough for length-sorted
# batches, small enough that the block's texts stay a few MB.
_EMBED_BLOCK = 1024


@dataclass(frozen=True)
class BuildConfig:
    corpus: tuple[Path, ...]
    output: Path
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    factory: str = "Flat"
    metric: str = "l2"
    shards: int = 1
    train_size: int = 100_000  # vectors sampled to train IVF / PQ
    seed: int = 0
    overwrite: bool = False
    device: str = "cpu"
    progress: bool = True


def _metric_type(metric: str) -> int:
    return {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}[metric]


def make_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """``faiss.index_factory`` with an error message that names the bad string."""
    try:
        return faiss.index_factory(dim, factory, _metric_type(metric))
    except RuntimeError as e:
        raise ValueError(f"invalid index factory string {factory!r} for dim {dim}: {e}") from e


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    if not 1 <= shards <= n:
        raise ValueError(f"cannot split {n} vectors into {shards} shards")
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _min_training_points(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else (256 if "PQ" in type(index).__name__ else 1)


def embed_corpus(store: CorpusStore, encoder: TextEncoder, out: np.ndarray, progress: bool) -> None:
    with tqdm(total=len(store), desc="embed documents", unit="doc", disable=not progress) as bar:
        for start in range(0, len(store), _EMBED_BLOCK):
            end = min(start + _EMBED_BLOCK, len(store))
            out[start:end] = encoder.encode([encoder.clip(t) for t in store.iter_texts(start, end)])
            store.release_pages()
            bar.update(end - start)


def write_index(
    scratch: Path, scan: CorpusScan, vectors: np.ndarray, encoder_identity: dict, config: BuildConfig
) -> Manifest:
    """Train (if the factory needs it) and write the shards, doc table and manifest into
    ``scratch``. Split from ``build_index`` so vectors from elsewhere (benchmarks, an
    external embedding job) go through the same shard layout."""
    n, dim = vectors.shape
    ranges = shard_ranges(n, config.shards)
    template = make_index(config.factory, dim, config.metric)
    if not template.is_trained:
        rng = np.random.default_rng(config.seed)
        sample = np.sort(rng.choice(n, size=min(n, config.train_size), replace=False))
        template.train(np.ascontiguousarray(vectors[sample]))
    shards = []
    for i, (start, end) in enumerate(tqdm(ranges, desc="write shards", disable=not config.progress)):
        index = faiss.clone_index(template)
        index.add(np.ascontiguousarray(vectors[start:end]))
        name = f"shard-{i:05d}-of-{len(ranges):05d}.faiss"
        faiss.write_index(index, str(scratch / name))
        shards.append(ShardInfo(i, name, start, end, file_sha256(scratch / name)))
    np.save(scratch / DOC_TABLE_NAME, scan.table)
    manifest = Manifest(
        encoder=encoder_identity,
        dim=dim,
        metric=config.metric,
        factory=config.factory,
        n_vectors=n,
        empty_documents=scan.empty_documents,
        corpus=scan.files,
        shards=shards,
    )
    manifest.save(scratch)
    return manifest


def check_factory(config: BuildConfig, dim: int, n: int) -> None:
    """Refuse a bad factory string or too small a corpus before any work is done."""
    shard_ranges(n, config.shards)
    template = make_index(config.factory, dim, config.metric)
    needed = _min_training_points(template) if not template.is_trained else 0
    if needed > n:
        raise ValueError(f"index {config.factory!r} needs at least {needed} training vectors; corpus has {n}")


def build_index(config: BuildConfig) -> Manifest:
    with atomic_output(Path(config.output), config.overwrite) as scratch:
        scan = scan_corpus(config.corpus, progress=config.progress)
        store = CorpusStore.from_scan(scan)
        try:
            encoder = TextEncoder(config.encoder, device=config.device)
            check_factory(config, encoder.dim, len(store))
            vectors = np.lib.format.open_memmap(
                scratch / "vectors.npy", mode="w+", dtype=np.float32, shape=(len(store), encoder.dim)
            )
            embed_corpus(store, encoder, vectors, config.progress)
            manifest = write_index(scratch, scan, vectors, config.encoder.identity(), config)
            del vectors
            (scratch / "vectors.npy").unlink()
        finally:
            store.close()
    return manifest
