"""``ttt-nn report``: Markdown tables and plots from harness results.

Reads the harness's ``results_*.json`` (any model: ``--model hf`` is the base) and, for our
models, the per-document log files the model named in the results
(``config.ttt_nn.log_files``, one per rank). Tables: one row per task and method
(bits per byte, byte and word perplexity, the fraction of the base model's bits per byte
kept, documents, gradient steps per document, wall time), bits per byte against gradient
steps spent, so nearest, SIFT and adaptive selection compare at equal steps, and bits per
byte against seconds per document with each task's Pareto front, so methods compare at equal
compute. Plots: bits per byte versus k per task (from ``eval_at_k`` scores), versus gradient
steps, versus seconds per document, before/after bars per task and method, and training
seconds per neighbour.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from index_server.atomic import atomic_write

from .documents import ROLLING
from .metrics import METRICS, bits_per_byte
from .runlog import document_seconds, merged_records, rank_files


@dataclass
class Run:
    source: Path
    task: str
    method: str
    label: str
    metrics: dict[str, float]
    documents: int
    wall_s: float
    records: list[dict] = field(default_factory=list)
    model: str | None = None  # the pretrained model it ran (a resolved path or a hub name)
    resumed: int = 0  # documents this run took from its log: its wall time does not include them

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


def _label(config: dict) -> tuple[str, str]:
    info = config.get("ttt_nn")
    if not info:
        return config.get("model", "?"), config.get("model", "?")
    s = info["settings"]
    method = s["method"]
    parts = [f"k={s['k']}"] if "k" in s else []  # dyneval retrieves nothing: no k
    parts += {
        "ttt-nn": ["farthest-first" if s.get("order") == "farthest" else ""],
        "ttt-nn-interp": [f"lambda={s.get('lam')}"],
        "ttt-nn-dyneval": [f"iterations={s.get('iterations')}"],
    }.get(method, [])
    if method in ("ttt-nn", "ttt-nn-context", "ttt-nn-interp") and s.get("select") == "sift":
        parts += [f"sift K={s['candidates']} lambda'={s['sift_lambda']}",
                  f"alpha={s['alpha']}" if s.get("alpha") is not None else ""]
    if s.get("adapter") == "lora":
        parts.append(f"LoRA r={s['lora_r']}")
    if s.get("query") == "prefix":
        parts.append("prefix-query")
    if s.get("exclude_duplicates"):
        parts.append("no-near-duplicates")
    tuned = info.get("tuned")
    if s.get("train_layers"):
        parts.append(f"top-{s['train_layers']}-blocks")
    if (s.get("neighbour_batch") or 1) > 1:
        parts.append(f"batch={s['neighbour_batch']}")
    if s.get("dyneval_iterations"):
        parts.append(f"+dyneval x{s['dyneval_iterations']}")
        if not (tuned and tuned["param"] == "dyneval_lr"):
            parts.append(f"dyneval_lr={s['dyneval_lr']:g}")
    if s.get("lr") is not None and not (tuned and tuned["param"] == "lr"):
        parts.append(f"lr={s['lr']:g}")
    if tuned:
        parts.append(f"({tuned['param']}={tuned['value']} tuned on {tuned['validation']['count']} validation docs)")
    return method, " ".join([method] + [p for p in parts if p])


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


def load_runs(paths: list[Path]) -> list[Run]:
    """Every (results file, task) pair under the given files or directories; when they ran
    more than one pretrained model, each label names its model."""
    import json

    files = []
    for path in map(Path, paths):
        files += sorted(path.rglob("results_*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no results_*.json in {[str(p) for p in paths]}")
    runs = []
    for file in files:
        data = json.loads(file.read_text())
        config = data.get("config", {})
        method, label = _label(config)
        info = config.get("ttt_nn") or {}
        model = _model_of(config)
        resumed = int((info.get("this_process") or {}).get("resumed", 0))
        files = [Path(f) for f in info["log_files"]] if "log_files" in info else (
            rank_files(Path(info["log"])) if info.get("log") else [])  # results written before log_files
        records = list(merged_records(files).values())
        for task, row in data["results"].items():
            if f"{METRICS[0]},none" not in row:
                continue
            runs.append(Run(
                source=file, task=task, method=method, label=label,
                metrics={m: float(row[f"{m},none"]) for m in METRICS},
                documents=int(data.get("n-samples", {}).get(task, {}).get("effective", 0)),
                wall_s=float(data.get("total_evaluation_time_seconds", "nan")),
                records=[r for r in records if r.get("task") in (task, None)],
                model=model, resumed=resumed,
            ))
    if len({r.model for r in runs}) > 1:
        for r in runs:
            r.label = f"{r.label} [{Path(r.model).name if r.model else '?'}]"
    return runs


def _base(runs: list[Run], run: Run) -> Run | None:
    """The ``--model hf`` run of the same task and pretrained model (none: no base)."""
    return next((r for r in runs if r.task == run.task and r.method == "hf" and r.model == run.model), None)


def markdown_table(runs: list[Run]) -> str:
    lines = ["| task | method | bits/byte | byte ppl | word ppl | bpb kept vs hf | documents | steps/doc | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r.task, r.method != "hf", r.label)):
        base = _base(runs, run)
        kept = f"{run.metrics['bits_per_byte'] / base.metrics['bits_per_byte']:.1%}" if base else "-"
        steps = run.steps_per_document
        wall = f"{run.wall_s:.0f}" + (f" ({run.resumed} documents resumed from the log)" if run.resumed else "")
        m = run.metrics
        lines.append(f"| {run.task} | {run.label} | {m['bits_per_byte']:.4f} | {m['byte_perplexity']:.4f} | "
                     f"{m['word_perplexity']:.2f} | {kept} | {run.documents} | "
                     f"{'-' if steps is None else f'{steps:.1f}'} | {wall} |")
    return "\n".join(lines) + "\n"


def curve_points(run: Run) -> list[tuple[int, float, float]]:
    """(k, gradient steps per document up to k, bits per byte) from ``results_at_k``."""
    docs = [r for r in run.records if "results_at_k" in r and r.get("request_type") == ROLLING]
    if not docs:
        return []
    copies = [r.get("copies", 1) for r in docs]  # weighted as the harness weighs repeated documents
    total_bytes = sum(r["bytes"] * c for r, c in zip(docs, copies))
    # The scoring points are the keys of a document that reached the most neighbours; a document
    # with fewer (few candidates, adaptive stop) is keyed by what it reached and must not add
    # points of its own, where every other document would count its final score.
    richest = max(docs, key=lambda r: max(map(int, r["results_at_k"])))
    ks = sorted(int(k) for k in richest["results_at_k"])
    points = []
    for k in ks:
        # a document's weights at k are those after the neighbours it had up to k
        lls = [_score_at(r["results_at_k"], k)[0] for r, c in zip(docs, copies) for _ in range(c)]
        steps = sum(len(losses) for r in docs for losses in r.get("chunk_losses", [])[:k]) / len(docs)
        points.append((k, steps, bits_per_byte(lls, total_bytes)))
    return points


def _score_at(results_at_k: dict[str, list], k: int) -> list:
    return results_at_k[str(max(int(key) for key in results_at_k if int(key) <= k))]


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


def cost_table(runs: list[Run]) -> str:
    """Bits per byte against seconds per document, with each task's Pareto front marked."""
    lines = ["| task | method | s/doc | train s/doc | score s/doc | train tokens/doc | bits/byte | Pareto front |",
             "|---|---|---|---|---|---|---|---|"]
    for task in sorted({r.task for r in runs}):
        costed = _costed(runs, task)
        front = set(pareto_front([(s, r.metrics["bits_per_byte"]) for r, s, _ in costed]))
        for i, (run, seconds, logged) in sorted(enumerate(costed), key=lambda x: x[1][1]):
            parts = [run.per_document(f) for f in ("train_s", "score_s", "train_tokens")]
            cells = ["-" if v is None else f"{v:.1f}" if f != "train_tokens" else f"{v:.0f}"
                     for v, f in zip(parts, ("train_s", "score_s", "train_tokens"))]
            lines.append(f"| {task} | {run.label} | {seconds:.1f}{'' if logged else ' (wall)'} | {' | '.join(cells)} | "
                         f"{run.metrics['bits_per_byte']:.4f} | {'yes' if i in front else ''} |")
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


def plot_bars(runs: list[Run], out: Path) -> Path:
    plt = _pyplot()
    tasks = sorted({r.task for r in runs})
    labels = sorted({r.label for r in runs}, key=lambda label: (not label.startswith("hf"), label))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(4 + 0.6 * len(tasks) * len(labels), 4))
    for i, label in enumerate(labels):
        values = [next((r.metrics["bits_per_byte"] for r in runs if r.task == t and r.label == label), math.nan)
                  for t in tasks]
        bars = ax.bar([j + i * width for j in range(len(tasks))], values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set(ylabel="bits per byte (lower is better)", title="before (hf) and after, per task and method")
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


def plot_seconds(runs: list[Run], out: Path) -> Path:
    """Bits per byte against seconds per document, every run a numbered point (the number
    leads its legend entry: a dozen runs outnumber any colour cycle), the Pareto front drawn."""
    plt = _pyplot()
    tasks = sorted({r.task for r in runs})
    most = max(len(_costed(runs, t)) for t in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(10 * len(tasks), 4.5 + 0.22 * most), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, task in zip(axes[0], tasks):
        costed = sorted(_costed(runs, task), key=lambda c: c[1])
        points = [(s, r.metrics["bits_per_byte"]) for r, s, _ in costed]
        for n, ((run, _, logged), (x, y)) in enumerate(zip(costed, points), 1):
            ax.plot([x], [y], marker="o" if logged else "s", linestyle="", color=colours[(n - 1) % len(colours)],
                    label=f"{n}: {run.label}" + ("" if logged else " (wall)"))
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(points)
        if front:
            ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="black",
                    linewidth=1, alpha=0.6, label="Pareto front")
        ax.set_xlim(left=0)
        ax.set(title=task, xlabel="seconds per document", ylabel="bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    return _save(fig, out)


def write_report(paths: list[Path], out_dir: Path) -> tuple[str, list[Path]]:
    runs = load_runs(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs) + "\n" + steps_table(runs) + "\n" + cost_table(runs)
    plots = [_plot_curves(runs, out_dir / "bpb_vs_k.png", 0, "neighbours trained on (k)"),
             _plot_curves(runs, out_dir / "bpb_vs_steps.png", 1, "gradient steps per document"),
             plot_bars(runs, out_dir / "bpb_by_method.png"), plot_cost(runs, out_dir / "train_cost.png"),
             plot_seconds(runs, out_dir / "bpb_vs_seconds.png")]
    body = "# ttt-nn report\n\n" + table + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    atomic_write(out_dir / "report.md", body)
    return table, plots
