"""Helpers shared by the benchmarks: work directories, the bundled corpus, table printing."""

from __future__ import annotations

import os
import resource
from pathlib import Path

WORK = Path(os.environ.get("TTT_BENCH_DIR", "work/bench"))


def bundled_corpus() -> Path:
    from lm_eval_ttt.assets import ensure_default_corpus

    return ensure_default_corpus()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(_fmt(v).rjust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
