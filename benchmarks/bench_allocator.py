"""What keeping freed memory in malloc's heap (``lm_eval_ttt/allocator.py``, applied when a
trainer is built on CPU) saves a document's test-time work, against malloc as it comes.

Usage: python benchmarks/bench_allocator.py [--docs 4] [--k 3] [--max-length 256] [--windows 6]
                                            [--repeats 2] [--json PATH]

Each measurement is a fresh interpreter (the setting is process-wide): the bundled SmolLM2-135M
in float32 on CPU, a full-weight ``TestTimeTrainer``, then ``--docs`` documents of ``--k`` steps
on random chunks of ``--max-length`` tokens, ``--windows`` scoring forward passes (log-softmax
over the vocabulary, as lm-eval scores) and the reset. The two allocators alternate
(``--repeats`` rounds); the table gives the median seconds per step and per scoring pass over
the documents after the first, minor page faults per document and the process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, peak_rss_mb, report, write_json  # noqa: E402

MODES = ("as it comes", "kept")


def child(mode: str, docs: int, k: int, max_length: int, windows: int) -> dict:
    import torch

    from lm_eval_ttt.allocator import keep_freed_memory
    from lm_eval_ttt.assets import bundled_lm_path
    from lm_eval_ttt.experts_build import load_model
    from lm_eval_ttt.ttt import TestTimeTrainer, TTTConfig

    if mode == "kept":
        assert keep_freed_memory(), "malloc cannot be tuned here (not glibc, or GLIBC_TUNABLES sets it)"
    torch.manual_seed(0)
    model, _ = load_model(str(bundled_lm_path()), "float32")
    trainer = TestTimeTrainer(model, TTTConfig(lr=1e-4, max_length=max_length))
    vocab = model.config.vocab_size
    steps, scores, faults = [], [], []
    for doc in range(docs):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(k):
            start = time.perf_counter()
            trainer.train([[torch.randint(vocab, (max_length,)).tolist()]])
            steps.append((doc, time.perf_counter() - start))
        with torch.no_grad():
            for _ in range(windows):
                ids = torch.randint(vocab, (1, max_length))
                start = time.perf_counter()
                torch.log_softmax(model(ids).logits.float(), -1).gather(-1, ids[..., None]).sum().item()
                scores.append((doc, time.perf_counter() - start))
        trainer.reset()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    warm = [s for d, s in steps if d > 0]  # the first document also pays the model's first calls
    return {"step_s": statistics.median(warm), "score_s": statistics.median(s for d, s in scores if d > 0),
            "faults_per_doc": statistics.median(faults[1:]),
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in this interpreter
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.docs, args.k, args.max_length, args.windows)))
        return
    if args.docs < 2:
        p.error("--docs must be at least 2 (the first document is a warm-up)")
    runs = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            argv = [sys.executable, __file__, "--child", mode, "--docs", str(args.docs), "--k", str(args.k),
                    "--max-length", str(args.max_length), "--windows", str(args.windows)]
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.splitlines()[-1]))
    rows = []
    base = statistics.median(r["step_s"] for r in runs[MODES[0]])
    for mode in MODES:
        median = {key: statistics.median(r[key] for r in runs[mode]) for key in runs[mode][0]}
        rows.append([mode, round(median["step_s"], 3), round(median["step_s"] / base, 3),
                     round(median["score_s"], 3), int(median["faults_per_doc"]), round(median["peak_rss_mb"])])
    out = report(f"malloc keeping freed memory: bundled SmolLM2-135M, float32, CPU, {args.docs} documents of "
                 f"{args.k} steps on {args.max_length} tokens and {args.windows} scoring passes, median of "
                 f"{args.repeats} alternated runs",
                 ["malloc", "s/step", "vs as it comes", "s/scoring pass", "page faults/doc", "peak RSS MB"], rows,
                 ["malloc", "step_s", "ratio", "score_s", "faults_per_doc", "peak_rss_mb"])
    write_json(args.json, out)


if __name__ == "__main__":
    main()
