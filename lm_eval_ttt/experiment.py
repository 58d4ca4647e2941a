"""An experiment file: a comparison of methods declared once, as data.

An lm-eval task is a YAML file; a ttt-nn comparison is a TOML file that says once the model,
the index, where the validation and test documents come from, the tuning budget, and each
method: its label, harness model, arguments, and the argument it tunes with its grid. From that
declaration ``compare.py`` derives every tune, every ``lm_eval`` run and the report's labels.

TOML rather than YAML: a grid of learning rates is ``[5e-5, 1e-4]`` and means numbers in TOML,
where YAML 1.1 (PyYAML, which lm-eval uses) reads ``1e-4`` as a string; and ``tomllib`` is in
the standard library and names the line of a syntax error. Relative paths are relative to the
working directory, as in ``lm_eval`` arguments.

Every mistake a file can hold is found by ``load`` before anything runs, as one line naming the
file, the entry and the fix: unknown sections or keys, an unknown model or model argument, a
value or grid value its argument refuses (type and bounds, through ``settings.parse_model_args``),
a label used twice, a missing index or corpus file, a reference to a tune that does not exist.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from index_server.index import spec_problem

from ._registration import models
from .settings import (
    ALIASES,
    ModelArgumentError,
    NeighbourSettings,
    hf_argument_names,
    known_names,
    parse_model_args,
)

HF = "hf"  # the stock harness model: the base every method is measured against
LABEL = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class ExperimentError(ValueError):
    """A mistake in an experiment file, as one line: file, entry, problem, fix."""


@dataclass(frozen=True)
class Chosen:
    """A model argument whose value is the one another method's tune chose: ``{chosen = "label"}``."""

    label: str


@dataclass(frozen=True)
class Tune:
    param: str
    grid: tuple


@dataclass(frozen=True)
class Method:
    label: str
    model: str  # a harness model name: hf or one of ours
    args: dict  # its own model arguments (values may be Chosen)
    tune: Tune | None = None
    note: str = ""  # a sentence for the report

    def needs(self) -> list[str]:
        """Labels whose tune this method's arguments take a value from."""
        return [v.label for v in self.args.values() if isinstance(v, Chosen)]


@dataclass(frozen=True)
class TestDocuments:
    task: str
    limit: int | None = None
    metadata: dict = field(default_factory=dict)  # --metadata of the task (ttt_corpus: corpus_file, sample, ...)
    include_path: str | None = None  # default: the bundled task folder


@dataclass(frozen=True)
class ValidationBudget:
    """The same for every tuned method: documents, their rule, and how far a grid widens."""

    docs: int = 8
    seed: int = 0
    min_chars: int = 500
    max_chars: int = 10000
    widen: int = 2
    file: str | None = None  # a held-out validation split; default: the index's own corpus


@dataclass(frozen=True)
class Experiment:
    path: Path
    methods: tuple[Method, ...]
    test: TestDocuments
    validation: ValidationBudget
    name: str = ""
    pretrained: str | None = None  # None: the bundled model
    index: str | None = None  # None: the bundled index
    out: Path = Path("work/compare")
    report: Path | None = None  # None: <out>/report
    base: str | None = None  # label of the base run (default: the one hf method)
    reference: str | None = None  # label the report also measures every method against
    device: str = "cpu"
    batch_size: int = 1
    args: dict = field(default_factory=dict)  # model arguments for every method that takes them

    def method(self, label: str) -> Method:
        return next(m for m in self.methods if m.label == label)

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.methods]

    @property
    def report_dir(self) -> Path:
        return self.report if self.report is not None else self.out / "report"

    @property
    def log_dir(self) -> Path:
        return self.out / "logs"

    def tune_dir(self, label: str) -> Path:
        return self.out / "tune" / label

    def run_dir(self, label: str) -> Path:
        return self.out / "runs" / label


# -- reading ----------------------------------------------------------------------------------
SECTIONS = {"experiment", "args", "test", "validation", "method"}
EXPERIMENT_KEYS = {"name", "pretrained", "index", "out", "report", "base", "reference", "device", "batch_size"}
TEST_KEYS = {"task", "limit", "metadata", "include_path"}
METHOD_KEYS = {"label", "model", "args", "tune", "note"}
TUNE_KEYS = {"param", "grid"}


def _close(name: str, valid) -> str:
    match = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


class _Reader:
    def __init__(self, path: Path, check_paths: bool = True):
        self.path = path
        self.check_paths = check_paths

    def fail(self, where: str, problem: str, fix: str = "") -> ExperimentError:
        return ExperimentError(f"{self.path}: {where}: {problem}" + (f"; {fix}" if fix else ""))

    def keys(self, where: str, table, valid: set[str]) -> dict:
        if not isinstance(table, dict):
            raise self.fail(where, f"expected a table, got {type(table).__name__}")
        for key in table:
            if key not in valid:
                raise self.fail(where, f"unknown key {key!r}{_close(key, valid)}",
                                f"valid keys: {', '.join(sorted(valid))}")
        return table

    def typed(self, where: str, value, kind, what: str):
        if value is None:
            return None
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(where, f"expected {what}, got {value!r}")
        return value


def load(path: str | Path, check_paths: bool = True) -> Experiment:
    """Read and check an experiment file (see the module docstring); nothing runs.
    ``check_paths=False`` leaves out the checks that the index and data files exist (a file
    checked on a machine without its data)."""
    path = Path(path)
    r = _Reader(path, check_paths)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such experiment file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ExperimentError(f"{path}: not valid TOML: {e}") from None
    r.keys("top level", data, SECTIONS)
    head = r.keys("[experiment]", data.get("experiment", {}), EXPERIMENT_KEYS)
    strings = {k: r.typed(f"[experiment] {k}", head.get(k), str, "a string")
               for k in ("name", "pretrained", "index", "out", "report", "base", "reference", "device")}
    batch_size = r.typed("[experiment] batch_size", head.get("batch_size", 1), int, "an integer")
    if batch_size < 1:
        raise r.fail("[experiment] batch_size", f"must be >= 1, got {batch_size}")
    common = dict(r.typed("[args]", data.get("args", {}), dict, "a table of model arguments"))
    test = _test(r, data.get("test"))
    validation = _validation(r, data.get("validation", {}))
    entries = data.get("method")
    if not isinstance(entries, list) or not entries:
        raise r.fail("[[method]]", "no method declared", "add [[method]] tables with label and model")
    methods = tuple(_method(r, i, entry) for i, entry in enumerate(entries, start=1))
    experiment = Experiment(
        path=path, methods=methods, test=test, validation=validation, name=strings["name"] or path.stem,
        pretrained=strings["pretrained"], index=strings["index"], out=Path(strings["out"] or "work/compare"),
        report=Path(strings["report"]) if strings["report"] else None, base=strings["base"],
        reference=strings["reference"], device=strings["device"] or "cpu", batch_size=batch_size, args=common)
    _check(r, experiment)
    return experiment


def _test(r: _Reader, table) -> TestDocuments:
    if table is None:
        raise r.fail("[test]", "missing",
                     'say where the test documents come from: task = "...", with limit or metadata')
    table = r.keys("[test]", table, TEST_KEYS)
    task = r.typed("[test] task", table.get("task"), str, "a task name")
    if not task:
        raise r.fail("[test] task", "missing", 'name the lm-eval task, e.g. task = "ttt_corpus"')
    limit = r.typed("[test] limit", table.get("limit"), int, "an integer")
    if limit is not None and limit < 1:
        raise r.fail("[test] limit", f"must be >= 1, got {limit}")
    metadata = r.typed("[test] metadata", table.get("metadata", {}), dict, "a table")
    corpus = metadata.get("corpus_file")
    if r.check_paths and corpus is not None and not Path(corpus).expanduser().is_file():
        raise r.fail("[test] metadata.corpus_file", f"{corpus} does not exist",
                     "make the corpus splits first (`ttt-index corpus ... --out DIR`)")
    include = r.typed("[test] include_path", table.get("include_path"), str, "a directory")
    if r.check_paths and include is not None and not Path(include).is_dir():
        raise r.fail("[test] include_path", f"{include} is not a directory", "give the folder of the task YAML")
    return TestDocuments(task=task, limit=limit, metadata=metadata, include_path=include)


def _validation(r: _Reader, table) -> ValidationBudget:
    table = r.keys("[validation]", table, set(ValidationBudget.__dataclass_fields__))
    values = {}
    for name in ("docs", "seed", "min_chars", "max_chars", "widen"):
        if name in table:
            values[name] = r.typed(f"[validation] {name}", table[name], int, "an integer")
    if "file" in table:
        values["file"] = r.typed("[validation] file", table["file"], str, "a path")
        if r.check_paths and not Path(values["file"]).expanduser().is_file():
            raise r.fail("[validation] file", f"{values['file']} does not exist",
                         "give the validation split `ttt-index corpus` wrote, or leave file out to draw from the "
                         "index's own corpus")
    budget = ValidationBudget(**values)
    if budget.docs < 1 or budget.widen < 0 or budget.min_chars > budget.max_chars:
        raise r.fail("[validation]", "needs docs >= 1, widen >= 0 and min_chars <= max_chars")
    return budget


def _method(r: _Reader, number: int, entry) -> Method:
    where = f"[[method]] entry {number}"
    entry = r.keys(where, entry, METHOD_KEYS)
    label = r.typed(f"{where} label", entry.get("label"), str, "a string")
    if not label:
        raise r.fail(where, "no label", 'give it a short unique label, e.g. label = "nearest"')
    if not LABEL.fullmatch(label):
        raise r.fail(f'{where} "{label}"', "a label is letters, digits, '.', '_' and '-', not starting with '.'",
                     "it is typed in --only and --chosen and names a directory")
    where = f'[[method]] "{label}"'
    model = r.typed(f"{where} model", entry.get("model"), str, "a model name")
    valid_models = {HF, *models()}
    if model not in valid_models:
        raise r.fail(f"{where} model", f"unknown model {model!r}{_close(model or '', valid_models)}",
                     f"one of {', '.join(sorted(valid_models))}")
    args = dict(r.typed(f"{where} args", entry.get("args", {}), dict, "a table"))
    for name, value in args.items():
        if isinstance(value, dict):
            if set(value) != {"chosen"} or not isinstance(value["chosen"], str):
                raise r.fail(f"{where} args.{name}", f"unexpected table {value!r}",
                             'a value is a number, string or boolean, or {chosen = "LABEL"} for the value '
                             "another method's tune chose")
            args[name] = Chosen(value["chosen"])
    tune = None
    if "tune" in entry:
        t = r.keys(f"{where} tune", entry["tune"], TUNE_KEYS)
        param = r.typed(f"{where} tune.param", t.get("param"), str, "an argument name")
        grid = t.get("grid")
        if not param or not isinstance(grid, list) or not grid:
            raise r.fail(f"{where} tune", "needs param and a non-empty grid list", 'e.g. tune = { param = "lr", '
                                                                                   "grid = [5e-5, 1e-4, 2e-4] }")
        if param in args:
            raise r.fail(f"{where} tune.param", f"{param} is also fixed in args", "tune it or fix it, not both")
        if len({float(v) if isinstance(v, (int, float)) else v for v in grid}) != len(grid):
            raise r.fail(f"{where} tune.grid", f"a value appears twice in {grid}")
        tune = Tune(param, tuple(grid))
    note = r.typed(f"{where} note", entry.get("note", ""), str, "a string")
    return Method(label=label, model=model, args=args, tune=tune, note=note)


def setting_groups(model: str) -> tuple:
    """The settings groups of a harness model (none for hf: HFLM's arguments only)."""
    if model == HF:
        return ()
    from .tune import model_class

    return model_class(model).setting_groups


def accepted(model: str, args: dict) -> dict:
    """The model arguments of ``args`` that ``model`` takes (HFLM's for hf; ours and HFLM's for
    our models)."""
    names = known_names(setting_groups(model)) | hf_argument_names()
    return {k: v for k, v in args.items() if ALIASES.get(k, k) in names}


def retrieves(model: str) -> bool:
    return NeighbourSettings in setting_groups(model)


def _check(r: _Reader, e: Experiment) -> None:
    seen: dict[str, int] = {}
    for number, m in enumerate(e.methods, start=1):
        if m.label in seen:
            raise r.fail(f'[[method]] "{m.label}" (entry {number})', f"label used twice (also entry {seen[m.label]})",
                         "give each method its own label")
        seen[m.label] = number
    for name, label in (("base", e.base), ("reference", e.reference)):
        if label is not None and label not in seen:
            raise r.fail(f"[experiment] {name}", f"no method is labelled {label!r}{_close(label, seen)}")
    if e.base is None and sum(m.model == HF for m in e.methods) > 1:
        raise r.fail("[experiment] base", "several hf methods", "say which is the base: base = \"LABEL\"")
    if r.check_paths and e.index is not None and (problem := spec_problem(e.index)):
        raise r.fail("[experiment] index", problem)
    local = e.pretrained is not None and e.pretrained.startswith((".", "/", "~"))  # else a hub id
    if r.check_paths and local and not Path(e.pretrained).expanduser().exists():
        raise r.fail("[experiment] pretrained", f"{e.pretrained} does not exist", "give a model directory or hub id")
    takers = set()
    for m in e.methods:
        takers |= set(accepted(m.model, e.args))
    for name in e.args:
        if name not in takers:
            every = set().union(*(known_names(setting_groups(m.model)) for m in e.methods))
            raise r.fail(f"[args] {name}", f"no method of this experiment takes it{_close(name, every)}")
    for m in e.methods:
        where = f'[[method]] "{m.label}"'
        for name, value in m.args.items():
            if isinstance(value, Chosen):
                if value.label not in seen:
                    raise r.fail(f"{where} args.{name}", f"no method is labelled {value.label!r}"
                                                         f"{_close(value.label, seen)}")
                source = e.method(value.label).tune
                if source is None or ALIASES.get(source.param, source.param) != ALIASES.get(name, name):
                    raise r.fail(f"{where} args.{name}", f"method {value.label!r} tunes no {name}",
                                 f"point at a method whose tune.param is {name}")
        # a reference stands for a value of the grid it points at (each of which is checked there)
        concrete = {k: (e.method(v.label).tune.grid[0] if isinstance(v, Chosen) else v) for k, v in m.args.items()}
        if problem := _args_problem(m.model, {**accepted(m.model, e.args), **concrete}):
            raise r.fail(where + " args", problem)
        if m.tune is not None:
            if m.model == HF:
                raise r.fail(f"{where} tune", "hf has nothing to tune", "drop tune from the hf method")
            for value in m.tune.grid:
                if problem := _args_problem(m.model, {**accepted(m.model, e.args), **concrete, m.tune.param: value}):
                    raise r.fail(f"{where} tune.grid value {value!r}", problem)
    _no_cycle(r, e)


def _args_problem(model: str, args: dict) -> str | None:
    """What ``--model_args`` would refuse in these arguments (names, types, bounds), or None."""
    try:
        parse_model_args(setting_groups(model), json.loads(json.dumps(args)))
    except ModelArgumentError as error:
        return str(error)
    return None


def _no_cycle(r: _Reader, e: Experiment) -> None:
    def visit(label: str, path: list[str]) -> None:
        if label in path:
            raise r.fail(f'[[method]] "{label}"', "its arguments take values from each other's tunes in a circle: "
                         + " -> ".join(path[path.index(label):] + [label]))
        for needed in e.method(label).needs():
            visit(needed, path + [label])

    for m in e.methods:
        visit(m.label, [])
