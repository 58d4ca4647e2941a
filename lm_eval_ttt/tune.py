"""``ttt-nn tune``: choose a method's hyperparameter on validation documents, never on test.

Validation documents are drawn from the index's own corpus (a seeded sample of its
documents, read through the index, so no test file is ever opened), and each is excluded
from its own neighbours by its corpus id. Every value of the grid is evaluated by a fresh
harness model of the method exactly as ``lm_eval`` would build it, on the same documents;
the table (value, bits per byte, gradient steps, seconds) is printed and written as a tune
record (``tunerecord.py``), and the value with the lowest bits per byte is chosen (ties go to
the cheaper one). Pass that file to the evaluation run as ``tuned=PATH``: the results then
record the tuned value and the validation documents it was chosen on.

The grid logic (``search_grid``: evaluate, widen past an edge the choice lands on, choose) is
apart from the evaluation of one value, so it runs on any evaluator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import import_module
from pathlib import Path

from lm_eval.api.instance import Instance

from index_server.index import open_index

from ._registration import models
from .documents import ROLLING, group_documents
from .metrics import bits_per_byte, curve_points, utf8_bytes
from .runlog import document_seconds, read_log
from .settings import NeighbourSettings, known_names, parse_model_args
from .task_data import read_jsonl, seeded_sample
from .tunerecord import GridRow, TuneRecord, Validation


@dataclass(frozen=True)
class TuneConfig:
    method: str
    param: str
    grid: tuple
    model_args: dict = field(default_factory=dict)  # pretrained, index, k, max_length, device, ...
    docs: int = 16
    min_chars: int = 300
    max_chars: int = 4000
    seed: int = 0
    out: Path = Path("work/tune")
    widen: int = 0  # values added beyond an edge of the grid while the choice lands on it
    validation_file: Path | None = None  # a held-out validation split instead of the index's own documents


def model_class(method: str):
    targets = models()
    if method not in targets:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(sorted(targets))}")
    module, name = targets[method].split(":")
    return getattr(import_module(module), name)


def file_documents(path: Path, count: int, seed: int, min_chars: int, max_chars: int) -> list[tuple[int, str]]:
    """(position in the file from 1, text) of up to ``count`` documents of a validation split, by the
    ``ttt_corpus`` task's rule (``task_data.seeded_sample``). None of them is in the index."""
    texts = [row["text"] for row in read_jsonl(Path(path))]
    picked = seeded_sample(len(texts), lambda positions: [texts[p] for p in positions], count, seed, min_chars,
                           max_chars)
    return [(position + 1, text) for position, text in picked]


def validation_documents(index, count: int, seed: int, min_chars: int, max_chars: int) -> list[tuple[int, str]]:
    """(corpus id, text) of up to ``count`` documents of the index's corpus, a seeded sample
    (``task_data.seeded_sample``) of those whose length lies in [min_chars, max_chars]."""
    return seeded_sample(index.manifest.n_vectors, index.texts, count, seed, min_chars, max_chars)


def requests_for(documents: list[tuple[int, str]], in_index: bool = True) -> list[Instance]:
    """Rolling requests; documents of the index's corpus carry their id, to be excluded from
    their own neighbours."""
    return [Instance(ROLLING, {"ttt_nn_corpus_id": doc_id} if in_index else {}, (text,), i,
                     metadata=("ttt_nn_validation", i, 1)) for i, (doc_id, text) in enumerate(documents)]


def evaluate_value(config: TuneConfig, value, documents: list[tuple[int, str]]) -> GridRow:
    """Bits per byte, gradient steps and seconds (retrieval, training, scoring and resets of
    its documents; model loading excluded) of one grid value on the documents."""
    cls = model_class(config.method)
    args = {**config.model_args, config.param: value, "log_dir": str(config.out / "logs")}
    lm = cls(**args)
    requests = requests_for(documents, in_index=config.validation_file is None)
    try:
        lls = lm.loglikelihood_rolling(requests)
    finally:
        lm.close()
    keys = {d.key for d in group_documents(ROLLING, requests)}
    records = [r for key, r in read_log(lm.log_stem).items() if key in keys]
    curve = curve_points(records)
    return GridRow(value=value, bits_per_byte=bits_per_byte(lls, utf8_bytes([t for _, t in documents])),
                   steps=sum(r.get("train_steps", 0) for r in records),
                   # read from the log, so a value resumed from an earlier tune (a widened grid) reports
                   # what it cost then, not the ~0 s of the resume
                   seconds=round(sum(map(document_seconds, records)), 2),
                   # with eval_at_k in the model arguments: validation bits per byte at each k
                   curve={str(k): round(bpb, 6) for k, _, bpb in curve} if len(curve) > 1 else None)


def beyond_edge(rows: list[GridRow], best: GridRow):
    """The next value past the edge of the evaluated values that ``best`` lies on, at the
    ratio of the edge to its neighbour (integers stay integers); None when ``best`` is inside."""
    values = sorted(r.value for r in rows)
    if len(values) < 2 or best.value not in (values[0], values[-1]):
        return None
    edge, inner = (values[0], values[1]) if best.value == values[0] else (values[-1], values[-2])
    step = edge * edge / inner if edge and inner else 2 * edge - inner
    if isinstance(edge, int):
        step = int(round(step))
        step = step if step != edge else edge + (1 if edge > inner else -1)
    return float(f"{step:.3g}") if isinstance(step, float) else step


def invalid(method: str, param: str, value) -> str | None:
    """Why the method refuses ``param=value`` (its settings' bounds), or None."""
    from .settings import ALIASES, ModelArgumentError, build

    name = ALIASES.get(param, param)
    for group in model_class(method).setting_groups:
        if name in known_names([group]):
            try:
                build(group, {name: value})
            except ModelArgumentError as e:
                return str(e).replace(f"{name}:", f"{param}:", 1)  # the name the tune was given
    return None


def choose(rows: list[GridRow]) -> tuple[GridRow, str]:
    """Lowest bits per byte; equal ones (to 1e-9) go to fewer steps, then fewer seconds."""
    best = min(rows, key=lambda r: (round(r.bits_per_byte, 9), r.steps, r.seconds))
    ties = [r for r in rows if round(r.bits_per_byte, 9) == round(best.bits_per_byte, 9)]
    reason = "lowest validation bits per byte" + (" (tie broken by fewer gradient steps)" if len(ties) > 1 else "")
    return best, reason


def search_grid(grid, evaluate: Callable[[object], GridRow], widen: int = 0,
                refuse: Callable[[object], str | None] = lambda value: None, echo=print, param: str = "value"
                ) -> tuple[list[GridRow], GridRow, str, list]:
    """Evaluate every value of ``grid`` in order; while the choice lands on an edge, evaluate
    the next value past it (``beyond_edge``), up to ``widen`` times, unless ``refuse(value)``
    says why the method cannot take it. Returns (rows, the choice, the reason, values added)."""
    rows, widened = [], []
    values = list(grid)
    while values:
        rows.append(evaluate(values.pop(0)))
        r = rows[-1]
        curve = "  " + " ".join(f"k={k}:{bpb:.4f}" for k, bpb in r.curve.items()) if r.curve else ""
        echo(f"{r.value!s:>12}  {r.bits_per_byte:>10.4f}  {r.steps:>6}  {r.seconds:>8.1f}{curve}")
        if not values and len(widened) < widen:  # the choice on an edge: look past it
            value = beyond_edge(rows, choose(rows)[0])
            problem = value is not None and refuse(value)
            if problem:
                echo(f"{'':>12}  the choice lies on the edge of the grid, but past it {problem}: not widened")
            elif value is not None:
                echo(f"{'':>12}  the choice lies on the edge of the grid: widened with {param}={value}")
                widened.append(value)
                values.append(value)
    best, reason = choose(rows)
    if beyond_edge(rows, best) is not None:
        reason += " (on the edge of the grid: widen it)"
    return rows, best, reason, widened


HARNESS_SEED = 1234  # lm_eval's default --seed torch seed: tune's numbers equal lm_eval's


def budget(config: TuneConfig) -> dict:
    """The validation rule a record was tuned under (``ttt-nn compare`` checks it on resume):
    the documents' source (a file, else the index whose corpus they are drawn from), their
    number and rule, and how far the grid widens."""
    source = {"file": str(config.validation_file)} if config.validation_file else {
        "index": config.model_args.get("index")}
    return {"docs": config.docs, "seed": config.seed, "min_chars": config.min_chars, "max_chars": config.max_chars,
            "widen": config.widen, **source}


def record_args(config: TuneConfig) -> dict:
    """The model arguments a tune's grid values run with, besides the tuned one, as its record
    keeps them: the harness's seed unless another is given, and no index for a method that
    retrieves nothing (the index only supplies its validation documents)."""
    args = {"seed": HARNESS_SEED, **config.model_args}
    if NeighbourSettings not in model_class(config.method).setting_groups:
        args = {k: v for k, v in args.items() if k not in NeighbourSettings.INDEX_ARGS}
    return {k: v for k, v in args.items() if k not in ("log_dir", config.param)}


def run_tune(config: TuneConfig, echo=print) -> TuneRecord:
    """Tune ``config.param`` on validation documents; the record is written to ``<out>/tune.json``."""
    from .assets import ensure_default_index

    names = known_names([NeighbourSettings])
    (settings,) = parse_model_args((NeighbourSettings,), {k: v for k, v in config.model_args.items() if k in names})[0]
    retrieves = NeighbourSettings in model_class(config.method).setting_groups
    identity = None  # a method that retrieves nothing, tuned on a validation file, needs no index
    if retrieves or config.validation_file is None:
        spec = settings.index if settings.index is not None else str(ensure_default_index())
        index = open_index(spec, settings.index_options())  # the run's token, TLS, corpus root, timeout
        try:
            identity = index.manifest.identity
            if config.validation_file is None:
                documents = validation_documents(index, config.docs, config.seed, config.min_chars, config.max_chars)
        finally:
            index.close()
    rule = budget(config)  # before the index of a method without neighbours leaves its arguments
    config = replace(config, model_args=record_args(config))
    if config.validation_file is not None:
        documents = file_documents(config.validation_file, config.docs, config.seed, config.min_chars, config.max_chars)
        where = f"{config.validation_file} (documents"
    else:
        where = f"the corpus of index {identity}, each excluded from its own neighbours (ids"
    if not documents:
        raise ValueError(f"no validation document has {config.min_chars}-{config.max_chars} characters")
    echo(f"{len(documents)} validation documents from {where} {[d for d, _ in documents][:8]}"
         f"{' ...' if len(documents) > 8 else ''}); {config.method} {config.param} in {list(config.grid)}")
    echo(f"{config.param:>12}  {'bits/byte':>10}  {'steps':>6}  {'seconds':>8}")
    rows, best, reason, widened = search_grid(
        config.grid, lambda value: evaluate_value(config, value, documents), config.widen,
        lambda value: invalid(config.method, config.param, value), echo, config.param)
    k = settings.k if retrieves else None
    record = TuneRecord(
        method=config.method, param=config.param, value=best.value, reason=reason,
        k=best.value if config.param == "k" else k,
        args=config.model_args,
        grid=tuple(config.grid), widened=tuple(widened), rows=tuple(rows),
        validation=Validation(count=len(documents), ids=tuple(d for d, _ in documents), index=identity,
                              seed=config.seed, file=str(config.validation_file) if config.validation_file else None),
        budget=rule)
    path = record.write(config.out / "tune.json")
    echo(f"chosen {config.param}={best.value}: {reason} ({best.bits_per_byte:.4f}); written {path}; "
         f"pass --model_args ...,{config.param}={best.value},tuned={path}")
    return record
