"""Every model argument of ttt-nn and its baselines: its default, its help, its checks.

One home for defaults (as peft's ``LoraConfig``): each group is a frozen dataclass whose
fields carry their help text and bounds. The harness models parse ``--model_args`` through
``parse_model_args`` *before* the language model loads, so a misspelled name or a bad
value is an error in milliseconds, naming the closest valid argument, instead of a
traceback from ``from_pretrained`` half a minute later. The ``ttt-nn`` CLI reads its
defaults and help from the same fields, and the README's argument table is checked against
them by a test.

Values arrive as lm-eval parses them (``k=5`` -> 5, ``-1`` -> -1, ``true`` -> True, JSON
lists from ``--model_args '{...}'``) or as Python objects; ``coerce`` turns each into its
field's type. Lists inside the comma-separated form use ``:`` (``eval_at_k=0:1:5``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index_server.options import NLIST_PER_NPROBE, REFINE_FACTOR, IndexOptions

_DEFAULT_INDEX_OPTIONS = IndexOptions()

# The paper's constant learning rates of full test-time training: GPT-2 up to 774M, and from
# GPT-Neo 1.3B on.
PAPER_LR_SMALL, PAPER_LR_LARGE, LARGE_MODEL_PARAMS = 2e-5, 5e-6, 1_000_000_000
# Chosen by `ttt-nn tune` on validation documents of the bundled index (SmolLM2-135M,
# 256-token neighbours, rank 8) at DEFAULT_LORA_LR_K neighbours, the default k, where its
# validation curve falls all the way (docs/methods.md "Parameter-efficient TTT";
# docs/bench/tune-lora-lr.json; docs/experiments/defaults.toml declares that tune).
DEFAULT_LORA_LR, DEFAULT_LORA_LR_K = 1e-3, 20
# The rate of steps on a document's own windows, ttt-nn-dyneval's lr and ttt-nn's dyneval_lr
# alike: chosen by `ttt-nn tune` for ttt-nn-dyneval on the bundled validation documents, and
# by the combined tune (k=10) for dyneval_lr (docs/compare/validation.md).
DEFAULT_DYNEVAL_LR = 2e-4
# What the comparisons recommend for its cost (docs/results.md, the bundled code task): the top 6 blocks of
# the bundled SmolLM2-135M train, on 5 neighbours, then dynamic evaluation on the document. Its
# rates were chosen on the bundled index's validation documents (docs/compare/validation.md:
# the tunes "top" and "top-combined"); `ttt-nn demo` shows it beside the paper's untuned rate.
RECOMMENDED = {"k": 5, "train_layers": 6, "lr": 2e-4, "dyneval_iterations": 1, "dyneval_lr": 5e-4}
# Merge weights of experts: TTMM's exp(-(1 - cosine) / beta^2) with beta = 0.2, a softmax over
# the cosines at temperature beta^2 (Bertolissi et al., COLM 2025; rbertolissi/ttmerge).
DEFAULT_EXPERTS_TEMPERATURE = 0.04
# Training and scoring arithmetic: precision name -> torch dtype name (None: fp32 throughout).
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def arg(default, help: str, *, choices: tuple | None = None, minimum: float | None = None,
        above: float | None = None, below: float | None = None, scoring: bool = True):
    """A model argument. ``minimum`` is inclusive, ``above`` and ``below`` exclusive;
    ``scoring=False`` marks arguments that cannot change a score (left out of the settings
    identity)."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum,
                                            "above": above, "below": below, "scoring": scoring})


@dataclass(frozen=True)
class RunSettings:
    """The per-document log and the run's randomness: every method."""

    log_dir: str | None = arg(None, "per-document logs (default: <--output_path>/ttt-nn-logs, else ./ttt-nn-logs)",
                              scoring=False)
    resume: bool = arg(True, "reuse documents already in the log of a run with the same settings", scoring=False)
    seed: int | None = arg(None, "seed of the per-document training randomness (default: the harness's --seed "
                                 "torch seed)", minimum=0)
    tuned: str | None = arg(None, "tune record (tune.json of `ttt-nn tune` or `ttt-nn compare`) whose value this run "
                                  "uses; the results record it and its validation documents, or that it was given",
                            scoring=False)


@dataclass(frozen=True)
class NeighbourSettings:
    """Retrieval and selection: every method that uses neighbours."""

    index: str | None = arg(None, "index directory, or grpc://host:port+host:port for shard servers "
                                  "(default: the bundled index, built on first use)", scoring=False)
    k: int = arg(20, "neighbours trained on per document (with select=sift: selected examples); 0 equals --model hf",
                 minimum=0)
    query: str = arg("full", "full: retrieve on the scored text; prefix: split protocol, retrieve on the document's "
                             "'prefix' field (a *_split task)", choices=("full", "prefix"))
    exclude_duplicates: bool = arg(False, "drop neighbours that are near-exact copies of the query "
                                          "(>= 80% shared word 5-grams)")
    select: str = arg("nearest", "nearest: the k nearest, nearest first; sift: k picks from `candidates` that most "
                                 "reduce the query's posterior variance (repeats allowed)", choices=("nearest", "sift"))
    candidates: int = arg(200, "select=sift: candidates retrieved before selection (K)", minimum=1)
    sift_lambda: float = arg(0.01, "select=sift: noise variance of the kernel surrogate; smaller spreads the picks "
                                   "over distinct candidates, larger repeats the most relevant ones", above=0)
    alpha: float | None = arg(None, "adaptive compute (select=sift): stop at step n once sigma_n > 1/(alpha*n)",
                              above=0)
    max_distance: float | None = arg(None, "drop neighbours farther than this index distance (reference: 4.0)",
                                     minimum=0)
    neighbour_cache: str | None = arg(None, "neighbour cache directory (default: $TTT_NN_HOME/neighbour-cache)",
                                      scoring=False)
    retrieval_batch: int = arg(64, "queries embedded and searched per call when retrieving up front",
                               minimum=1, scoring=False)
    failure_policy: str = arg(_DEFAULT_INDEX_OPTIONS.failure_policy,
                              "gRPC: fail, or degrade (answer from live shards; logged, never cached)",
                              choices=("fail", "degrade"), scoring=False)
    retrieval_timeout: float = arg(_DEFAULT_INDEX_OPTIONS.timeout_s, "gRPC: seconds per call", above=0, scoring=False)
    index_token_file: str | None = arg(None, "gRPC: file holding the servers' bearer token (or set "
                                             "TTT_NN_INDEX_TOKEN)", scoring=False)
    index_tls_ca: str | None = arg(None, "gRPC: PEM root certificate of TLS servers", scoring=False)
    # Search knobs reach the settings identity through the retriever's signature, which
    # counts them only for index types whose answers they change.
    index_nprobe: int | None = arg(_DEFAULT_INDEX_OPTIONS.nprobe,
                                   f"IVF lists probed per query (default: the server's, else the index's: "
                                   f"nlist/{NLIST_PER_NPROBE})", minimum=1, scoring=False)
    index_ef_search: int | None = arg(_DEFAULT_INDEX_OPTIONS.ef_search, "HNSW efSearch (default: the server's, else "
                                                                        "Faiss's)", minimum=1, scoring=False)
    index_refine_factor: int | None = arg(_DEFAULT_INDEX_OPTIONS.refine_factor,
                                          f"--refine indexes: candidates per neighbour re-ranked exactly (default: the "
                                          f"server's, else {REFINE_FACTOR})", minimum=1, scoring=False)
    corpus_root: str | None = arg(None, "in-process index: directory its corpus files live under on this machine",
                                  scoring=False)

    INDEX_ARGS = ("index", "retrieval_timeout", "failure_policy", "index_token_file", "index_tls_ca", "index_nprobe",
                  "index_ef_search", "index_refine_factor", "corpus_root")  # what opens the index (below)

    def index_options(self) -> IndexOptions:
        """How to open ``index`` (the ``INDEX_ARGS`` besides it): every option given here
        reaches the client."""
        return IndexOptions(
            timeout_s=self.retrieval_timeout, failure_policy=self.failure_policy,
            token_file=Path(self.index_token_file) if self.index_token_file else None,
            tls_ca=Path(self.index_tls_ca) if self.index_tls_ca else None, nprobe=self.index_nprobe,
            ef_search=self.index_ef_search, refine_factor=self.index_refine_factor,
            corpus_root=Path(self.corpus_root) if self.corpus_root else None,
        )


@dataclass(frozen=True)
class TrainSettings:
    """The test-time training loop (ttt-nn, and dyneval's updates)."""

    lr: float | None = arg(None, f"learning rate (default: {PAPER_LR_SMALL:g} below {LARGE_MODEL_PARAMS / 1e9:g}B "
                                 f"parameters, {PAPER_LR_LARGE:g} from {LARGE_MODEL_PARAMS / 1e9:g}B, the paper's; "
                                 f"adapter=lora: {DEFAULT_LORA_LR:g}, chosen on validation documents at "
                                 f"k={DEFAULT_LORA_LR_K}; ttt-nn-dyneval: {DEFAULT_DYNEVAL_LR:g}, dyneval_lr's "
                                 f"default)", above=0)
    precision: str = arg("fp32", "training and scoring arithmetic: fp32, or bf16/fp16 autocast with fp32 master "
                                 "weights", choices=tuple(PRECISIONS))
    compile: bool = arg(False, "torch.compile the forward (falls back to eager with a warning)", scoring=False)
    adapter: str = arg("none", "none: train every weight; lora: train low-rank adapters only (peft)",
                       choices=("none", "lora"))
    lora_r: int = arg(8, "adapter=lora: rank", minimum=1)
    lora_alpha: float = arg(16.0, "adapter=lora: scaling numerator (scale = lora_alpha / lora_r)", above=0)
    lora_dropout: float = arg(0.0, "adapter=lora: dropout on the adapter input", minimum=0, below=1)
    lora_targets: tuple[str, ...] | None = arg(None, "adapter=lora: module names to adapt, e.g. q_proj:v_proj "
                                                     "(default: every linear layer peft finds but the output head)")
    doc_batch: int = arg(1, "adapter=lora: documents trained at once, each with its own adapter", minimum=1,
                         scoring=False)
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass instead of keeping them: "
                                              "less memory (LoRA: 15% of full TTT's extra memory instead of 26%), "
                                              "1.4x the training time on CPU", scoring=False)
    train_layers: int | None = arg(None, "train only the top N transformer blocks and what sits above them (the "
                                         "final norm; the output head unless it is tied to the input embeddings): "
                                         "the backward pass stops below them. adapter=lora: adapters in those "
                                         "blocks only", minimum=1)


@dataclass(frozen=True)
class TTTSettings:
    """What ``--model ttt-nn`` adds to training: neighbours as data."""

    max_neighbor_tokens: int | None = arg(None, "cap on tokens trained per neighbour (none: all of it)", minimum=1)
    order: str = arg("nearest", "training order: nearest first, or farthest first (ablation)",
                     choices=("nearest", "farthest"))
    reset_optimizer: bool = arg(True, "false reproduces the reference code's leak of Adam state between documents")
    eval_at_k: tuple[int, ...] | None = arg(None, "extra scoring points for a curve, e.g. 0:1:5:10 (final k always)",
                                            minimum=0)
    neighbour_batch: int = arg(1, "neighbour chunks per optimizer step, padded into one batch (attention- and "
                                  "loss-masked); 1: one step per chunk", minimum=1)
    dyneval_iterations: int = arg(0, "after the neighbours, score the document window by window and take this many "
                                     "steps on each window once it is scored (dynamic evaluation); rolling "
                                     "(perplexity) tasks only", minimum=0)
    dyneval_lr: float = arg(DEFAULT_DYNEVAL_LR, "learning rate of the steps on the document's own windows (the "
                                                "default of ttt-nn-dyneval's lr too: one rate for one operation; "
                                                "chosen for ttt-nn-dyneval on the bundled validation documents)",
                            above=0)
    experts: str | None = arg(None, "experts directory (`ttt-nn experts build`): each document starts from the merged "
                                    "experts nearest its query embedding, then takes its k neighbour steps (k=0: "
                                    "experts alone) and optional dynamic evaluation", scoring=False)
    experts_top: int = arg(1, "experts: how many of the nearest experts are merged", minimum=1)
    experts_temperature: float = arg(DEFAULT_EXPERTS_TEMPERATURE, "experts: softmax temperature over the merged "
                                                                  "experts' cosines (TTMM's beta^2)", above=0)


@dataclass(frozen=True)
class ContextSettings:
    context_tokens: int | None = arg(None, "tokens of neighbour text before the document (default: max_length/2)",
                                     minimum=0)


@dataclass(frozen=True)
class InterpolationSettings:
    lam: float = arg(0.1, "weight of the neighbours' token histogram, (1-lambda) p_model + lambda h",
                     minimum=0, below=1)


@dataclass(frozen=True)
class DynamicEvalSettings:
    iterations: int = arg(1, "AdamW steps on each window after scoring it", minimum=0)


@dataclass(frozen=True)
class ExpertsSettings:
    """How experts are built (``ttt-nn experts build``; its help derives from these fields)."""

    clusters: int = arg(32, "clusters of the index, one expert each", minimum=1)
    docs_per_expert: int = arg(64, "documents each expert trains on (fewer when its cluster has fewer)", minimum=1)
    lr: float = arg(DEFAULT_LORA_LR, "learning rate of the experts' training (LoRA's default rate)", above=0)
    lora_r: int = arg(TrainSettings.lora_r, "adapter rank", minimum=1)
    lora_alpha: float = arg(TrainSettings.lora_alpha, "adapter scaling numerator (scale = lora_alpha / lora_r)",
                            above=0)
    max_length: int = arg(256, "tokens per training chunk", minimum=2)
    max_doc_tokens: int = arg(256, "tokens trained per document (its first)", minimum=2)
    seed: int = arg(0, "seed of the sample, the clustering, the document choice and the adapters' initialisation",
                    minimum=0)

    def training(self) -> dict:
        """The manifest's training settings (what the experts' deltas depend on)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("clusters", "seed")} | {
            "adapter": "lora"}


ALIASES = {"lambda": "lam"}
# Arguments of HFLM that only decide where or how fast things run, never a score.
HF_NON_SCORING = frozenset({
    "device", "batch_size", "max_batch_size", "parallelize", "max_memory_per_gpu", "max_cpu_memory",
    "offload_folder", "logits_cache",
})
# from_pretrained keywords HFLM forwards through **kwargs that users pass in practice.
HF_PASSTHROUGH = frozenset({"attn_implementation", "low_cpu_mem_usage", "device_map"})


class ModelArgumentError(ValueError):
    """A model argument has an unknown name or an invalid value."""


def _hf_parameters() -> dict[str, inspect.Parameter]:
    from lm_eval.models.huggingface import HFLM

    params = dict(inspect.signature(HFLM.__init__).parameters)
    return {n: p for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def hf_argument_names() -> set[str]:
    """Every argument ``--model hf`` takes by name (HFLM's signature and the passthrough keywords)."""
    return set(_hf_parameters()) | HF_PASSTHROUGH


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def _scalar(name: str, kind: type, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ModelArgumentError(f"{name}: expected true or false, got {value!r}")
    if kind is int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ModelArgumentError(f"{name}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not number.is_integer():
            raise ModelArgumentError(f"{name}: expected an integer, got {value!r}")
        return int(number)
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ModelArgumentError(f"{name}: expected a number, got {value!r}") from None
    return str(value)


def coerce(name: str, annotation, value):
    """Cast one lm-eval value to the field's annotated type (``X | None`` and tuples too)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if _is_none(value):
            return None
        return coerce(name, members[0], value)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v for v in value.replace(",", ":").split(":") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_scalar(name, item, v) for v in value)
    return _scalar(name, annotation, value)


def _check(name: str, meta: dict, value) -> None:
    if value is None:
        return
    for item in value if isinstance(value, tuple) else (value,):
        if meta["choices"] and item not in meta["choices"]:
            raise ModelArgumentError(f"{name}: must be one of {', '.join(meta['choices'])}, got {item!r}")
        if meta["minimum"] is not None and item < meta["minimum"]:
            raise ModelArgumentError(f"{name}: must be >= {meta['minimum']}, got {item!r}")
        if meta["above"] is not None and item <= meta["above"]:
            raise ModelArgumentError(f"{name}: must be > {meta['above']}, got {item!r}")
        if meta["below"] is not None and item >= meta["below"]:
            raise ModelArgumentError(f"{name}: must be < {meta['below']}, got {item!r}")


def build(cls, values: dict):
    """One settings dataclass from raw values (unknown keys are the caller's business)."""
    hints = typing.get_type_hints(cls)
    parsed = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            parsed[f.name] = coerce(f.name, hints[f.name], values[f.name])
            _check(f.name, f.metadata, parsed[f.name])
    return cls(**parsed)


def known_names(groups) -> set[str]:
    return {f.name for g in groups for f in dataclasses.fields(g)}


def parse_model_args(groups, kwargs: dict[str, Any]) -> tuple[list, dict[str, Any]]:
    """Split ``kwargs`` into our settings groups (validated) and HFLM's keyword arguments.

    Raises ``ModelArgumentError`` for a name neither we nor HFLM know (suggesting the
    closest one) and for invalid values of ours or of the HFLM arguments checked here.
    """
    kwargs = {ALIASES.get(k, k): v for k, v in kwargs.items()}
    ours = known_names(groups)
    hf = _hf_parameters()
    unknown = [k for k in kwargs if k not in ours and k not in hf and k not in HF_PASSTHROUGH]
    if unknown:
        valid = sorted(ours | set(hf) | HF_PASSTHROUGH | set(ALIASES))
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ModelArgumentError(f"unknown model argument {', '.join(hints)}; valid arguments: {', '.join(valid)}")
    settings = [build(g, {k: v for k, v in kwargs.items() if k in known_names([g])}) for g in groups]
    hf_kwargs = {k: v for k, v in kwargs.items() if k not in ours}
    check_hf_values(hf_kwargs)
    return settings, hf_kwargs


def check_hf_values(hf_kwargs: dict[str, Any]) -> None:
    """The HFLM arguments whose bad values would otherwise surface only after loading."""
    import torch

    dtype = hf_kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ModelArgumentError(f"dtype: expected auto or a torch dtype name (float32, bfloat16, ...), got {dtype!r}")
    max_length = hf_kwargs.get("max_length")
    if max_length is not None and (coerce("max_length", int, max_length) < 2):
        raise ModelArgumentError(f"max_length: must be >= 2, got {max_length!r}")
    batch_size = hf_kwargs.get("batch_size")
    if batch_size is not None and not str(batch_size).startswith("auto"):
        if coerce("batch_size", int, batch_size) < 1:
            raise ModelArgumentError(f"batch_size: must be >= 1 or auto, got {batch_size!r}")


def scoring_values(settings) -> dict[str, Any]:
    """The fields of one settings object that can change a score (for the settings identity)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.metadata["scoring"]}


def hf_scoring_values(hf_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every HFLM argument with its effective value (given or default), minus those that
    cannot change a score. Derived from HFLM's signature, so new HFLM arguments count."""
    values = {}
    for name, param in _hf_parameters().items():
        if name in HF_NON_SCORING or name == "pretrained":
            continue
        value = hf_kwargs.get(name, param.default)
        values[name] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)
    for name in HF_PASSTHROUGH & hf_kwargs.keys() - {"device_map"}:
        values[name] = hf_kwargs[name]
    return values


def help_rows(groups) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every argument of the given groups, for the CLI and docs."""
    return [(f.name, f.default, f.metadata["help"]) for g in groups for f in dataclasses.fields(g)]


# The order the README's argument table lists the groups in.
DOCUMENTED_GROUPS = (NeighbourSettings, RunSettings, TrainSettings, TTTSettings, ContextSettings,
                     InterpolationSettings, DynamicEvalSettings)
# Groups that only one baseline model reads: the table names it before the help.
BASELINE_OF = {ContextSettings: "ttt-nn-context", InterpolationSettings: "ttt-nn-interp",
               DynamicEvalSettings: "ttt-nn-dyneval"}


def arguments_table() -> str:
    """The Markdown table of every model argument, its default and its help (the README's,
    which a test compares with this; ``ttt-nn arguments`` prints it)."""
    def cell(default) -> str:
        return "-" if default is None else str(default).lower() if isinstance(default, bool) else str(default)

    names = {v: k for k, v in ALIASES.items()}
    rows = ["| argument | default | meaning |", "|---|---|---|",
            "| `pretrained` | bundled SmolLM2-135M | HF causal LM, hub id or path (and every other HFLM argument) |"]
    for group in DOCUMENTED_GROUPS:
        only = f"{BASELINE_OF[group]}: " if group in BASELINE_OF else ""
        rows += [f"| `{names.get(name, name)}` | {cell(default)} | {only}{text} |"
                 for name, default, text in help_rows([group])]
    return "\n".join(rows) + "\n"


def add_settings_arguments(parser, group) -> None:
    """One ``--flag`` per field of a settings dataclass: its type, default, help and checks."""
    hints = typing.get_type_hints(group)
    for f in dataclasses.fields(group):
        def parse(value, name=f.name, meta=f.metadata, kind=hints[f.name]):
            try:
                parsed = coerce(name, kind, value)
                _check(name, meta, parsed)
            except ModelArgumentError as e:
                raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from e
            return parsed

        parser.add_argument(f"--{f.name.replace('_', '-')}", type=parse, default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})")
