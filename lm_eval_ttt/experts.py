"""Amortised test-time training: LoRA experts trained once per cluster of the index, merged per document.

A directory of experts (``ttt-nn experts build``, ``experts_build.py``) holds ``experts.json``
(``ExpertsManifest``: the model and index they belong to, the clustering, the training
settings, per expert its documents, steps and seconds), ``centroids.npy`` (one unit-length
key per cluster) and one ``expert-NNNNN.safetensors`` per cluster: the LoRA factors ``A``
(r x in) and ``B`` (out x r) of every adapted linear layer, named by the layer's path in the
plain model.

At test time (``--model ttt-nn`` with ``experts=DIR``) the document's query embedding, the
one retrieval computes, picks the ``experts_top`` experts whose keys have the highest
cosine with it, weighted by a softmax over those cosines at ``experts_temperature`` (TTMM's
``exp(-(1 - cos) / beta^2)`` with beta = 0.2 is a softmax at temperature 0.04). The merge is
exact in delta W: each adapted layer's weight becomes ``W + sum_k w_k s B_k A_k``, computed as
one product of the concatenated factors (``A = [w_1 s A_1; ...]``, ``B = [B_1 ... B_M]``),
never an average of the A and B factors apart: the product of averaged factors is not the
average of the products (it adds cross terms ``B_k A_l`` between experts whose trained A
differ). The offset is folded into the weights for the document, so its forward and backward
passes cost what the base model's do (an offset kept beside the weights as a rank M r
product costs every step more, the more experts are merged), and whatever test-time
training then updates (every weight, the top blocks, fresh adapters) starts from base +
experts. Leaving the document copies the base weights back from one copy of the adapted
layers taken when the experts are attached: bit for bit, whatever the training did. The
merged weight is rounded to the weight's dtype (in a bfloat16 model, to bfloat16, as peft's
own merge of an adapter rounds). The experts stay in memory across documents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

MANIFEST = "experts.json"
CENTROIDS = "centroids.npy"
FORMAT = 1


class ExpertsError(ValueError):
    """An experts directory that is missing, incomplete, or built for another model or index."""


def expert_file(cluster: int) -> str:
    return f"expert-{cluster:05d}.safetensors"


@dataclass
class Expert:
    """One cluster's expert: the corpus documents it trained on (in training order) and what
    that cost; ``sha256`` empty until its file is written."""

    cluster: int
    docs: list[int]
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    sha256: str = ""


@dataclass
class ExpertsManifest:
    """What an experts directory was built from and what it holds (``experts.json``)."""

    pretrained: str  # the model's path or hub name at build time (the fingerprint is what is checked)
    model: str  # harness.model_fingerprint of the base model
    index: str  # the index's identity
    vectors: str  # where the clustered vectors came from ("stored-f16", "exact", "re-embedded")
    clustering: dict  # clusters, method, sample, seed, centroids' sha256
    training: dict  # the LoRA and trainer settings, docs per expert, tokens per document
    experts: list[Expert]
    clustering_s: float = 0.0
    cpu: str = ""  # the CPU that trained the experts (of the invocation that trained the last one)
    format: int = FORMAT
    plan: dict = field(default_factory=dict)  # how documents were chosen, in words

    def build_key(self) -> dict:
        """What must agree for a build to resume into this directory."""
        return {"model": self.model, "index": self.index, "training": self.training,
                "clusters": self.clustering["clusters"], "seed": self.clustering["seed"],
                "sample": self.clustering["sample"]}

    @property
    def done(self) -> int:
        return sum(1 for e in self.experts if e.sha256)

    @property
    def offline_s(self) -> float:
        """Seconds the build spent: clustering plus every expert's training."""
        return self.clustering_s + sum(e.seconds for e in self.experts)

    def digest(self) -> str:
        """Names the experts' content: the build and every expert file's hash."""
        payload = json.dumps({**self.build_key(), "centroids": self.clustering["centroids_sha256"],
                              "files": [e.sha256 for e in self.experts]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def read(cls, directory: Path) -> ExpertsManifest:
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text())
            data["experts"] = [Expert(**e) for e in data["experts"]]
            manifest = cls(**data)
        except FileNotFoundError:
            raise ExpertsError(f"{directory}: not an experts directory (no {MANIFEST}; build one with "
                               f"`ttt-nn experts build`)") from None
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ExpertsError(f"{path}: not an experts manifest of this version ({e})") from e
        if manifest.format != FORMAT:
            raise ExpertsError(f"{path}: experts format {manifest.format}, this version reads {FORMAT}")
        return manifest


def experts_problem(directory: str | Path) -> str | None:
    """Why ``directory`` holds no usable experts, as far as its manifest tells (milliseconds:
    checked before the model loads), or None."""
    try:
        manifest = ExpertsManifest.read(Path(directory).expanduser())
    except ExpertsError as e:
        return str(e)
    if manifest.done < len(manifest.experts):
        return (f"{directory}: {manifest.done} of {len(manifest.experts)} experts built; run the same "
                f"`ttt-nn experts build` again to finish them")
    return None


def _check_sha256(path: Path, expected: str) -> None:
    """The file is the one the manifest names (the digest that names the logs rests on it)."""
    if not path.is_file():
        raise ExpertsError(f"{path}: missing (the manifest lists it)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ExpertsError(f"{path}: contents differ from the manifest's sha256 (modified or replaced)")


@dataclass(frozen=True)
class ExpertChoice:
    """The experts a document starts from: cluster ids, nearest first, their merge weights
    and the cosines that chose them."""

    ids: list[int]
    weights: list[float]
    cosines: list[float]

    def record(self) -> dict:
        return {"experts": self.ids, "expert_weights": self.weights, "expert_cosines": self.cosines}


def merge_weights(cosines: np.ndarray, top: int, temperature: float) -> ExpertChoice:
    """The ``top`` highest cosines (ties: the smaller id) and a softmax over them at
    ``temperature``, computed from the largest one down (no underflow to NaN)."""
    order = np.lexsort((np.arange(len(cosines)), -cosines))[:top]
    chosen = cosines[order].astype(np.float64)
    logits = (chosen - chosen.max()) / temperature
    weights = np.exp(logits) / np.exp(logits).sum()
    return ExpertChoice([int(i) for i in order], [float(w) for w in weights], [float(c) for c in chosen])


class Experts:
    """Every expert of a directory in memory, attached to a model's linear layers."""

    def __init__(self, directory: Path, manifest: ExpertsManifest, keys: np.ndarray,
                 factors: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]):
        self.directory, self.manifest, self.keys, self.factors = directory, manifest, keys, factors
        self.scale = manifest.training["lora_alpha"] / manifest.training["lora_r"]
        self._layers: dict[str, torch.nn.Module] = {}
        self._transposed: set[str] = set()
        self._base: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, directory: str | Path, model_fingerprint: str, index_identity: str) -> Experts:
        """The experts of ``directory``, refused with one error naming both sides when they were
        built for another model or index."""
        from safetensors.torch import load_file

        directory = Path(directory).expanduser()
        if problem := experts_problem(directory):
            raise ExpertsError(problem)
        manifest = ExpertsManifest.read(directory)
        if manifest.model != model_fingerprint or manifest.index != index_identity:
            raise ExpertsError(
                f"{directory}: experts built for model {manifest.model} ({manifest.pretrained}) and index "
                f"{manifest.index}; this run has model {model_fingerprint} and index {index_identity}. Build experts "
                f"for this model and index with `ttt-nn experts build`")
        _check_sha256(directory / CENTROIDS, manifest.clustering["centroids_sha256"])
        keys = np.load(directory / CENTROIDS)
        factors = {}
        for expert in manifest.experts:
            if not expert.docs:
                continue  # an empty cluster has no expert: never chosen
            _check_sha256(directory / expert_file(expert.cluster), expert.sha256)
            tensors = load_file(directory / expert_file(expert.cluster))
            factors[expert.cluster] = {name[: -len(".A")]: (tensors[name], tensors[name[: -len(".A")] + ".B"])
                                       for name in tensors if name.endswith(".A")}
        return cls(directory, manifest, keys, factors)

    def choose(self, query: np.ndarray, top: int, temperature: float) -> ExpertChoice:
        """The experts nearest the query embedding (cosine to their keys)."""
        q = np.asarray(query, dtype=np.float32)
        norm = float(np.linalg.norm(q))
        if not math.isfinite(norm) or norm == 0:
            raise ExpertsError("the document's query embedding is zero or not finite: no expert can be chosen")
        ids = sorted(self.factors)
        cosines = self.keys[ids] @ (q / norm)
        choice = merge_weights(cosines, min(top, len(ids)), temperature)
        return ExpertChoice([ids[i] for i in choice.ids], choice.weights, choice.cosines)

    def attach(self, model: torch.nn.Module) -> None:
        """The linear layers the experts adapt (paths in ``model``, the plain model before any
        test-time adapter wraps it; a wrapper keeps these modules as its base layers), and a
        copy of their weights to restore after each document."""
        modules = dict(model.named_modules())
        names = {name for layers in self.factors.values() for name in layers}
        missing = sorted(names - modules.keys())
        if missing:
            raise ExpertsError(f"{self.directory}: the model has no layer {missing[0]} (and {len(missing) - 1} more) "
                               f"that the experts adapt")
        from transformers.pytorch_utils import Conv1D

        self._layers = {name: modules[name] for name in sorted(names)}
        # GPT-2's Conv1D keeps its weight as (in, out), the transpose of B A (peft's fan_in_fan_out)
        self._transposed = {name for name, m in self._layers.items() if isinstance(m, Conv1D)}
        for c, layers in self.factors.items():
            for name, (a, b) in layers.items():
                shape = tuple(self._layers[name].weight.shape)
                expected = (a.shape[1], b.shape[0]) if name in self._transposed else (b.shape[0], a.shape[1])
                if shape != expected:
                    raise ExpertsError(f"{self.directory}: expert {c}'s factors for {name} make a {expected} "
                                       f"offset; the model's weight there is {shape}")
        # each layer's factors where its weight lies (a model may span devices)
        self.factors = {c: {n: (a.to(modules[n].weight.device), b.to(modules[n].weight.device))
                            for n, (a, b) in layers.items()} for c, layers in self.factors.items()}
        with torch.no_grad():
            self._base = {name: m.weight.detach().clone() for name, m in self._layers.items()}

    @contextlib.contextmanager
    def applied(self, choice: ExpertChoice) -> Iterator[None]:
        """Inside, the chosen experts are merged into the adapted layers' weights (exact in
        delta W); leaving restores the base weights from their copy."""
        touched = sorted({n for c in choice.ids for n in self.factors[c]})
        try:
            with torch.no_grad():
                for name in touched:
                    parts = [(w * self.scale * self.factors[c][name][0], self.factors[c][name][1])
                             for c, w in zip(choice.ids, choice.weights) if name in self.factors[c]]
                    delta = torch.cat([b for _, b in parts], dim=1) @ torch.cat([a for a, _ in parts])
                    if name in self._transposed:
                        delta = delta.T
                    weight = self._layers[name].weight
                    dtype = torch.promote_types(weight.dtype, delta.dtype)  # the sum in the wider of the two
                    weight.copy_((self._base[name].to(dtype) + delta.to(dtype)).to(weight.dtype))
            yield
        finally:
            with torch.no_grad():
                for name in touched:
                    self._layers[name].weight.copy_(self._base[name])

    def info(self) -> dict:
        """What the results record of the experts: where, which, and their offline cost."""
        m = self.manifest
        return {"dir": str(self.directory.resolve()), "digest": m.digest(), "clusters": len(m.experts),
                "docs_per_expert": m.training["docs_per_expert"], "offline_s": m.offline_s,
                "clustering_s": m.clustering_s, "vectors": m.vectors, "cpu": m.cpu}
