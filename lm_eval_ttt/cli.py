"""``ttt-nn``: the demo comparison, reports, hyperparameter tuning on validation documents,
and paths of the bundled assets for the stock ``lm_eval`` command.

Defaults come from the settings dataclasses (``settings.py``, ``tune.TuneConfig``), never
repeated here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from lm_eval.utils import handle_arg_string, simple_parse_args_string

from .assets import bundled_lm_path, ensure_default_index, task_configs_dir
from .metrics import METRICS
from .settings import ExpertsSettings, NeighbourSettings, add_settings_arguments
from .tune import TuneConfig


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
           "--include_path", str(task_configs_dir() / "ttt"), "--limit", str(args.limit), "--device", "cpu",
           "--batch_size", "1", "--output_path", str(output)]
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return latest_results(output)


def demo_runs(args: argparse.Namespace, lm: Path, index: Path) -> list[tuple[str, str, str, str]]:
    """(output folder, label, harness model, model arguments) of the demo's rows: the stock
    model, ttt-nn at the paper's untuned rate, and the configuration the comparisons recommend
    for its cost."""
    from .compare import format_args
    from .settings import RECOMMENDED

    common = f"pretrained={lm},max_length={args.max_length}"
    paper = f"{common},index={index},k={args.k},max_neighbor_tokens={args.max_neighbor_tokens}"
    recommended = f"{common},index={index},max_neighbor_tokens={args.max_length},{format_args(RECOMMENDED)}"
    return [("hf", "hf (k=0)", "hf", common), ("ttt-nn", f"ttt-nn (k={args.k})", "ttt-nn", paper),
            ("recommended", f"recommended (k={RECOMMENDED['k']})", "ttt-nn", recommended)]


def _cmd_demo(args: argparse.Namespace) -> None:
    from .settings import RECOMMENDED

    runs = demo_runs(args, bundled_lm_path(), ensure_default_index())
    rows = {label: task_metrics(_run_lm_eval(model, model_args, args, args.out / name), args.task)
            for name, label, model, model_args in runs}
    print(f"\n{args.task}, first {args.limit} held-out documents, max_length={args.max_length}")
    print(f"{'model':<22}" + "".join(f"{m:>18}" for m in METRICS))
    for name, metrics in rows.items():
        print(f"{name:<22}" + "".join(f"{metrics[m]:>18.4f}" for m in METRICS))
    base = rows["hf (k=0)"]["bits_per_byte"]
    paper, recommended = (label for _, label, _, _ in runs[1:])
    print(f"{paper} at the paper's untuned rate keeps {rows[paper]['bits_per_byte'] / base:.1%} of the base model's "
          f"bits per byte")
    print(f"{recommended}: the top {RECOMMENDED['train_layers']} blocks train on {RECOMMENDED['k']} neighbours, then "
          f"dynamic evaluation on the document (rates {RECOMMENDED['lr']:g} and {RECOMMENDED['dyneval_lr']:g}, chosen "
          f"on validation documents: docs/compare/validation.md); it keeps "
          f"{rows[recommended]['bits_per_byte'] / base:.1%}")


def _cmd_report(args: argparse.Namespace) -> None:
    from .report import load_runs, write_report

    table, plots = write_report(load_runs(args.results), args.out, args.reference)
    print(table)
    print("written: " + ", ".join(str(p) for p in [args.out / "report.md", *plots]))


def tune_config(args: argparse.Namespace) -> TuneConfig:
    """The tune that ``ttt-nn tune``'s arguments describe."""
    model_args = simple_parse_args_string(args.model_args or "")
    for name in ("pretrained", "index", "device", "max_length", "k"):
        if getattr(args, name) is not None:
            model_args[name] = getattr(args, name)
    model_args.setdefault("batch_size", 1)
    model_args.setdefault("device", "cpu")
    grid = tuple(handle_arg_string(v) for v in args.grid.split(":") if v)
    return TuneConfig(method=args.method, param=args.param, grid=grid, model_args=model_args, docs=args.docs,
                      min_chars=args.min_chars, max_chars=args.max_chars, seed=args.seed, out=args.out,
                      widen=args.widen, validation_file=args.validation_file)


def _cmd_tune(args: argparse.Namespace) -> None:
    from .tune import run_tune

    run_tune(tune_config(args))


def _cmd_compare(args: argparse.Namespace) -> None:
    from .compare import run
    from .experiment import load

    if any("=" not in kv for kv in args.chosen):
        raise ValueError(f"--chosen takes LABEL=VALUE pairs, got {args.chosen}")
    chosen = dict(kv.split("=", 1) for kv in args.chosen)
    # the report reads logs and results only: it needs neither the index nor the document files
    experiment = load(args.experiment, check_paths=not args.report_only)
    result = run(experiment, only=args.only, chosen=chosen, print_plan=args.plan, report_only=args.report_only,
                 tune_only=args.tune_only)
    if args.plan:
        print("\n".join(result) if result else "# nothing left to run: ttt-nn compare --report-only writes the report")


def _cmd_arguments(args: argparse.Namespace) -> None:
    from .settings import arguments_table

    print(arguments_table(), end="")


def _cmd_experts_build(args: argparse.Namespace) -> None:
    import dataclasses

    from .experts_build import build_experts

    settings = ExpertsSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExpertsSettings)})
    pretrained = args.pretrained or str(bundled_lm_path())
    manifest = build_experts(args.index or str(ensure_default_index()), args.out, settings, pretrained, args.dtype)
    print(f"{manifest.done} experts in {args.out} ({manifest.offline_s:.0f} s offline: clustering "
          f"{manifest.clustering_s:.1f} s, vectors {manifest.vectors})")


def _cmd_paths(args: argparse.Namespace) -> None:
    print(f"bundled_lm={bundled_lm_path()}")
    print(f"task_configs={task_configs_dir() / 'ttt'}")
    print(f"pile_task_configs={task_configs_dir() / 'pile'}")
    if args.index:
        print(f"default_index={ensure_default_index()}")


def build_parser() -> argparse.ArgumentParser:
    tune = TuneConfig(method="ttt-nn", param="lr", grid=())
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
    p.add_argument("--max-length", type=int, default=256,
                   help="training chunk and scoring window in tokens (default: %(default)s)")
    p.add_argument("--max-neighbor-tokens", type=int, default=512,
                   help="tokens trained on per neighbour (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("work/demo"),
                   help="harness output directory (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "report",
        help="Markdown table and PNG plots from harness results of ttt-nn, its baselines and --model hf",
        description="Reads results_*.json files (or directories holding them) written by lm_eval --output_path, "
                    "plus the per-document logs of ttt-nn models, and writes report.md and PNG plots (bits per "
                    "byte against k and against gradient steps, per method, training cost). Runs of --model hf are "
                    "the base of the 'kept' column.",
    )
    p.add_argument("results", type=Path, nargs="+", help="results_*.json files or directories")
    p.add_argument("--out", type=Path, default=Path("work/report"), help="output directory (default: %(default)s)")
    p.add_argument("--reference", help="label of the run every other run's bits per byte is also divided by, with a "
                                       "paired interval (e.g. tuned dynamic evaluation)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser(
        "tune",
        help="choose a method's hyperparameter on validation documents from the index's corpus (never test)",
        description="Evaluates every value of --grid with --method on validation documents sampled from the index's "
                    "own corpus, each excluded from its own neighbours by id; prints and writes the table and the "
                    "chosen value (lowest bits per byte, ties to fewer gradient steps).",
    )
    p.add_argument("--method", default=tune.method,
                   help="ttt-nn, ttt-nn-context, ttt-nn-interp or ttt-nn-dyneval (default: %(default)s)")
    p.add_argument("--param", default=tune.param,
                   help="argument to tune: lr, lambda, context_tokens, sift_lambda, alpha, ... (default: %(default)s)")
    p.add_argument("--grid", required=True, help="values, colon-separated, e.g. 1e-5:2e-5:5e-5:1e-4")
    p.add_argument("--pretrained", help="HF causal LM (default: the bundled one)")
    p.add_argument("--index", help="index directory or grpc:// servers (default: the bundled index)")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--max-length", type=int, help="training chunk and scoring window (default: the model's)")
    p.add_argument("--k", type=int, help=f"neighbours (default: {NeighbourSettings.k})")
    p.add_argument("--model-args",
                   help="further model arguments as for lm_eval, e.g. max_neighbor_tokens=256,select=sift")
    p.add_argument("--docs", type=int, default=tune.docs, help="validation documents (default: %(default)s)")
    p.add_argument("--min-chars", type=int, default=tune.min_chars,
                   help="shortest validation document (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=tune.max_chars,
                   help="longest validation document (default: %(default)s)")
    p.add_argument("--seed", type=int, default=tune.seed, help="seed of the validation sample (default: %(default)s)")
    p.add_argument("--out", type=Path, default=tune.out,
                   help="writes tune.json and scratch logs here (default: %(default)s)")
    p.add_argument("--validation-file", type=Path,
                   help="validation split file (JSONL) to draw the documents from, e.g. the one `ttt-index corpus` "
                        "wrote (default: documents of the index's own corpus, each excluded from its neighbours)")
    p.add_argument("--widen", type=int, default=tune.widen,
                   help="while the choice lands on an edge of the grid, evaluate the next value past it, up to this "
                        "many times (default: %(default)s)")
    p.set_defaults(func=_cmd_tune)
    p = sub.add_parser(
        "compare",
        help="tune every method of an experiment file on validation documents, run each on the test documents with "
             "lm_eval, and write the report with paired intervals",
        description="Reads an experiment file (TOML: the model, the index, the validation and test documents, the "
                    "tuning budget and every method with its grid), tunes each method on the same validation "
                    "budget (widening a grid whose choice lands on its edge), runs each on the same test documents "
                    "through the stock lm_eval command, and writes report.md and plots with 95% paired bootstrap "
                    "intervals. A rerun resumes from the tune records and the per-document logs.",
    )
    p.add_argument("experiment", type=Path, help="experiment file (TOML)")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="run only these methods (and the tunes they need)")
    p.add_argument("--chosen", nargs="+", default=[], metavar="LABEL=VALUE",
                   help="use VALUE for LABEL's tuned argument instead of tuning it (recorded as given, not tuned)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true",
                      help="print the tune and lm_eval commands that can run now, one per line, for your own "
                           "scheduler; run nothing")
    mode.add_argument("--report-only", action="store_true",
                      help="run nothing: write the report from the tunes and runs finished so far")
    mode.add_argument("--tune-only", action="store_true",
                      help="run the tunes only and print their table; score no test document")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("experts", help="amortised test-time training: LoRA experts, one per cluster of an index")
    experts = p.add_subparsers(dest="experts_command", required=True)
    p = experts.add_parser(
        "build",
        help="cluster an index's documents and train one LoRA expert per cluster (resumes a stopped build)",
        description="Clusters a seeded sample of the index's documents (spherical k-means over their vectors) and "
                    "trains one LoRA adapter per cluster on up to --docs-per-expert of its documents, with the "
                    "trainer of test-time training. Use them with lm_eval --model ttt-nn --model_args "
                    "experts=OUT,index=INDEX.",
    )
    p.add_argument("--index", help="index directory or grpc:// servers (default: the bundled index)")
    p.add_argument("--out", type=Path, required=True, help="experts directory (a stopped build resumes in it)")
    p.add_argument("--pretrained", help="HF causal LM (default: the bundled one)")
    p.add_argument("--dtype", default="auto", help="weights' dtype, as lm_eval's dtype= (default: %(default)s)")
    add_settings_arguments(p, ExpertsSettings)
    p.set_defaults(func=_cmd_experts_build)
    p = sub.add_parser("arguments", help="print every model argument of ttt-nn and its baselines, with its default "
                                         "and meaning (the README's table)")
    p.set_defaults(func=_cmd_arguments)
    p = sub.add_parser("paths",
                       help="print where the bundled model and the task configs are (for --model hf / --include_path)")
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
    except (OSError, ValueError, KeyError) as e:
        print(f"ttt-nn: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
