"""Cost of the `.pth` registration hook on every interpreter start.

Usage: python benchmarks/bench_startup.py [--runs 20] [--json PATH]
Prints the median wall time of `python -c pass` in this environment and the import time of
lm_eval_ttt._registration (from -X importtime) measured in the same runs, side by side.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, write_json  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    walls, hooks = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                              check=True)
        walls.append((time.perf_counter() - start) * 1000)
        match = re.search(r"import time:\s+\d+ \|\s+(\d+) \|\s+lm_eval_ttt\._registration$", proc.stderr, re.M)
        if not match:
            raise SystemExit("lm_eval_ttt._registration was not imported at start-up: is the package installed?")
        hooks.append(int(match.group(1)) / 1000)
    wall, hook = statistics.median(walls), statistics.median(hooks)
    print(f"interpreter start (python -c pass): {wall:.1f} ms median of {args.runs}")
    print(f"registration hook import:           {hook:.2f} ms  ({hook / wall:.1%} of start-up)")
    write_json(args.json, [{"runs": args.runs, "interpreter_start_ms": wall, "hook_import_ms": hook,
                            "hook_share": hook / wall}])


if __name__ == "__main__":
    main()
