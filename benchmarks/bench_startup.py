"""Cost of the `.pth` registration hook on every interpreter start.

Usage: python benchmarks/bench_startup.py [--runs 20]
Prints the median wall time of `python -c pass` in this environment and the import time of
lm_eval_ttt._registration (from -X importtime) measured in the same runs, side by side.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    walls, hooks = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True)
        walls.append((time.perf_counter() - start) * 1000)
        match = re.search(r"import time:\s+\d+ \|\s+(\d+) \|\s+lm_eval_ttt\._registration$", proc.stderr, re.M)
        if not match:
            raise SystemExit("lm_eval_ttt._registration was not imported at start-up: is the package installed?")
        hooks.append(int(match.group(1)) / 1000)
    wall, hook = statistics.median(walls), statistics.median(hooks)
    print(f"interpreter start (python -c pass): {wall:.1f} ms median of {args.runs}")
    print(f"registration hook import:           {hook:.2f} ms  ({hook / wall:.1%} of start-up)")


if __name__ == "__main__":
    main()
