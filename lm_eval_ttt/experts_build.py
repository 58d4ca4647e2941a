"""``ttt-nn experts build``: cluster an index's documents and train one LoRA expert per cluster.

Clustering: a seeded sample of the index's documents (``SAMPLE_PER_CLUSTER`` per cluster,
Faiss's own cap on the points k-means uses per centroid, or every document when the index
is smaller), their vectors as the index keeps them (stored float16 copies or exact Flat
vectors) or, for an index of lossy codes only (PQ), their texts re-embedded with the
index's encoder: the manifest says which. The vectors are L2-normalised and clustered by
Faiss's spherical k-means, so a centroid is the unit key the query's cosine is taken with.

Documents per expert, drawn apart from the clustering's sample so the budget of
``clusters x docs_per_expert`` training documents is spent evenly: the index's documents in a
permutation seeded by the build seed are assigned to their nearest centroid, batch by batch,
and each cluster keeps the first ``docs_per_expert`` that fall in it (a uniform sample of its
members); the scan stops once every cluster is full, or after ``SCAN_FACTOR`` times the budget
(a cluster still short trains on what it found; the manifest's plan records how many documents
were scanned). Each expert trains on its documents in that order, one step per chunk of
``max_length`` tokens of each document's first ``max_doc_tokens`` tokens: the same trainer
(``trainers.build_trainer``, adapter=lora) and the same steps as test-time training on
neighbours, reset between experts.

The index is opened through ``open_index``, so a directory and gRPC shard servers serve
alike. Every expert is written atomically as it finishes and the manifest with it; a build
run again with the same settings resumes at the first missing expert, one with other
settings is refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from index_server.atomic import atomic_write, remove_stale_temporaries
from index_server.encoder import encoder_of
from index_server.index import open_index

from .experts import CENTROIDS, MANIFEST, Expert, ExpertsError, ExpertsManifest, expert_file
from .lora import lora_layers
from .settings import ExpertsSettings, ModelArgumentError, TrainSettings
from .trainers import build_trainer
from .ttt import capped_tokens

SAMPLE_PER_CLUSTER = 256  # faiss.Kmeans's max_points_per_centroid: more points would be subsampled anyway
KMEANS_ITERATIONS = 20
VECTOR_BATCH = 4096
SCAN_FACTOR = 16  # documents scanned for the experts' documents, at most, per document of the budget
PLAN = ("a seeded sample of the index's documents clustered by spherical k-means; per cluster, the first "
        "docs_per_expert documents of a seeded permutation of the whole index whose nearest centroid it is, "
        "trained in that order, one step per chunk")


def load_model(pretrained: str, dtype: str = "auto"):
    """The causal LM and tokenizer as ``--model hf`` loads them (same weights, same fingerprint),
    on the CPU: the build trains there."""
    import transformers
    from lm_eval.models.utils_hf import get_dtype
    from packaging.version import Version

    # lm-eval's own choice of the keyword: transformers renamed torch_dtype to dtype in 4.56
    keyword = "dtype" if Version(transformers.__version__) >= Version("4.56.0") else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained, **{keyword: get_dtype(dtype)})
    model.eval()
    return model, transformers.AutoTokenizer.from_pretrained(pretrained)


def vector_batches(index, ids: np.ndarray, desc: str, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """(ids, their vectors, where the vectors came from) batch by batch: as the index keeps
    them, else their texts re-embedded."""
    encoder = None
    for i in tqdm(range(0, len(ids), VECTOR_BATCH), desc=desc, unit="batch", disable=not progress):
        batch = ids[i : i + VECTOR_BATCH]
        vectors, source = index.vectors(batch.tolist())
        if vectors is None:
            encoder = encoder or encoder_of(index.manifest.encoder)
            texts = index.texts(batch.tolist())
            if any(t is None for t in texts):
                raise ExpertsError("cannot re-embed documents on a shard that is down")
            vectors, source = encoder.encode(texts), "re-embedded"
        yield batch, np.asarray(vectors, dtype=np.float32), source


def sample_vectors(index, ids: np.ndarray, progress: bool) -> tuple[np.ndarray, str]:
    """The vectors of ``ids`` and where they came from."""
    batches = list(vector_batches(index, ids, "sample vectors", progress))
    return np.concatenate([v for _, v, _ in batches]), batches[-1][2]


def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each vector's cluster: the unit centroid of highest cosine."""
    return np.argmax(vectors @ centroids.T, axis=1)  # a positive scale of a row keeps its argmax


def expert_documents(index, centroids: np.ndarray, settings: ExpertsSettings,
                     progress: bool) -> tuple[list[list[int]], int]:
    """Per cluster, the first ``docs_per_expert`` documents of a seeded permutation of the
    index whose nearest centroid it is, and how many documents were scanned to find them."""
    n, clusters, per = index.manifest.n_vectors, len(centroids), settings.docs_per_expert
    # a seeded draw in random order; numpy draws a few ids of a large index without permuting it
    order = np.random.default_rng([settings.seed, 1]).choice(n, size=min(n, SCAN_FACTOR * clusters * per),
                                                              replace=False)
    chosen: list[list[int]] = [[] for _ in range(clusters)]
    scanned = 0
    for ids, vectors, _ in vector_batches(index, order, "experts' documents", progress):
        for doc, c in zip(ids.tolist(), nearest_centroid(vectors, centroids).tolist()):
            if len(chosen[c]) < per:
                chosen[c].append(doc)
        scanned += len(ids)
        if all(len(docs) == per for docs in chosen):
            break
    return chosen, scanned


def cluster(vectors: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """The unit centroids of spherical k-means on the normalised vectors."""
    import faiss

    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    kmeans = faiss.Kmeans(x.shape[1], clusters, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                          max_points_per_centroid=SAMPLE_PER_CLUSTER)
    kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    centroids = kmeans.centroids / np.maximum(np.linalg.norm(kmeans.centroids, axis=1, keepdims=True), 1e-12)
    return centroids.astype(np.float32)


def plan(index, settings: ExpertsSettings, model_fingerprint: str, pretrained: str,
         progress: bool) -> tuple[ExpertsManifest, np.ndarray]:
    """The clustering and every expert's documents, before any training."""
    start = time.perf_counter()
    n = index.manifest.n_vectors
    if n < settings.clusters:
        raise ExpertsError(f"the index has {n} documents, fewer than clusters={settings.clusters}")
    rng = np.random.default_rng(settings.seed)
    ids = np.sort(rng.choice(n, size=sample_size(n, settings), replace=False))
    vectors, source = sample_vectors(index, ids, progress)
    centroids = cluster(vectors, settings.clusters, settings.seed)
    documents, scanned = expert_documents(index, centroids, settings, progress)
    experts = [Expert(cluster=c, docs=docs) for c, docs in enumerate(documents)]
    manifest = ExpertsManifest(
        pretrained=pretrained, model=model_fingerprint, index=index.manifest.identity, vectors=source,
        clustering={"clusters": settings.clusters, "method": "faiss spherical k-means", "iterations": KMEANS_ITERATIONS,
                    "sample": len(ids), "seed": settings.seed, "centroids_sha256": ""},
        training=settings.training(), experts=experts, plan={"documents": PLAN, "scanned": scanned})
    manifest.clustering_s = time.perf_counter() - start
    return manifest, centroids


def sample_size(n: int, settings: ExpertsSettings) -> int:
    return min(n, SAMPLE_PER_CLUSTER * settings.clusters)


def build_key(settings: ExpertsSettings, model_fingerprint: str, index) -> dict:
    """What a build's experts depend on (``ExpertsManifest.build_key`` of the manifest it writes)."""
    return {"model": model_fingerprint, "index": index.manifest.identity, "training": settings.training(),
            "clusters": settings.clusters, "seed": settings.seed,
            "sample": sample_size(index.manifest.n_vectors, settings)}


def _differences(a: dict, b: dict) -> str:
    return "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(a.keys() | b.keys())
                     if a.get(k) != b.get(k))


def build_experts(index_spec: str, out: Path, settings: ExpertsSettings, pretrained: str, dtype: str = "auto",
                  progress: bool = True) -> ExpertsManifest:
    """Open the index and load the model, then ``train_experts``."""
    model, tokenizer = load_model(pretrained, dtype)
    index = open_index(index_spec)
    try:
        return train_experts(index, Path(out), settings, model, tokenizer, pretrained, progress)
    finally:
        index.close()


def train_experts(index, out: Path, settings: ExpertsSettings, model, tokenizer, pretrained: str,
                  progress: bool = True) -> ExpertsManifest:
    """Build (or finish building) the experts of ``index`` (a ``KnnIndex``) in ``out``; see the
    module docstring."""
    from .harness import model_fingerprint

    fingerprint = model_fingerprint(model)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(out / ".build.lock", timeout=0):
            return _train(index, out, settings, model, tokenizer, pretrained, fingerprint, progress)
    except Timeout:
        raise ExpertsError(f"{out}: another build is writing these experts") from None


def _train(index, out: Path, settings: ExpertsSettings, model, tokenizer, pretrained: str, fingerprint: str,
           progress: bool) -> ExpertsManifest:
    from safetensors.torch import save
    from torch.utils.collect_env import get_pretty_env_info

    from .report import cpu_of

    remove_stale_temporaries(out)  # of a build killed mid-write
    if (out / MANIFEST).is_file():
        manifest = ExpertsManifest.read(out)
        wanted = build_key(settings, fingerprint, index)
        if manifest.build_key() != wanted:
            raise ExpertsError(f"{out} holds experts built with other settings "
                               f"({_differences(manifest.build_key(), wanted)}); build into another directory")
    else:
        manifest, centroids = plan(index, settings, fingerprint, pretrained, progress)

        def write_centroids(f):
            np.save(f, centroids)

        manifest.clustering["centroids_sha256"] = atomic_write(out / CENTROIDS, write_centroids)
        atomic_write(out / MANIFEST, manifest.to_json())
    train = TrainSettings(adapter="lora", lr=settings.lr, lora_r=settings.lora_r, lora_alpha=settings.lora_alpha)
    try:
        adapted, trainer = build_trainer(model, train, max_length=settings.max_length, seed=settings.seed,
                                         pad_id=tokenizer.pad_token_id or 0, peft_loaded=False)
    except ModelArgumentError as e:
        raise ExpertsError(str(e)) from e
    layers = {name.removeprefix("base_model.model."): m for name, m in lora_layers(adapted).items()}
    cpu = cpu_of({"pretty_env_info": get_pretty_env_info()}) or "?"  # as lm-eval records a run's environment
    with tqdm(total=len(manifest.experts), initial=manifest.done, desc="experts", unit="expert",
              disable=not progress) as bar:
        for expert in manifest.experts:
            if expert.sha256:
                continue
            start = time.perf_counter()
            texts = index.texts(expert.docs)
            if any(t is None for t in texts):
                raise ExpertsError(f"expert {expert.cluster}: a shard holding its documents is down")
            tokens = capped_tokens(tokenizer, texts, settings.max_doc_tokens)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed * 1_000_003 + expert.cluster)
                trainer.train([tokens])
            work = trainer.work()[0]
            tensors = {}
            for name, m in layers.items():
                tensors[f"{name}.A"] = m.lora_A["default"].weight.detach().cpu().contiguous().clone()
                tensors[f"{name}.B"] = m.lora_B["default"].weight.detach().cpu().contiguous().clone()
            trainer.reset()
            expert.sha256 = atomic_write(out / expert_file(expert.cluster), save(tensors))
            expert.steps, expert.tokens = work.steps, work.tokens
            expert.seconds = time.perf_counter() - start
            manifest.cpu = cpu
            atomic_write(out / MANIFEST, manifest.to_json())
            bar.update(1)
    return manifest

