"""``ttt-nn``: the demo comparison and helpers around the stock ``lm_eval`` command."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from .assets import bundled_lm_path, ensure_default_index
from .report import METRICS


def task_configs_dir() -> Path:
    """task_configs/ of a source checkout (editable install) or the copy inside the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "task_configs", here.parent / "task_configs"):
        if (candidate / "ttt_loader.py").is_file():
            return candidate
    raise FileNotFoundError("task_configs not found next to lm_eval_ttt")


def latest_results(output_dir: Path) -> dict:
    """The newest results_*.json the harness wrote under ``output_dir``."""
    files = sorted(output_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no results_*.json under {output_dir}")
    return json.loads(files[-1].read_text())


def task_metrics(results: dict, task: str) -> dict[str, float]:
    row = results["results"][task]
    return {m: row[f"{m},none"] for m in METRICS}


def _run_lm_eval(model: str, model_args: str, args: argparse.Namespace, output: Path) -> dict:
    lm_eval = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))
    cmd = [lm_eval, "--model", model, "--model_args", model_args, "--tasks", args.task,
           "--include_path", str(task_configs_dir()), "--limit", str(args.limit), "--device", "cpu",
           "--batch_size", "1", "--output_path", str(output)]
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return latest_results(output)


def _cmd_demo(args: argparse.Namespace) -> None:
    lm = bundled_lm_path()
    index = ensure_default_index()
    common = f"pretrained={lm},max_length={args.max_length},dtype=float32"
    base = _run_lm_eval("hf", common, args, args.out / "hf")
    ttt = _run_lm_eval(
        "ttt-nn",
        f"{common},index={index},k={args.k},max_neighbor_tokens={args.max_neighbor_tokens},log_dir={args.out / 'ttt-nn-logs'}",
        args,
        args.out / "ttt-nn",
    )
    rows = {"hf (k=0)": task_metrics(base, args.task), f"ttt-nn (k={args.k})": task_metrics(ttt, args.task)}
    print(f"\n{args.task}, first {args.limit} held-out documents, max_length={args.max_length}")
    print(f"{'model':<16}" + "".join(f"{m:>18}" for m in METRICS))
    for name, metrics in rows.items():
        print(f"{name:<16}" + "".join(f"{metrics[m]:>18.4f}" for m in METRICS))
    kept = rows[f"ttt-nn (k={args.k})"]["bits_per_byte"] / rows["hf (k=0)"]["bits_per_byte"]
    print(f"ttt-nn keeps {kept:.1%} of the base model's bits per byte")


def _cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    table, plots = write_report(args.results, args.out)
    print(table)
    print("written: " + ", ".join(str(p) for p in [args.out / "report.md", *plots]))


def _cmd_tune_lambda(args: argparse.Namespace) -> None:
    """Pick the interpolation weight on validation documents, never on the scored ones.

    Validation documents come from the corpus the index was built on, so each one is in
    the index: duplicate exclusion removes it (and near-copies) from its own neighbours.
    """
    import math

    from lm_eval.api.instance import Instance

    from .assets import ensure_default_corpus
    from .baselines import InterpolationLM

    source = args.validation or ensure_default_corpus() / "stdlib_code.index.jsonl"
    with open(source, encoding="utf-8") as f:
        texts = [t for t in (json.loads(line)["text"] for line in f) if 300 < len(t) < 4000][: args.docs]
    model = InterpolationLM(k=args.k, exclude_duplicates=True, max_length=args.max_length, index=args.index,
                            device="cpu", batch_size=1, log_dir=str(args.out))
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"{len(texts)} validation documents from {source}, k={args.k}")
    best = None
    for lam in sorted({float(x) for x in args.grid.split(":")}):
        model.lam = lam
        bpb = -sum(model.score_document(r)["loglikelihood"] for r in requests) / n_bytes / math.log(2)
        print(f"lambda={lam:<6} bits_per_byte={bpb:.4f}", flush=True)
        best = min(best or (bpb, lam), (bpb, lam))
    print(f"best lambda on validation: {best[1]} (pass --model_args ...,lambda={best[1]})")


def _cmd_paths(args: argparse.Namespace) -> None:
    print(f"bundled_lm={bundled_lm_path()}")
    print(f"task_configs={task_configs_dir()}")
    if args.index:
        print(f"default_index={ensure_default_index()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttt-nn", description="Test-time training on nearest neighbours for lm-eval.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo",
        help="compare `lm_eval --model ttt-nn` with the stock `--model hf` on the bundled code task",
        description="Prepares the bundled model, corpus and index (once), then runs the real lm_eval "
                    "executable twice on the same held-out documents and prints both results side by side.",
    )
    p.add_argument("--task", default="ttt_stdlib_code", help="task name (default: %(default)s)")
    p.add_argument("--limit", type=int, default=8, help="documents scored (default: %(default)s)")
    p.add_argument("--k", type=int, default=5, help="neighbours per document (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=256, help="training chunk and scoring window in tokens (default: %(default)s)")
    p.add_argument("--max-neighbor-tokens", type=int, default=512, help="tokens trained on per neighbour (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("work/demo"), help="harness output directory (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "report",
        help="Markdown table and PNG plots from harness results of ttt-nn, its baselines and --model hf",
        description="Reads results_*.json files (or directories holding them) written by lm_eval --output_path, "
                    "plus the per-document logs of ttt-nn models, and writes report.md, bpb_vs_k.png, "
                    "bpb_by_method.png and train_cost.png. Runs of --model hf are the base of the 'kept' column.",
    )
    p.add_argument("results", type=Path, nargs="+", help="results_*.json files or directories")
    p.add_argument("--out", type=Path, default=Path("work/report"), help="output directory (default: %(default)s)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser(
        "tune-lambda",
        help="choose ttt-nn-interp's lambda on validation documents (never the test split)",
        description="Scores validation documents (default: the bundled corpus's index split, each excluded from "
                    "its own neighbours) with ttt-nn-interp for every lambda of --grid and prints the best.",
    )
    p.add_argument("--validation", type=Path, help="Pile-format JSONL of validation documents (default: bundled index split)")
    p.add_argument("--index", help="index directory or grpc:// addresses (default: bundled index)")
    p.add_argument("--docs", type=int, default=16, help="validation documents (default: %(default)s)")
    p.add_argument("--k", type=int, default=20, help="neighbours (default: %(default)s)")
    p.add_argument("--grid", default="0.02:0.05:0.1:0.2:0.3", help="lambdas, colon-separated (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=256, help="scoring window (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("work/tune-lambda"), help="scratch log directory")
    p.set_defaults(func=_cmd_tune_lambda)
    p = sub.add_parser("paths", help="print where the bundled model and the task configs are (for --model hf / --include_path)")
    p.add_argument("--index", action="store_true", help="also prepare and print the default index")
    p.set_defaults(func=_cmd_paths)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except subprocess.CalledProcessError as e:
        print(f"ttt-nn: error: lm_eval exited with {e.returncode}", file=sys.stderr)
        return e.returncode
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"ttt-nn: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
