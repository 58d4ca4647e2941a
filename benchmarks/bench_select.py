"""What SIFT selection costs next to the test-time training it chooses for.

Usage: python benchmarks/bench_select.py [--dim 384] [--json PATH]

Selection time per document (exact greedy with rank-one updates, selection.select_sift)
for K = 200, 1000, 4000 candidates and k = 20, 50 picks, on clustered synthetic candidate
vectors of the encoder's width (the cost depends on K, k and the width only), plus fetching
K exact candidate vectors from the bundled index (where it holds K vectors). TTT time per document is measured on the
bundled model: seconds per trained neighbour (256-token chunks, 256 tokens per neighbour)
times k. Target: selection <= 5% of the TTT time at K=200, k=50.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, report, write_json  # noqa: E402

from lm_eval_ttt.selection import select_sift  # noqa: E402


def seconds_per_neighbour(neighbours: int = 6) -> float:
    """Training seconds per 256-token neighbour on the bundled model (mean of several)."""
    import json

    from lm_eval_ttt.assets import bundled_lm_path, ensure_default_corpus
    from lm_eval_ttt.model import TTTNNLM

    lm = TTTNNLM(pretrained=str(bundled_lm_path()), k=1, max_length=256, max_neighbor_tokens=256, device="cpu",
                 batch_size=1, seed=1, log_dir="work/bench/select-logs", dtype="float32")
    texts = [json.loads(line)["text"] for line in open(ensure_default_corpus() / "stdlib_code.index.jsonl")]
    tokens = [lm.tokenizer(t[:4000], add_special_tokens=False).input_ids for t in texts if len(t) > 4000][:neighbours]
    lm.trainer.train([tokens[:1]])  # warm-up
    lm.trainer.reset()
    start = time.perf_counter()
    lm.trainer.train([tokens])
    seconds = (time.perf_counter() - start) / len(tokens)
    lm.trainer.reset()
    return seconds


def clustered(n: int, dim: int, rng) -> np.ndarray:
    centres = rng.standard_normal((max(2, n // 50), dim))
    return (centres[rng.integers(len(centres), size=n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    from index_server.search import LocalIndex
    from lm_eval_ttt.assets import ensure_default_index

    index = LocalIndex(ensure_default_index())
    per_neighbour = seconds_per_neighbour()
    rows = []
    for K in (200, 1000, 4000):
        candidates = clustered(K, args.dim, rng)
        query = candidates[:10].mean(0) + 0.3 * rng.standard_normal(args.dim).astype(np.float32)
        fetch = None
        if K <= index.manifest.n_vectors:
            ids = rng.choice(index.manifest.n_vectors, size=K, replace=False)
            start = time.perf_counter()
            index.vectors(ids)
            fetch = time.perf_counter() - start
        for k in (20, 50):
            select_sift(query, candidates, k, 0.01)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                select_sift(query, candidates, k, 0.01)
            select_s = (time.perf_counter() - start) / args.repeats
            ttt_s = per_neighbour * k
            total = select_s + (fetch or 0.0)
            rows.append([K, k, round(select_s * 1000, 2), None if fetch is None else round(fetch * 1000, 2),
                         round(ttt_s, 2), round(100 * total / ttt_s, 3)])
    out = report(f"selection per document (dim {args.dim}) vs TTT on the bundled model ({per_neighbour:.2f} s per "
                 f"256-token neighbour, 2 CPU cores)",
                 ["K", "k", "select ms", "fetch vectors ms", "TTT s/doc", "selection % of TTT"], rows,
                 ["candidates", "k", "select_ms", "fetch_vectors_ms", "ttt_seconds_per_document",
                  "selection_percent_of_ttt"])
    target = next(r for r in out if r["candidates"] == 200 and r["k"] == 50)["selection_percent_of_ttt"]
    print(f"\nK=200, k=50: selection is {target:.3f}% of the TTT time (target <= 5%): "
          + ("met" if target <= 5 else "not met"))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
