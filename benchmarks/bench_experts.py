"""What merged experts add to a document's test-time cost: training steps and scoring with M
experts merged into the model, against the same work with none.

Usage: python benchmarks/bench_experts.py [--experts 0,1,4,8] [--rank 8] [--k 2] [--max-length 256]
                                          [--score-tokens 1024] [--repeats 3] [--json PATH]

On the bundled SmolLM2-135M (float32, CPU): M synthetic experts of rank ``--rank`` on every
linear layer the experts' build adapts (peft's all-linear), merged with equal weights as
``--model ttt-nn experts=DIR`` merges them (``Experts.applied``), then one document's work as
``ttt-nn`` does it with adapter=lora: ``--k`` neighbours of ``--max-length`` random tokens (one
step each), scoring forward passes over ``--score-tokens`` tokens in ``--max-length`` windows,
and the reset. The configurations alternate document by document (``--repeats`` rounds), so
a machine whose speed drifts shifts them alike; the table gives the median seconds per
document and its ratio to no experts (goal: about 1.0x, the merge costing one low-rank
product per layer per document, not per step).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, report, write_json  # noqa: E402

from lm_eval_ttt.experts import ExpertChoice, Experts, ExpertsManifest  # noqa: E402
from lm_eval_ttt.settings import TrainSettings  # noqa: E402
from lm_eval_ttt.trainers import build_trainer  # noqa: E402


def synthetic_experts(model: torch.nn.Module, count: int, rank: int) -> Experts:
    """``count`` experts of random factors on every linear layer but the output head."""
    generator = torch.Generator().manual_seed(0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    factors = {c: {n: (torch.randn(rank, m.in_features, generator=generator) * 0.01,
                       torch.randn(m.out_features, rank, generator=generator) * 0.01) for n, m in layers.items()}
               for c in range(count)}
    manifest = ExpertsManifest(pretrained="", model="", index="", vectors="exact",
                               clustering={"clusters": count, "seed": 0, "sample": 0, "centroids_sha256": ""},
                               training={"lora_r": rank, "lora_alpha": 2.0 * rank, "docs_per_expert": 0}, experts=[])
    return Experts(Path("."), manifest, np.eye(count, 4, dtype=np.float32), factors)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--experts", default="0,1,4,8", help="numbers of experts merged, comma-separated (0: none)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--score-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from lm_eval_ttt.assets import bundled_lm_path
    from lm_eval_ttt.experts_build import load_model

    torch.manual_seed(0)
    model, _ = load_model(str(bundled_lm_path()), "float32")
    counts = [int(c) for c in args.experts.split(",")]
    experts = synthetic_experts(model, max(counts), args.rank)
    experts.attach(model)  # on the plain model, before the trainer wraps it, as ttt-nn does
    adapted, trainer = build_trainer(model, TrainSettings(adapter="lora"), max_length=args.max_length, seed=0,
                                     pad_id=0, peft_loaded=False)
    vocab = model.config.vocab_size
    neighbours = [torch.randint(vocab, (args.max_length,)).tolist() for _ in range(args.k)]
    windows = torch.randint(vocab, (args.score_tokens // args.max_length, args.max_length))

    def document(count: int) -> dict:
        choice = ExpertChoice(list(range(count)), [1 / count] * count, [0.0] * count) if count else None
        start = time.perf_counter()
        with experts.applied(choice) if count else contextlib.nullcontext():
            train_start = time.perf_counter()
            trainer.train([neighbours])
            score_start = time.perf_counter()
            with torch.no_grad():
                for window in windows:
                    adapted(window[None]).logits.sum().item()
            trainer.reset()
            end = time.perf_counter()
        return {"doc": time.perf_counter() - start, "train": score_start - train_start, "score": end - score_start}

    document(0)  # warm-up: first calls allocate
    times = {c: [] for c in counts}
    for _ in range(args.repeats):
        for c in counts:
            times[c].append(document(c))
    base = statistics.median(t["doc"] for t in times[counts[0]])
    rows = []
    for c in counts:
        doc = statistics.median(t["doc"] for t in times[c])
        rows.append([c, c * args.rank, round(statistics.median(t["train"] for t in times[c]), 3),
                     round(statistics.median(t["score"] for t in times[c]), 3), round(doc, 3), round(doc / base, 3)])
    out = report(f"merged experts' cost per document: bundled SmolLM2-135M, float32, CPU, k={args.k} neighbours of "
                 f"{args.max_length} tokens (LoRA steps), {args.score_tokens} scored tokens, median of {args.repeats}",
                 ["experts", "merged rank", "train s", "score s", "s/doc", f"vs {counts[0]} experts"], rows,
                 ["experts", "merged_rank", "train_s", "score_s", "seconds_per_doc", "ratio"])
    write_json(args.json, out)


if __name__ == "__main__":
    main()
