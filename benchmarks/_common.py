"""Helpers shared by the benchmarks: work directories, the bundled corpus, synthetic indexes,
memory readings, and one way to report: a printed table plus, with ``--json PATH``, the same
rows as a JSON list (keys as in the table, or as an issue names them)."""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path

WORK = Path(os.environ.get("TTT_BENCH_DIR", "work/bench"))


def bundled_corpus() -> Path:
    from lm_eval_ttt.assets import ensure_default_corpus

    return ensure_default_corpus()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the result rows here as a JSON list")
    return p


def synthetic_corpus(n: int) -> Path:
    """n one-line documents (the texts do not matter for index benchmarks)."""
    from index_server.atomic import atomic_write

    corpus = WORK / f"synthetic-{n}.jsonl"
    if not corpus.is_file():
        WORK.mkdir(parents=True, exist_ok=True)

        def write(f):
            for i in range(n):
                f.write((json.dumps({"text": f"synthetic document {i}"}) + "\n").encode())

        atomic_write(corpus, write)
    return corpus


def embeddings_from_vectors(vectors, name: str) -> Path:
    """An embeddings directory (as `ttt-index embed` writes) holding the given vectors over a
    synthetic corpus, so benchmarks build through the real `build --embeddings` path."""
    import shutil

    from index_server.embed import EmbedConfig, run_embed

    out = WORK / f"{name}.emb"
    shutil.rmtree(out, ignore_errors=True)
    run_embed(EmbedConfig(corpus=(synthetic_corpus(len(vectors)),), output=out, vectors=vectors, progress=False))
    return out


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(_fmt(v).rjust(w) for v, w in zip(row, widths)))


def write_json(path: Path | None, rows: list[dict]) -> None:
    from index_server.atomic import atomic_write

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(rows, indent=2, default=str) + "\n")
        print(f"\nwrote {len(rows)} rows to {path}")


def report(title: str, header: list[str], rows: list[list], keys: list[str] | None = None) -> list[dict]:
    """Print the table; return its rows as dicts (keys: ``keys`` or the header)."""
    print_table(title, header, rows)
    return [dict(zip(keys or header, row)) for row in rows]


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
