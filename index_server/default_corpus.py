"""The bundled default corpus: real text that every fresh machine has, in Pile format.

Two subsets, both from the running CPython installation (PSF License 2.0):

* ``stdlib_code`` (``pile_set_name: "Github"``, the ``pile_github`` analogue): every ``.py``
  source file of the standard library, one document per file.
* ``python_docs`` (``pile_set_name: "PythonDocs"``): the language-reference and library
  topics that ship in ``pydoc_data.topics`` (the text ``help()`` prints), one document per topic.

Each subset is split by a hash of the file path (topic name), so a held-out document's file
never appears in the index and the split is identical on every machine with the same Python
version. Files that are not valid UTF-8 (a few deliberate encoding fixtures in ``test/``)
are skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_write

TEST_FRACTION_PERCENT = 10
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "lib-dynload", "__pycache__"}


@dataclass
class SubsetStats:
    index: int = 0
    test: int = 0
    skipped: list[str] = field(default_factory=list)


def is_held_out(key: str) -> bool:
    """Deterministic split: about 10% of keys (by SHA-1 of the key) go to the test part."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100 < TEST_FRACTION_PERCENT


def stdlib_sources(stdlib: Path) -> Iterator[Path]:
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _EXCLUDED_DIRS.intersection(rel.parts) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata"):  # machine-specific build data
            continue
        yield path


def _record(text: str, set_name: str, **meta: str) -> str:
    meta = {"pile_set_name": set_name, "source": f"CPython {platform.python_version()}", **meta}
    return json.dumps({"text": text, "meta": meta}, ensure_ascii=False) + "\n"


def _write_split(out_dir: Path, subset: str, items: Iterator[tuple[str, str | None]]) -> SubsetStats:
    """Write ``<subset>.index.jsonl`` and ``<subset>.test.jsonl`` from (key, record) pairs,
    each whole or not at all. A ``None`` record marks a skipped source."""
    stats = SubsetStats()
    parts: dict[str, list[str]] = {"index": [], "test": []}
    for key, record in items:
        if record is None:
            stats.skipped.append(key)
        else:
            parts["test" if is_held_out(key) else "index"].append(record)
    stats.index, stats.test = len(parts["index"]), len(parts["test"])
    for part, records in parts.items():
        atomic_write(out_dir / f"{subset}.{part}.jsonl", "".join(records))
    return stats


def _code_items(stdlib: Path, progress: bool) -> Iterator[tuple[str, str | None]]:
    for path in tqdm(list(stdlib_sources(stdlib)), desc="stdlib_code", disable=not progress):
        rel = path.relative_to(stdlib).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            yield rel, None
            continue
        if not text.strip():
            continue  # empty __init__.py files carry nothing to retrieve or score
        yield rel, _record(text, "Github", path=f"Lib/{rel}", license="PSF-2.0")


def _docs_items() -> Iterator[tuple[str, str | None]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield name, _record(topics[name], "PythonDocs", topic=name, license="PSF-2.0")


def write_default_corpus(out_dir: Path, progress: bool = True) -> dict[str, SubsetStats]:
    """Write both subsets under ``out_dir``; returns per-subset counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {
        "stdlib_code": _write_split(out_dir, "stdlib_code", _code_items(stdlib, progress)),
        "python_docs": _write_split(out_dir, "python_docs", _docs_items()),
    }
