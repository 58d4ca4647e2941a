"""``ttt-nn report``: one Markdown table and three plots from harness results.

Reads the harness's ``results_*.json`` (any model: ``--model hf`` is the base) and, for our
models, the per-document JSONL whose path the model wrote into the results
(``config.ttt_nn.log``). The table has one row per task and method: bits per byte, byte and
word perplexity, the fraction of the base model's bits per byte kept, documents, wall time.
Plots: bits per byte versus k per task (from ``eval_at_k`` scores), before/after bars per
task and method, and training seconds per neighbour.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")


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


def _label(config: dict) -> tuple[str, str]:
    info = config.get("ttt_nn")
    if not info:
        return config.get("model", "?"), config.get("model", "?")
    s = info["settings"]
    method = s["method"]
    detail = {
        "ttt-nn": lambda: f"k={s['k']}" + (" farthest-first" if s.get("order") == "farthest" else ""),
        "ttt-nn-context": lambda: f"k={s['k']}",
        "ttt-nn-interp": lambda: f"k={s['k']} lambda={s['lambda']}",
        "ttt-nn-dyneval": lambda: f"iterations={s['iterations']}",
    }.get(method, lambda: "")()
    if s.get("query") == "prefix":
        detail += " prefix-query"
    return method, f"{method} {detail}".strip()


def _records(config: dict) -> list[dict]:
    log = (config.get("ttt_nn") or {}).get("log")
    if not log or not Path(log).is_file():
        return []
    with open(log, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_runs(paths: list[Path]) -> list[Run]:
    """Every (results file, task) pair under the given files or directories."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.rglob("results_*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no results_*.json in {[str(p) for p in paths]}")
    runs = []
    for file in files:
        data = json.loads(file.read_text())
        method, label = _label(data.get("config", {}))
        records = _records(data.get("config", {}))
        for task, row in data["results"].items():
            if f"{METRICS[0]},none" not in row:
                continue
            runs.append(Run(
                source=file, task=task, method=method, label=label,
                metrics={m: float(row[f"{m},none"]) for m in METRICS},
                documents=int(data.get("n-samples", {}).get(task, {}).get("effective", 0)),
                wall_s=float(data.get("total_evaluation_time_seconds", "nan")),
                records=records,
            ))
    return runs


def _base(runs: list[Run], task: str) -> Run | None:
    return next((r for r in runs if r.task == task and r.method == "hf"), None)


def markdown_table(runs: list[Run]) -> str:
    lines = ["| task | method | bits/byte | byte ppl | word ppl | bpb kept vs hf | documents | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r.task, r.method != "hf", r.label)):
        base = _base(runs, run.task)
        kept = f"{run.metrics['bits_per_byte'] / base.metrics['bits_per_byte']:.1%}" if base else "-"
        m = run.metrics
        lines.append(f"| {run.task} | {run.label} | {m['bits_per_byte']:.4f} | {m['byte_perplexity']:.4f} | "
                     f"{m['word_perplexity']:.2f} | {kept} | {run.documents} | {run.wall_s:.0f} |")
    return "\n".join(lines) + "\n"


def curve_points(run: Run) -> list[tuple[int, float]]:
    """(k, bits per byte over the logged documents) from ``loglikelihood_at_k``."""
    docs = [r for r in run.records if "loglikelihood_at_k" in r]
    if not docs:
        return []
    total_bytes = sum(r["bytes"] for r in docs)
    ks = sorted({int(k) for r in docs for k in r["loglikelihood_at_k"]})
    points = []
    for k in ks:
        # a document with fewer neighbours than k contributes its largest k
        lls = [r["loglikelihood_at_k"].get(str(k), r["loglikelihood"]) for r in docs]
        points.append((k, -sum(lls) / total_bytes / math.log(2)))
    return points


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


def plot_curves(runs: list[Run], out: Path) -> Path:
    plt = _pyplot()
    tasks = sorted({r.task for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for run in (r for r in runs if r.task == task):
            points = curve_points(run)
            if len(points) > 1:
                ax.plot(*zip(*points), marker="o", label=run.label)
        base = _base(runs, task)
        if base:
            ax.axhline(base.metrics["bits_per_byte"], color="grey", linestyle="--", label="hf (base)")
        ax.set(title=task, xlabel="neighbours trained on (k)", ylabel="bits per byte")
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_bars(runs: list[Run], out: Path) -> Path:
    plt = _pyplot()
    tasks = sorted({r.task for r in runs})
    labels = sorted({r.label for r in runs}, key=lambda l: (not l.startswith("hf"), l))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(4 + 0.6 * len(tasks) * len(labels), 4))
    for i, label in enumerate(labels):
        values = [next((r.metrics["bits_per_byte"] for r in runs if r.task == t and r.label == label), math.nan) for t in tasks]
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
        docs = [r for r in run.records if r.get("neighbours_found") and "train_s" in r]
        if docs:
            per_neighbour = sum(r["train_s"] for r in docs) / sum(r["neighbours_found"] for r in docs)
            rows.append((f"{run.task}\n{run.label}", per_neighbour))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
    if rows:
        ax.bar(*zip(*rows), color="tab:orange")
    ax.set(ylabel="training seconds per neighbour", title="training cost per neighbour")
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, out)


def write_report(paths: list[Path], out_dir: Path) -> tuple[str, list[Path]]:
    runs = load_runs(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    plots = [plot_curves(runs, out_dir / "bpb_vs_k.png"), plot_bars(runs, out_dir / "bpb_by_method.png"),
             plot_cost(runs, out_dir / "train_cost.png")]
    body = "# ttt-nn report\n\n" + table + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    (out_dir / "report.md").write_text(body)
    return table, plots
