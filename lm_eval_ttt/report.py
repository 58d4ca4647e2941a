"""``ttt-nn report``: Markdown tables and plots from harness results, with paired intervals.

Reads the harness's ``results_*.json`` (any model: ``--model hf`` is the base) and each run's
per-document scores: a ``<results>.documents.jsonl`` sidecar (``ttt-nn compare`` writes one
per run, without any corpus text), else our models' per-document logs (the files the results
name in ``config.ttt_nn.log_files``), else lm-eval's ``--log_samples`` file. Every run's bits
per byte carries a 95% paired bootstrap interval over documents (``intervals.py``), and so do
its ratios to the base (the hf run of the same task and model, else the k=0 point of a
ttt-nn run's curve) and to a ``--reference`` run. Tables: one row per task and method, bits
per byte against gradient steps, and against seconds per document with each task's Pareto
front. Plots: bits per byte versus k, versus gradient steps, versus seconds per document
(with the intervals as error bars), bars per task and method (with error bars), and training
seconds per neighbour. A run with experts (``experts=``) also shows their offline build
seconds divided by the documents it evaluated, beside its test-time seconds, and after how
many documents the build pays off against each slower run.

Labels are what the user declared: the experiment file's labels under ``ttt-nn compare``,
else the harness model and the model arguments its results recorded (paths left out).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from index_server.atomic import atomic_write

from .documents import ROLLING, args_key
from .intervals import Interval, bits_per_byte_interval, ratio_interval
from .metrics import METRICS
from .metrics import curve_points as _curve
from .runlog import document_seconds, merged_records, rank_files

FEW_DOCUMENTS = 20  # below this many documents the report warns that its intervals undercover
# Model arguments that say where things are or how fast they run, left out of a label.
UNLABELLED = frozenset({"pretrained", "index", "log_dir", "tuned", "neighbour_cache", "corpus_root",
                        "index_token_file", "index_tls_ca", "device", "batch_size", "retrieval_batch"})


@dataclass
class Run:
    source: Path
    task: str
    method: str
    label: str
    metrics: dict[str, float]
    documents: int
    wall_s: float
    records: list[dict] = field(default_factory=list)  # per-document: our log records, or hf's from its samples
    model: str | None = None  # the pretrained model it ran (a resolved path or a hub name)
    resumed: int = 0  # documents this run took from its log: its wall time does not include them
    tuned: dict | None = None  # what the results recorded of tuned=
    note: str = ""
    cpu: str | None = None  # the CPU the harness recorded: seconds compare only between runs on the same one
    offline_s: float | None = None  # the experts' build seconds (clustering and training), once for any documents
    offline_documents: int = 0  # the documents of every task of the run's results: the build is spread over all
    offline_cpu: str | None = None  # the CPU that built the experts

    @property
    def offline_per_document(self) -> float | None:
        documents = self.offline_documents or self.documents
        return self.offline_s / documents if self.offline_s is not None and documents else None

    @property
    def steps_per_document(self) -> float | None:
        docs = [r for r in self.records if "train_steps" in r]
        return sum(r["train_steps"] for r in docs) / len(docs) if docs else None

    def per_document(self, field: str) -> float | None:
        docs = [r for r in self.records if field in r]
        return sum(r[field] for r in docs) / len(docs) if docs else None

    @property
    def seconds_per_document(self) -> tuple[float, bool] | None:
        """(seconds per document, whether they come from the log): the logged retrieval,
        training, scoring and reset; a run without a log (``--model hf``) has its wall time
        over its documents, model loading included."""
        docs = [r for r in self.records if "score_s" in r]
        if docs:
            return sum(map(document_seconds, docs)) / len(docs), True
        return (self.wall_s / self.documents, False) if self.documents and math.isfinite(self.wall_s) else None

    def scores(self, at_k: int | None = None) -> dict:
        """(task, doc_id) -> (summed log-likelihood, bytes) of every rolling document; at_k: the
        score at that point of the curve (documents without it are left out)."""
        out = {}
        for r in self.records:
            if r.get("request_type") != ROLLING or "results" not in r:
                continue
            results = r["results"] if at_k is None else (r.get("results_at_k") or {}).get(str(at_k))
            if results is not None:
                copies = r.get("copies", 1)  # the harness counts a repeated text once per copy
                # the harness's doc_id pairs documents across runs; requests without one, their text
                document = r["doc_id"] if r.get("doc_id") is not None else r.get("doc_key")
                out[(self.task, document)] = (results[0] * copies, r["bytes"] * copies)
        return out


def label_from_args(model: str, model_args, tuned: dict | None = None) -> str:
    """The harness model and the arguments it was given, as typed (paths left out)."""
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})
    parts = [model] + [f"{k}={v}" for k, v in args.items() if k not in UNLABELLED]
    if tuned:
        parts.append(f"({tuned.get('describe') or str(tuned['param']) + ' tuned'})")
    return " ".join(parts)


def _model_of(config: dict) -> str | None:
    """The pretrained model a results file ran: HFLM's ``pretrained`` argument, or for our
    models the one they loaded (the bundled model when none was given; results written
    before that was recorded name it through the tokenizer they loaded)."""
    from lm_eval.utils import simple_parse_args_string

    args = config.get("model_args") or {}
    args = simple_parse_args_string(args) if isinstance(args, str) else args
    info = config.get("ttt_nn") or {}
    name = args.get("pretrained") or info.get("pretrained") or (info.get("settings", {}).get("tokenizer") or [None])[0]
    if name is None:
        return None
    name = str(name)  # lm_eval parses pretrained=1 as an int
    return os.path.realpath(name) if os.path.exists(name) else os.path.normpath(name)


def documents_sidecar(results_file: Path) -> Path:
    """Where a run's per-document records lie beside its results file."""
    return results_file.with_name(results_file.stem + ".documents.jsonl")


def _samples(results_file: Path, task: str) -> list[dict]:
    """lm-eval's ``--log_samples`` lines of a task from the same run as the results file."""
    from .jsonl import read_records

    stamp = results_file.stem.removeprefix("results_")
    return [r for r in read_records(results_file.with_name(f"samples_{task}_{stamp}.jsonl")) if "bits_per_byte" in r]


def _sample_key(sample: dict) -> str | None:
    """Our log's key of a rolling document (``Document.key``) from the text its sample holds
    (the harness writes the arguments as ``{"gen_args_0": {"arg_0": text}}`` or ``[[text]]``)."""
    arguments = sample.get("arguments")
    if isinstance(arguments, dict):
        text = (arguments.get("gen_args_0") or {}).get("arg_0")
    else:
        text = arguments[0][0] if arguments and arguments[0] else None
    return args_key(ROLLING, [[text], 0]) if isinstance(text, str) else None


def run_records(results_file: Path, data: dict, task: str) -> list[dict]:
    """A run's per-document records of one task: the sidecar ``ttt-nn compare`` wrote, else
    our log's records of exactly the documents the run's ``--log_samples`` file names (one per
    doc_id: a text given twice is two documents), else the samples themselves (hf), else the
    log's records of the run's first documents."""
    from .jsonl import read_records

    sidecar = documents_sidecar(results_file)
    if sidecar.is_file():
        return [r for r in read_records(sidecar) if r.get("task") == task]
    info = data.get("config", {}).get("ttt_nn") or {}
    files = [Path(f) for f in info["log_files"]] if "log_files" in info else (
        rank_files(Path(info["log"])) if info.get("log") else [])  # results written before log_files
    samples = _samples(results_file, task)
    if files:
        logged = merged_records(files)
        if samples:
            picked = [(s, logged.get(_sample_key(s))) for s in samples]
            return [{**{k: v for k, v in r.items() if k != "copies"}, "doc_id": int(s["doc_id"])}
                    for s, r in picked if r is not None]
        # a log shared by runs of the same settings on more documents: this run's are its first ones
        effective = int(data.get("n-samples", {}).get(task, {}).get("effective", 0))
        records = [r for r in logged.values() if r.get("task") in (task, None)]
        return [r for r in records if r.get("doc_id") is None or r["doc_id"] < effective] if effective else records
    return [{"task": task, "doc_id": int(s["doc_id"]), "request_type": ROLLING, "bytes": s["bits_per_byte"][1],
             "results": [s["bits_per_byte"][0]]} for s in samples]


def load_results(file: Path) -> list[Run]:
    """One run per task of a results file."""
    data = json.loads(Path(file).read_text())
    config = data.get("config", {})
    info = config.get("ttt_nn") or {}
    method = info.get("settings", {}).get("method") or config.get("model", "?")
    tuned = info.get("tuned")
    experts = info.get("experts") or {}
    every_task = sum(int(n.get("effective", 0)) for n in data.get("n-samples", {}).values())
    runs = []
    for task, row in data["results"].items():
        if f"{METRICS[0]},none" not in row:
            continue
        runs.append(Run(
            source=Path(file), task=task, method=method,
            label=label_from_args(config.get("model", method), config.get("model_args"), tuned),
            metrics={m: float(row[f"{m},none"]) for m in METRICS},
            documents=int(data.get("n-samples", {}).get(task, {}).get("effective", 0)),
            wall_s=float(data.get("total_evaluation_time_seconds", "nan")),
            records=run_records(Path(file), data, task), model=_model_of(config),
            resumed=int((info.get("this_process") or {}).get("resumed", 0)), tuned=tuned,
            cpu=cpu_of(data), offline_s=experts.get("offline_s"), offline_documents=every_task,
            offline_cpu=experts.get("cpu"),
        ))
    return runs


def cpu_of(results: dict) -> str | None:
    """The CPU model in the environment lm-eval records with its results (torch's collect_env)."""
    match = re.search(r"^Model name:[ \t]*(\S.*?)[ \t]*$", results.get("pretty_env_info") or "", re.M)
    return match.group(1) if match else None


def load_runs(paths: list[Path]) -> list[Run]:
    """Every (results file, task) pair under the given files or directories; when they ran
    more than one pretrained model, each label names its model."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.rglob("results_*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no results_*.json in {[str(p) for p in paths]}")
    runs = [run for file in files for run in load_results(file)]
    name_models(runs)
    return runs


def name_models(runs: list[Run]) -> None:
    if len({r.model for r in runs}) > 1:
        for r in runs:
            r.label = f"{r.label} [{Path(r.model).name if r.model else '?'}]"


def _base(runs: list[Run], run: Run, label: str | None = None) -> Run | None:
    """The base of ``run``: the run labelled ``label`` on the same task, else the ``--model
    hf`` run of the same task and pretrained model (none: no base)."""
    if label is not None:
        return next((r for r in runs if r.task == run.task and r.label == label), None)
    return next((r for r in runs if r.task == run.task and r.method == "hf" and r.model == run.model), None)


def base_scores(runs: list[Run], run: Run, label: str | None = None) -> dict:
    """Per-document scores of the base model on ``run``'s task: the base run's (hf's from its
    samples or sidecar), else the k=0 point of a ttt-nn run of the same task and model
    without experts (with them, k=0 is the merged experts, not the base model)."""
    base = _base(runs, run, label)
    scores = base.scores() if base is not None else {}
    if scores:
        return scores
    for other in runs:
        if (other.task == run.task and other.model == run.model and other.offline_s is None
                and (at_0 := other.scores(at_k=0))):
            return at_0
    return {}


@dataclass(frozen=True)
class Intervals:
    bits_per_byte: Interval | None
    vs_base: Interval | None
    vs_reference: Interval | None


NO_INTERVALS = Intervals(None, None, None)


def _consistent(run: Run) -> bool:
    """Whether a run's per-document scores add up to the harness's own bits per byte (else
    they are not the run's documents, and no interval is drawn from them)."""
    interval = bits_per_byte_interval(run.scores(), resamples=1)
    if interval is None:
        return False
    if math.isclose(interval.value, run.metrics["bits_per_byte"], rel_tol=1e-6):
        return True
    warnings.warn(f"{run.source}: the per-document scores found for {run.label} give {interval.value:.6f} bits per "
                  f"byte, the harness {run.metrics['bits_per_byte']:.6f}; its intervals are left out", stacklevel=2)
    return False


def intervals(runs: list[Run], reference: str | None = None, base: str | None = None) -> dict[int, Intervals]:
    """id(run) -> its bits per byte, and its ratios to the base and to the run labelled
    ``reference`` (same task), each with a 95% paired bootstrap interval over documents."""
    usable = {id(r) for r in runs if _consistent(r)}
    out = {}
    for run in runs:
        if id(run) not in usable:
            out[id(run)] = NO_INTERVALS
            continue
        scores = run.scores()
        ref = next((r for r in runs if r.task == run.task and r.label == reference), None) if reference else None
        out[id(run)] = Intervals(bits_per_byte_interval(scores), ratio_interval(scores, base_scores(runs, run, base)),
                                 ratio_interval(scores, ref.scores()) if ref is not None and id(ref) in usable
                                 else None)
    return out


def _ratio(interval: Interval | None) -> str:
    if interval is None:
        return "-"
    mark = "" if interval.low == interval.high == 1.0 else " *" if interval.excludes(1.0) else ""
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}]{mark}"


def markdown_table(runs: list[Run], reference: str | None = None, found: dict[int, Intervals] | None = None) -> str:
    """One row per task and method: bits per byte with its interval, the perplexities, the
    ratios to the base and the reference with theirs (* where the interval excludes 1)."""
    found = found if found is not None else intervals(runs, reference)
    ref = f" vs {reference}" if reference else ""
    lines = ["| task | method | documents | bits/byte [95% CI] | byte ppl | word ppl | bpb vs hf [95% CI] |"
             + (f" bpb{ref} [95% CI] |" if reference else "") + " steps/doc | wall s |",
             "|---|---|---|---|---|---|---|" + ("---|" if reference else "") + "---|---|"]
    for run in sorted(runs, key=lambda r: (r.task, r.method != "hf")):  # else in the order given
        m, iv = run.metrics, found[id(run)]
        bpb = f"{m['bits_per_byte']:.4f}" + (f" [{iv.bits_per_byte.low:.4f}, {iv.bits_per_byte.high:.4f}]"
                                             if iv.bits_per_byte else "")
        steps = run.steps_per_document
        wall = f"{run.wall_s:.0f}" + (f" ({run.resumed} documents resumed from the log)" if run.resumed else "")
        lines.append(f"| {run.task} | {run.label} | {run.documents} | {bpb} | {m['byte_perplexity']:.4f} | "
                     f"{m['word_perplexity']:.2f} | {_ratio(iv.vs_base)} |"
                     + (f" {_ratio(iv.vs_reference)} |" if reference else "")
                     + f" {'-' if steps is None else f'{steps:.1f}'} | {wall} |")
    return "\n".join(lines) + "\n"


def pairwise_table(runs: list[Run]) -> str:
    """Each task's runs against each other: the bits per byte of the row's run over the
    column's, with its paired 95% interval (* where it excludes 1: the two are told apart)."""
    out = []
    for task in sorted({r.task for r in runs}):
        scored = [r for r in runs if r.task == task and r.scores()]
        if len(scored) < 2:
            continue
        out += [f"| {task}: row / column | " + " | ".join(r.label for r in scored) + " |",
                "|---|" + "---|" * len(scored)]
        for row in scored:
            cells = ["" if row is col else _ratio(ratio_interval(row.scores(), col.scores())) for col in scored]
            out.append(f"| {row.label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def curve_points(run: Run) -> list[tuple[int, float, float]]:
    """(k, gradient steps per document up to k, bits per byte) of a run's curve."""
    return _curve(run.records)


def steps_table(runs: list[Run]) -> str:
    """Bits per byte against gradient steps per document, every scoring point of every run."""
    lines = ["| task | method | k | steps/doc | bits/byte |", "|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r.task, r.label)):
        points = curve_points(run)
        if not points and run.steps_per_document is not None:
            points = [("-", run.steps_per_document, run.metrics["bits_per_byte"])]
        for k, steps, bpb in points:
            lines.append(f"| {run.task} | {run.label} | {k} | {steps:.1f} | {bpb:.4f} |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (seconds, bits per byte) points no other point beats on both (at most
    as many seconds and fewer bits per byte, or fewer seconds and at most as many bits)."""
    front, best = [], math.inf
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1])):
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def _costed(runs: list[Run], task: str) -> list[tuple[Run, float, bool]]:
    return [(r, *r.seconds_per_document) for r in runs if r.task == task and r.seconds_per_document is not None]


def _fronts(costed: list[tuple[Run, float, bool]]) -> set[int]:
    """Indices of the runs on the Pareto front of the runs measured on their CPU."""
    front = set()
    for cpu in {r.cpu for r, _, _ in costed}:
        mine = [i for i, (r, _, _) in enumerate(costed) if r.cpu == cpu]
        front |= {mine[j] for j in pareto_front([(costed[i][1], costed[i][0].metrics["bits_per_byte"]) for i in mine])}
    return front


def cost_table(runs: list[Run]) -> str:
    """Bits per byte against seconds per document, with each task's Pareto front marked (one
    front per CPU: seconds measured on different CPUs do not compare)."""
    lines = ["| task | method | s/doc | train s/doc | score s/doc | train tokens/doc | offline s/doc | bits/byte | CPU "
             "| Pareto front |", "|---|---|---|---|---|---|---|---|---|---|"]
    payoffs = []
    cpus = set()
    for task in sorted({r.task for r in runs}):
        costed = _costed(runs, task)
        front = _fronts(costed)
        cpus |= {r.cpu for r, _, _ in costed}
        for i, (run, seconds, logged) in sorted(enumerate(costed), key=lambda x: x[1][1]):
            parts = [run.per_document(f) for f in ("train_s", "score_s", "train_tokens")]
            cells = ["-" if v is None else f"{v:.1f}" if f != "train_tokens" else f"{v:.0f}"
                     for v, f in zip(parts, ("train_s", "score_s", "train_tokens"))]
            offline = run.offline_per_document
            lines.append(f"| {task} | {run.label} | {seconds:.1f}{'' if logged else ' (wall)'} | {' | '.join(cells)} | "
                         f"{'-' if offline is None else f'{offline:.1f}'} | {run.metrics['bits_per_byte']:.4f} | "
                         f"{run.cpu or '?'} | {'yes' if i in front else ''} |")
            if offline is not None:
                slower = [(other.label, run.offline_s / (s - seconds)) for other, s, _ in costed
                          if other.cpu == run.cpu and s > seconds and other.offline_s is None]
                elsewhere = (f" (built on {run.offline_cpu}, run on {run.cpu}: seconds of two CPUs)"
                             if run.offline_cpu and run.offline_cpu != run.cpu else "")
                payoffs.append(f"{run.label} ({task}): {run.offline_s:.0f} s offline{elsewhere}; fewer seconds in all "
                               "after " + (", ".join(f"{n:.0f} documents than {label}" for label, n in slower)
                                           if slower else "no number of documents (no slower run without experts "
                                                          "on its CPU)"))
    if payoffs:
        lines.append("\nOffline s/doc: the experts' build (clustering and training) divided by the documents the run "
                     "evaluated; the build is paid once and amortised over every document scored with the experts. "
                     "Build plus test-time seconds fall below those of a slower run without experts once the "
                     "documents' savings exceed the build (seconds only; bits per byte are in the tables above):"
                     "\n\n" + "\n".join(f"- {p}" for p in payoffs))
    if len(cpus) > 1:
        lines.append(f"\nThese runs were timed on {len(cpus)} CPUs ({'; '.join(sorted(c or '?' for c in cpus))}): "
                     "compare seconds only between runs on the same CPU; each CPU's runs have their own front.")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib on the file-only backend: reports are written on machines with no screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def _plot_curves(runs: list[Run], out: Path, x: int, xlabel: str) -> Path:
    plt = _pyplot()
    tasks = sorted({r.task for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(9 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for run in (r for r in runs if r.task == task):
            points = curve_points(run)
            if len(points) > 1:
                ax.plot([p[x] for p in points], [p[2] for p in points], marker="o", label=run.label)
            elif run.steps_per_document is not None and x == 1:
                ax.plot([run.steps_per_document], [run.metrics["bits_per_byte"]], marker="s", label=run.label)
        for base in (r for r in runs if r.task == task and r.method == "hf"):
            ax.axhline(base.metrics["bits_per_byte"], color="grey", linestyle="--", label=f"{base.label} (base)")
        ax.set(title=task, xlabel=xlabel, ylabel="bits per byte")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: hides no point
    return _save(fig, out)


def _error(interval: Interval | None, value: float) -> tuple[float, float]:
    """(below, above) the harness's value for an error bar (none without an interval)."""
    if interval is None:
        return 0.0, 0.0
    return max(0.0, value - interval.low), max(0.0, interval.high - value)


def plot_bars(runs: list[Run], out: Path, found: dict[int, Intervals]) -> Path:
    """Bits per byte per task and method, each bar with its 95% interval."""
    plt = _pyplot()
    tasks = sorted({r.task for r in runs})
    labels = sorted({r.label for r in runs}, key=lambda label: (not label.startswith("hf"), label))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(4 + 0.6 * len(tasks) * len(labels), 4))
    for i, label in enumerate(labels):
        chosen = [next((r for r in runs if r.task == t and r.label == label), None) for t in tasks]
        values = [r.metrics["bits_per_byte"] if r else math.nan for r in chosen]
        errors = [_error(found[id(r)].bits_per_byte, r.metrics["bits_per_byte"]) if r else (0.0, 0.0) for r in chosen]
        bars = ax.bar([j + i * width for j in range(len(tasks))], values, width, label=label,
                      yerr=list(zip(*errors)), capsize=3, error_kw={"elinewidth": 0.8})
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=6)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set(ylabel="bits per byte (lower is better)", title="per task and method, with 95% bootstrap intervals")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, out)


def plot_cost(runs: list[Run], out: Path) -> Path:
    plt = _pyplot()
    rows = []
    for run in runs:
        docs = [r for r in run.records if r.get("neighbour_ids") and "train_s" in r]
        if docs:
            per_neighbour = sum(r["train_s"] for r in docs) / sum(len(r["neighbour_ids"]) for r in docs)
            rows.append((f"{run.task}\n{run.label}", per_neighbour))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
    if rows:
        ax.bar(*zip(*rows), color="tab:orange")
    ax.set(ylabel="training seconds per neighbour", title="training cost per neighbour")
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, out)


def plot_seconds(runs: list[Run], out: Path, found: dict[int, Intervals]) -> Path:
    """Bits per byte against seconds per document, every run a numbered point with its 95%
    interval (the number leads its legend entry: a dozen runs outnumber any colour cycle),
    the Pareto front drawn."""
    plt = _pyplot()
    tasks = sorted({r.task for r in runs})
    most = max(len(_costed(runs, t)) for t in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(10 * len(tasks), 4.5 + 0.22 * most), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, task in zip(axes[0], tasks):
        costed = sorted(_costed(runs, task), key=lambda c: c[1])
        points = [(s, r.metrics["bits_per_byte"]) for r, s, _ in costed]
        cpus = sorted({r.cpu for r, _, _ in costed}, key=str)
        for n, ((run, _, logged), (x, y)) in enumerate(zip(costed, points), 1):
            below, above = _error(found[id(run)].bits_per_byte, y)
            ax.errorbar([x], [y], yerr=[[below], [above]], marker="o" if logged else "s", linestyle="", capsize=3,
                        color=colours[(n - 1) % len(colours)],
                        label=f"{n}: {run.label}" + ("" if logged else " (wall)")
                        + (f" [{run.cpu or '?'}]" if len(cpus) > 1 else ""))
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if run.offline_per_document is not None:  # the same run with its experts' build spread over its documents
                ax.plot([x, x + run.offline_per_document], [y, y], linestyle=":", marker="o", markevery=[1],
                         markerfacecolor="none", color=colours[(n - 1) % len(colours)],
                         label=f"{n}: {run.label} + offline s/doc")
        for style, cpu in zip(itertools.cycle(("-", "--", ":", "-.")), cpus):
            mine = [i for i, (r, _, _) in enumerate(costed) if r.cpu == cpu]
            front = [mine[j] for j in pareto_front([points[i] for i in mine])]
            ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="black",
                    linestyle=style, linewidth=1, alpha=0.6,
                    label="Pareto front" + (f" ({cpu or '?'})" if len(cpus) > 1 else ""))
        ax.set_xlim(left=0)
        ax.set(title=task, xlabel="seconds per document", ylabel="bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    return _save(fig, out)


def write_report(runs: list[Run], out_dir: Path, reference: str | None = None, title: str = "ttt-nn report",
                 preface: str = "", appendix: str = "", base: str | None = None) -> tuple[str, list[Path]]:
    """report.md (the tables, between ``preface`` and ``appendix``) and the PNG plots;
    ``base``: the label of the base run (default: each run's hf run)."""
    if reference is not None and not any(r.label == reference for r in runs):
        raise ValueError(f"--reference {reference!r} names no run; the runs are: "
                         + "; ".join(sorted({r.label for r in runs})))
    out_dir.mkdir(parents=True, exist_ok=True)
    found = intervals(runs, reference, base)
    table = markdown_table(runs, reference, found) + "\n" + steps_table(runs) + "\n" + cost_table(runs)
    plots = [_plot_curves(runs, out_dir / "bpb_vs_k.png", 0, "neighbours trained on (k)"),
             _plot_curves(runs, out_dir / "bpb_vs_steps.png", 1, "gradient steps per document"),
             plot_bars(runs, out_dir / "bpb_by_method.png", found), plot_cost(runs, out_dir / "train_cost.png"),
             plot_seconds(runs, out_dir / "bpb_vs_seconds.png", found)]
    note = ("Intervals: 95% paired bootstrap over documents (10,000 resamples; bits per byte recomputed as the "
            "harness aggregates it, total log-likelihood over total bytes). A ratio marked * has an interval that "
            "excludes 1.\n")
    fewest = min((iv.bits_per_byte.documents for iv in found.values() if iv.bits_per_byte), default=None)
    if fewest is not None and fewest < FEW_DOCUMENTS:
        note += (f"\nWith {fewest} documents, these percentile intervals are narrower than 95% coverage needs (a "
                 f"bootstrap over fewer than {FEW_DOCUMENTS} documents sees little of their spread): read them as "
                 f"the spread of the documents drawn, not as evidence.\n")
    body = (f"# {title}\n\n{preface}" + table + "\n" + note + "\n" + appendix
            + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    atomic_write(out_dir / "report.md", body)
    return table, plots
