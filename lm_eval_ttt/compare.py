"""``ttt-nn compare EXPERIMENT``: tune every method on the same validation budget, run every
method on the same test documents through the stock ``lm_eval`` command, write the report.

Everything derives from the experiment file (``experiment.py``): each method's tune (its
arguments as declared, the tuned one taken from its grid, on the validation budget every
method shares) and its run (the same arguments with the chosen value and ``tuned=`` its
record). Under the experiment's ``out`` directory:

* ``tune/<label>/tune.json``: the tune record (``tunerecord.py``), and the tune's per-document
  logs beside it. A record whose method, grid, arguments and budget match the declaration is
  reused; ``--chosen LABEL=VALUE`` writes a record of a value given instead (not tuned).
* ``logs/``: the per-document logs of every run (keyed by settings: a rerun resumes).
* ``runs/<label>/``: what ``lm_eval --output_path`` writes (results, and hf's samples), and a
  ``*.documents.jsonl`` sidecar per results file: its per-document scores and costs, without
  any corpus text, from which the report and its intervals can be made again anywhere.

``--plan`` prints the tune and ``lm_eval`` commands that can run now, one per line, for a
scheduler of the user's (what waits for a tune says so as a comment); ``--report-only``
reads back whatever has finished and writes the report; ``--tune-only`` runs the tunes and
prints their table, scoring no test document (a choice among variants that are then declared
in another experiment, e.g. builds of experts). No scheduler of our own.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lm_eval.utils import simple_parse_args_string

from .assets import bundled_lm_path, task_configs_dir
from .experiment import HF, Chosen, Experiment, Method, accepted, retrieves
from .report import Run, documents_sidecar, load_results, name_models, pairwise_table, write_report
from .tune import TuneConfig, budget, invalid, record_args, run_tune
from .tunerecord import GIVEN, TuneRecord, TuneRecordError


class CompareError(ValueError):
    """What stops a comparison: a missing tune, a run that failed, a bad --only or --chosen."""


def format_value(value) -> str:
    """A model argument as ``--model_args`` writes it (lists with ':', as lm-eval splits on commas)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ":".join(map(format_value, value))
    return str(value)


def format_args(args: dict) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in args.items())


def _same(a, b) -> bool:
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


class Comparison:
    """An experiment and its tune records: those on disk that answer the declaration, and the
    values given with ``--chosen`` (written as records marked given unless ``write=False``)."""

    def __init__(self, experiment: Experiment, chosen: dict[str, str] | None = None, write: bool = True):
        self.experiment = experiment
        self.records: dict[str, TuneRecord] = {}
        chosen = dict(chosen or {})
        for label in chosen:
            if label not in experiment.labels:
                raise CompareError(f"{experiment.path}: no method is labelled {label!r}; the labels are "
                                   f"{', '.join(experiment.labels)}")
        # a tune after those it takes values from, so a record is checked against the values
        # its arguments take now (a value given here included)
        for step in steps(experiment):
            if step.kind != "tune":
                continue
            if step.label in chosen:
                self.records[step.label] = self._give(experiment.method(step.label), chosen.pop(step.label), write)
            elif (record := self._stored(experiment.method(step.label))) is not None:
                self.records[step.label] = record
        if chosen:
            raise CompareError(f"--chosen {', '.join(chosen)}: these methods tune nothing")

    # -- arguments ---------------------------------------------------------------------------
    def _declared(self, m: Method) -> dict | None:
        """The method's arguments with every ``{chosen = ...}`` resolved (None: a tune it needs
        has no record yet), after the experiment's shared ones it takes."""
        e = self.experiment
        # our models load the bundled model themselves (and name it in their settings without a
        # machine's path); hf would load gpt2 from the hub
        pretrained = e.pretrained or (str(bundled_lm_path()) if m.model == HF else None)
        args = {**({"pretrained": pretrained} if pretrained else {}), **accepted(m.model, e.args)}
        if retrieves(m.model) and e.index:
            args["index"] = e.index
        for name, value in m.args.items():
            if isinstance(value, Chosen):
                if value.label not in self.records:
                    return None
                value = self.records[value.label].value
            args[name] = value
        return args

    def tune_config(self, m: Method) -> TuneConfig | None:
        """The ``ttt-nn tune`` of a method, or None while a tune it needs is missing. Its model
        arguments go through the ``--model-args`` string form, so the printed command and this
        config are the same tune."""
        args = self._declared(m)
        if args is None or m.tune is None:
            return None
        e, v = self.experiment, self.experiment.validation
        args = {**args, "device": e.device, "batch_size": e.batch_size}
        if not retrieves(m.model) and e.index and not v.file:
            args["index"] = e.index  # supplies the validation documents only
        return TuneConfig(method=m.model, param=m.tune.param, grid=tuple(m.tune.grid),
                          model_args=simple_parse_args_string(format_args(args)), docs=v.docs, min_chars=v.min_chars,
                          max_chars=v.max_chars, seed=v.seed, out=e.tune_dir(m.label), widen=v.widen,
                          validation_file=Path(v.file) if v.file else None)

    def run_args(self, m: Method) -> str | None:
        """The ``--model_args`` of a method's test run, or None while its values are unknown."""
        args = self._declared(m)
        if args is None or (m.tune is not None and m.label not in self.records):
            return None
        if m.tune is not None:
            args[m.tune.param] = self.records[m.label].value
        if m.model != HF:
            args["log_dir"] = str(self.experiment.log_dir)
            if m.tune is not None:
                args["tuned"] = str(self.experiment.tune_dir(m.label) / "tune.json")
        return format_args(args)

    def run_argv(self, m: Method, lm_eval: str = "lm_eval") -> list[str] | None:
        args = self.run_args(m)
        if args is None:
            return None
        e, t = self.experiment, self.experiment.test
        argv = [lm_eval, "--model", m.model, "--model_args", args, "--tasks", t.task,
                "--include_path", t.include_path or str(_task_configs()), "--device", e.device,
                "--batch_size", str(e.batch_size), "--output_path", str(e.run_dir(m.label)), "--log_samples"]
        if t.limit is not None:
            argv += ["--limit", str(t.limit)]
        if t.metadata:
            argv += ["--metadata", json.dumps(t.metadata)]
        return argv

    # -- tune records ------------------------------------------------------------------------
    def _stored(self, m: Method) -> TuneRecord | None:
        """The tune record on disk, if it answers this method's declaration (a given value
        answers any grid)."""
        path = self.experiment.tune_dir(m.label) / "tune.json"
        if m.tune is None or not path.is_file():
            return None
        try:
            record = TuneRecord.read(path)
        except TuneRecordError as e:
            raise CompareError(str(e)) from None
        if record.method != m.model or record.param != m.tune.param:
            return None
        if record.source == GIVEN:
            return record
        config = self.tune_config(m)
        if config is None or not _same(list(record.grid), list(config.grid)) or not _same(
                record.args, record_args(config)) or not _same(record.budget, budget(config)):
            return None  # declared otherwise since: tuned again (the logs keep what still applies)
        return record

    def _give(self, m: Method, text: str, write: bool) -> TuneRecord:
        """``--chosen LABEL=VALUE``: a record of a value given instead of tuned, checked as the
        method's argument before it is kept."""
        (value,) = simple_parse_args_string(f"v={text}").values()
        if problem := invalid(m.model, m.tune.param, value):
            raise CompareError(f"--chosen {m.label}={text}: {problem}")
        record = TuneRecord(method=m.model, param=m.tune.param, value=value, source=GIVEN,
                            reason="given with --chosen", grid=tuple(m.tune.grid))
        old = self._stored(m)
        if old is not None and old.source == GIVEN and _same(old.value, value):
            return old
        if write:
            record.write(self.experiment.tune_dir(m.label) / "tune.json")
        return record

    # -- results -----------------------------------------------------------------------------
    def results_file(self, m: Method) -> Path | None:
        """The newest results file of this method's run as now declared (same model arguments,
        task, limit and task metadata), or None."""
        args = self.run_args(m)
        if args is None:
            return None
        t = self.experiment.test
        # the harness names results by their time (results_<ISO time>.json): newest first, in a
        # clone too, where files carry the checkout's mtime
        for file in sorted(self.experiment.run_dir(m.label).rglob("results_*.json"), key=lambda p: p.name,
                           reverse=True):
            data = json.loads(file.read_text())
            config = data.get("config", {})
            metadata = (data.get("configs", {}).get(t.task) or {}).get("metadata") or {}
            recorded = config.get("model_args")
            recorded = simple_parse_args_string(recorded) if isinstance(recorded, str) else recorded
            if (config.get("model") == m.model and _same(recorded, simple_parse_args_string(args))
                    and t.task in data["results"]
                    and config.get("limit") == t.limit and all(_same(metadata.get(k), v)
                                                               for k, v in t.metadata.items())):
                return file
        return None

    def runs(self) -> list[Run]:
        """The finished runs, labelled as declared; writes each one's per-document sidecar."""
        runs = []
        for m in self.experiment.methods:
            file = self.results_file(m)
            if file is None:
                continue
            for run in load_results(file):
                if run.task != self.experiment.test.task:
                    continue
                sidecar = documents_sidecar(file)
                if not sidecar.is_file() and run.records:
                    _write_records(sidecar, run.records)
                run.label, run.note = m.label, m.note
                runs.append(run)
        name_models(runs)
        return runs


def _write_records(path: Path, records: list[dict]) -> None:
    from index_server.atomic import atomic_write

    atomic_write(path, "".join(json.dumps({k: v for k, v in r.items() if k != "text"}) + "\n" for r in records))


def _task_configs() -> Path:
    return task_configs_dir() / "ttt"


def _lm_eval() -> str:
    return shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))


# -- what runs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    kind: str  # "tune" or "run"
    label: str


def steps(experiment: Experiment, only: list[str] | None = None) -> list[Step]:
    """Tunes first (each after the tunes its arguments take values from), then runs, in the
    file's order; ``only``: those methods' runs and the tunes they need."""
    wanted = only or experiment.labels
    tunes: list[str] = []

    def need(label: str) -> None:
        for other in experiment.method(label).needs():
            need(other)
        if experiment.method(label).tune is not None and label not in tunes:
            tunes.append(label)

    for label in wanted:
        need(label)
    return [Step("tune", t) for t in tunes] + [Step("run", label) for label in experiment.labels if label in wanted]


def _pending_docs(c: Comparison, step: Step) -> int:
    e = c.experiment
    if step.kind == "tune":
        return e.validation.docs * len(e.method(step.label).tune.grid)
    return e.test.limit or int(e.test.metadata.get("sample") or 0) or 0


def _seconds_per_doc(c: Comparison, label: str) -> float | None:
    """What a document of this method cost so far: its tune's rows, else its finished run."""
    record = c.records.get(label)
    if record is not None and record.rows and record.validation:
        return sum(r.seconds for r in record.rows) / (len(record.rows) * record.validation.count)
    file = c.results_file(c.experiment.method(label))
    costs = [run.seconds_per_document for run in load_results(file)] if file is not None else []
    return costs[0][0] if costs and costs[0] is not None else None


def _time_left(c: Comparison, todo: list[Step]) -> str:
    """Minutes left for the steps whose method has a measured cost (its tune, or a finished
    run), and how many steps have none yet (their own progress bars say)."""
    known = {s: _seconds_per_doc(c, s.label) for s in todo}
    measured = [s for s, rate in known.items() if rate]
    unmeasured = len(todo) - len(measured)
    if not measured:
        return f"time left: not measured yet for any of the {len(todo)} steps left"
    minutes = sum(_pending_docs(c, s) * known[s] for s in measured) / 60
    return (f"about {minutes:.0f} min left for {len(measured)} of the {len(todo)} steps left"
            + (f" ({unmeasured} not measured yet)" if unmeasured else ""))


def plan(c: Comparison, selected: list[Step]) -> list[str]:
    """The commands that can run now, one per line; what waits says so as a comment."""
    lines = []
    for step in selected:
        m = c.experiment.method(step.label)
        if step.kind == "tune":
            if step.label in c.records:
                continue
            config = c.tune_config(m)
            if config is None:
                lines.append(f"# tune {step.label}: waits for the tune of {', '.join(m.needs())}")
            else:
                lines.append(shlex.join(tune_argv(config)))
        elif c.results_file(m) is None:
            argv = c.run_argv(m)
            lines.append(shlex.join(argv) if argv else f"# run {step.label}: waits for the tune of "
                         + ", ".join(x for x in [*m.needs(), *([m.label] if m.tune else [])] if x not in c.records))
    return lines


def tune_argv(config: TuneConfig) -> list[str]:
    """``ttt-nn tune`` arguments that build exactly ``config``."""
    argv = ["ttt-nn", "tune", "--method", config.method, "--param", config.param,
            "--grid", ":".join(format_value(v) for v in config.grid), "--docs", str(config.docs),
            "--min-chars", str(config.min_chars), "--max-chars", str(config.max_chars), "--seed", str(config.seed),
            "--widen", str(config.widen), "--model-args", format_args(config.model_args), "--out", str(config.out)]
    if config.validation_file is not None:
        argv += ["--validation-file", str(config.validation_file)]
    return argv


def run(experiment: Experiment, only: list[str] | None = None, chosen: dict[str, str] | None = None,
        print_plan: bool = False, report_only: bool = False, tune_only: bool = False,
        echo=print) -> list[str] | str | tuple[str, list[Path]]:
    """Tune, run and report (see the module docstring)."""
    for label in only or []:
        if label not in experiment.labels:
            raise CompareError(f"{experiment.path}: no method is labelled {label!r}; the labels are "
                               f"{', '.join(experiment.labels)}")
    c = Comparison(experiment, chosen)
    for label in chosen or {}:
        record = c.records[label]
        echo(f"{label}: {record.param}={record.value} given with --chosen (recorded as not tuned)")
    selected = steps(experiment, only)
    if tune_only:
        selected = [s for s in selected if s.kind == "tune"]
    if print_plan:
        return plan(c, selected)
    if not report_only:
        _execute(c, selected, echo)
    if tune_only:
        table = _tunes(c)
        echo(table)
        return table
    return _report(c, echo)


def _execute(c: Comparison, selected: list[Step], echo) -> None:
    todo = [s for s in selected if (s.label not in c.records if s.kind == "tune"
                                    else c.results_file(c.experiment.method(s.label)) is None)]
    done = len(selected) - len(todo)
    if done:
        echo(f"{done} of {len(selected)} steps already done (tune records and runs found under {c.experiment.out})")
    for number, step in enumerate(list(todo), start=done + 1):
        m = c.experiment.method(step.label)
        echo(f"\n[{number}/{len(selected)}] {step.kind} {step.label} ({m.model}); {_time_left(c, todo)}")
        start = time.perf_counter()
        if step.kind == "tune":
            config = c.tune_config(m)
            if config is None:
                raise CompareError(f"tune {step.label}: the tune of {', '.join(m.needs())} has no record")
            c.records[step.label] = run_tune(config, echo=echo)
        else:
            argv = c.run_argv(m, _lm_eval())
            echo("$ " + shlex.join(argv))
            result = subprocess.run(argv)
            if result.returncode != 0:
                raise CompareError(f"run {step.label}: lm_eval exited with {result.returncode}; rerun the same "
                                   f"command (our models resume from the documents already logged)")
            if c.results_file(m) is None:
                raise CompareError(f"run {step.label}: lm_eval wrote no results matching the run under "
                                   f"{c.experiment.run_dir(step.label)}")
        todo.remove(step)
        echo(f"[{number}/{len(selected)}] {step.kind} {step.label}: done in {time.perf_counter() - start:.0f} s")


def _report(c: Comparison, echo) -> tuple[str, list[Path]]:
    e = c.experiment
    runs = c.runs()
    if not runs:
        raise CompareError(f"no finished run of {e.path} under {e.out}; run `ttt-nn compare {e.path}` first")
    missing = [m.label for m in e.methods if not any(r.label == m.label for r in runs)]
    reference = e.reference if e.reference in {r.label for r in runs} else None
    pairs = pairwise_table(runs)
    appendix = (("## Every pair\n\nBits per byte of the row's method over the column's, paired 95% interval; * where "
                 "it excludes 1. Each interval holds at 95% on its own; read across many pairs, about one in twenty "
                 "of those between equal methods excludes 1 by chance.\n\n" + pairs + "\n") if pairs else "")
    table, plots = write_report(runs, e.report_dir, reference, title=f"ttt-nn compare: {e.name}",
                                preface=_preface(c, missing), appendix=appendix + _tunes(c), base=e.base)
    echo(table)
    echo("written: " + ", ".join(str(p) for p in [e.report_dir / "report.md", *plots]))
    return table, plots


def _preface(c: Comparison, missing: list[str]) -> str:
    e = c.experiment
    where = (f"task {e.test.task}" + (f", first {e.test.limit} documents" if e.test.limit else "")
             + (f", {json.dumps(e.test.metadata)}" if e.test.metadata else ""))
    lines = [f"Experiment `{e.path}`; test documents: {where}.\n"]
    if missing:
        lines.append(f"Not run yet: {', '.join(missing)}.\n")
    notes = [f"- **{m.label}**: {m.note}" for m in e.methods if m.note]
    return "".join(lines) + ("\n" + "\n".join(notes) + "\n" if notes else "") + "\n"


def _tunes(c: Comparison) -> str:
    """Each tuned method's grid with its validation figures, or that its value was given."""
    lines = ["| method | argument | value | how | grid: validation bits/byte (steps, seconds) |",
             "|---|---|---|---|---|"]
    for m in c.experiment.methods:
        record = c.records.get(m.label)
        if m.tune is None:
            continue
        if record is None:
            lines.append(f"| {m.label} | {m.tune.param} | - | not tuned yet | |")
            continue
        grid = "; ".join(f"{r.value}: {r.bits_per_byte:.4f} ({r.steps}, {r.seconds:.0f} s)" for r in record.rows)
        how = (f"tuned on {record.validation.count} validation docs, {record.reason}" if record.tuned
               else "given (not tuned)")
        lines.append(f"| {m.label} | {record.param} | {record.value} | {how} | {grid or '-'} |")
    return "## Tunes\n\n" + "\n".join(lines) + "\n\n" if len(lines) > 2 else ""
