"""Pick an index layout from a memory budget: ``ttt-index plan`` and ``build --max-memory``.

Candidates for N vectors of dimension d: exact ``Flat``, and IVF indexes (nlist = 4 sqrt(N)
rounded to a power of two, at most 65536: Faiss's guideline) with ``Flat``, ``SQ8`` or
``PQ{m}`` codes (m = d/4, d/8, d/16 bytes), each with the inverted lists in RAM or on disk
(``--on-disk``), with or without exact re-ranking from stored float16 vectors (``--refine``).

Bytes per vector in RAM: the code plus an 8-byte id (Flat: 4d and no ids), plus the coarse
quantizer (nlist x d x 4 bytes) once; on-disk lists keep only the quantizer resident and read
list pages through the page cache. On disk: codes and ids, plus 2d bytes with ``--refine``,
plus the document table entry (``DOC_TABLE_DTYPE``). Expected recall@20 comes from our own measurements
(``benchmarks/bench_scale.py`` writes ``measured_recall.json`` next to this file), keyed by
code family and bytes per dimension, per source (synthetic mixtures, real embeddings): the plan
expects the lower of the two.

The rule: among the layouts whose resident memory fits 80% of the budget (the rest is left
for the language model, the encoder and the OS) and whose disk fits ``--max-disk``, choose
the highest expected recall (to two decimals: what 1,000 queries measure); among equals, the
fewest bytes on disk (fewer bytes read per query), then inverted lists in RAM when they fit
(no disk read in the search), then the least RAM.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .corpus import DOC_TABLE_DTYPE

MEASURED = Path(__file__).with_name("measured_recall.json")
HEADROOM = 0.8
DOC_TABLE_BYTES = DOC_TABLE_DTYPE.itemsize
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "B": 10**9}
_BYTES = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_count(text: str | int) -> int:
    """``210M`` -> 210_000_000."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGTB]?)\s*", str(text).upper())
    if not match:
        raise ValueError(f"expected a count such as 2000000 or 210M, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_bytes(text: str | int) -> int:
    """``64G`` -> 64 GiB."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not match:
        raise ValueError(f"expected a size such as 64G or 512M, got {text!r}")
    return int(float(match.group(1)) * _BYTES[match.group(2)])


def default_nlist(n: int) -> int:
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))))


SOURCES = ("synthetic", "real")  # the kinds of data a recall was measured on


def measured_recall() -> dict[str, float]:
    """Recall@20 per layout family: the worse of the synthetic and the real measurement where
    both exist (they rank differently, so the plan expects the lower one)."""
    sources = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    recall: dict[str, float] = {}
    for source in sources.values():
        for family, value in source["recall"].items():
            recall[family] = min(value, recall.get(family, value))
    return recall


def record_measured_recall(kind: str, data: str, families: dict[str, float]) -> None:
    """Replace the last measurement on this kind of data (``SOURCES``) in
    ``measured_recall.json``, keeping the other kind's."""
    from .atomic import atomic_write

    if kind not in SOURCES:
        raise ValueError(f"kind of data must be one of {SOURCES}, got {kind!r}")
    sources = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    sources[kind] = {"data": data, "recall": {f: round(v, 4) for f, v in sorted(families.items())}}
    atomic_write(MEASURED, json.dumps(sources, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Layout:
    factory: str
    family: str  # key of the measured recall table
    on_disk: bool
    refine: bool
    ram_bytes: int
    disk_bytes: int
    recall: float | None

    def describe(self) -> str:
        options = " ".join(o for o, on in (("--on-disk", self.on_disk), ("--refine", self.refine)) if on)
        recall = f"{self.recall:.3f}" if self.recall is not None else "unmeasured"
        return (f"--factory {self.factory} {options}".strip() + f" (RAM {human(self.ram_bytes)}, disk "
                f"{human(self.disk_bytes)}, expected recall@20 {recall})")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def candidates(n: int, dim: int) -> list[Layout]:
    recall = measured_recall()
    nlist = default_nlist(n)
    quantizer = nlist * dim * 4
    out = [Layout("Flat", "Flat", False, False, 4 * dim * n, (4 * dim + DOC_TABLE_BYTES) * n, recall.get("Flat", 1.0))]
    codes = [("Flat", 4 * dim, "IVF,Flat"), ("SQ8", dim, "IVF,SQ8")]
    codes += [(f"PQ{m}", m, f"IVF,PQ(d/{dim // m})") for m in (dim // 4, dim // 8, dim // 16) if m and dim % m == 0]
    for code, code_bytes, family in codes:
        for refine in (False, True):
            key = family + (" + refine" if refine else "")
            disk = (code_bytes + 8 + DOC_TABLE_BYTES + (2 * dim if refine else 0)) * n + quantizer
            for on_disk in (False, True):
                ram = quantizer if on_disk else quantizer + (code_bytes + 8) * n
                out.append(Layout(f"IVF{nlist},{code}", key, on_disk, refine, ram, disk, recall.get(key)))
    return out


def choose(n: int, dim: int, max_memory: int, max_disk: int | None = None) -> Layout:
    fitting = [c for c in candidates(n, dim) if c.ram_bytes <= HEADROOM * max_memory
               and (max_disk is None or c.disk_bytes <= max_disk)]
    if not fitting:
        raise ValueError(f"no layout of {n} x {dim} vectors fits {human(max_memory)} of RAM"
                         + (f" and {human(max_disk)} of disk" if max_disk else ""))
    return min(fitting, key=lambda c: (-round(c.recall if c.recall is not None else 0.0, 2), c.disk_bytes,
                                       c.on_disk, c.ram_bytes))


def plan_table(vectors: str, dim: int, max_memory: str, max_disk: str | None = None) -> str:
    n, budget = parse_count(vectors), parse_bytes(max_memory)
    disk = parse_bytes(max_disk) if max_disk else None
    chosen = choose(n, dim, budget, disk)
    lines = [f"{n:,} vectors x {dim} dims, RAM budget {human(budget)} (layouts may use {HEADROOM:.0%}), disk "
             f"{human(disk) if disk else 'unlimited'}; recall@20 measured by benchmarks/bench_scale.py",
             f"{'factory':<22}{'options':<20}{'RAM B/vec':>10}{'disk B/vec':>11}{'RAM':>12}{'disk':>12}"
             f"{'recall@20':>11}  fits"]
    for c in candidates(n, dim):
        options = " ".join(o for o, on in (("--on-disk", c.on_disk), ("--refine", c.refine)) if on) or "-"
        fits = c.ram_bytes <= HEADROOM * budget and (disk is None or c.disk_bytes <= disk)
        recall = f"{c.recall:.3f}" if c.recall is not None else "-"
        mark = "  <- chosen" if c == chosen else ""
        lines.append(f"{c.factory:<22}{options:<20}{c.ram_bytes / n:>10.1f}{c.disk_bytes / n:>11.1f}"
                     f"{human(c.ram_bytes):>12}{human(c.disk_bytes):>12}{recall:>11}  {'yes' if fits else 'no'}{mark}")
    lines.append(f"chosen: {chosen.describe()}")
    return "\n".join(lines)


def choose_layout(max_memory: str, embeddings: Path | None, corpus: tuple[Path, ...], encoder) -> Layout:
    """``build --max-memory``: the layout for this build's size (known from its embeddings,
    or estimated from the corpus lines) and the encoder's width."""
    from .encoder import encoder_dim

    if embeddings is not None:
        from .build import load_parts

        layout, metas = load_parts(embeddings)
        n, dim = sum(m.n_docs for m in metas), layout.dim
    else:  # lines, an upper bound on documents
        n = 0
        for path in corpus:
            with open(path, "rb") as f:
                n += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))
        dim = encoder_dim(encoder)
    return choose(n, dim, parse_bytes(max_memory))
