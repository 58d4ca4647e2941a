"""Dataset loaders of the task YAMLs in ``task_configs/ttt`` and ``task_configs/pile``.

The YAMLs name them through one-line shims next to them (lm-eval's ``!function`` loads a
file from the YAML's folder). lm-eval calls them with the task's ``metadata`` (plus
``--metadata`` JSON keys) and ``dataset_kwargs``. Paths come from there or from environment
variables, never from the YAML, so the same files work on every machine.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import numpy as np

from index_server.corpus import json_problem


def read_jsonl(path: Path):
    if path.suffix == ".zst":
        import zstandard  # only needed for the compressed Pile files

        stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    else:
        stream = open(path, encoding="utf-8")
    with stream:
        for line_no, line in enumerate(stream, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON: {json_problem(e, line)}") from e


def split_at_line(text: str, fraction: float) -> tuple[str, str]:
    """Split protocol: (prefix, rest), cut at the first line break after ``fraction`` of the text."""
    if not 0 < fraction < 1:
        raise ValueError(f"split_prefix must lie in (0, 1), got {fraction}")
    cut = int(len(text) * fraction)
    newline = text.find("\n", cut)
    cut = newline + 1 if 0 <= newline < len(text) - 1 else cut
    return text[:cut], text[cut:]


def _dataset(rows: list[dict], source: str, split_prefix: float | None = None) -> dict:
    """Rows -> {"test": Dataset}. With ``split_prefix``, ``text`` becomes the scored rest and
    ``prefix`` the part that ``query=prefix`` retrieves on."""
    if not rows:
        raise ValueError(f"{source}: no documents")
    records = []
    for r in rows:
        record = {"text": r["text"], "meta": json.dumps(r.get("meta") or {})}
        if split_prefix is not None:
            record["prefix"], record["text"] = split_at_line(r["text"], float(split_prefix))
        records.append(record)
    return {"test": datasets.Dataset.from_list(records)}


def seeded_sample(n: int, texts_of, count: int | None, seed: int = 0, min_chars: int = 0,
                  max_chars: int | None = None, batch: int = 256) -> list[tuple[int, str]]:
    """The rule that picks held-out and validation documents, as (position, text): positions
    0..n-1 in a permutation seeded by ``seed``, those whose text (``texts_of(positions)``, read
    a batch at a time; None: unavailable) has ``min_chars`` to ``max_chars`` characters, the
    first ``count`` of them (all when None)."""
    order = np.random.default_rng(seed).permutation(n)
    chosen = []
    for start in range(0, n, batch):
        positions = [int(i) for i in order[start : start + batch]]
        for position, text in zip(positions, texts_of(positions)):
            if text is not None and min_chars <= len(text) and (max_chars is None or len(text) <= max_chars):
                chosen.append((position, text))
                if len(chosen) == count:
                    return chosen
    return chosen


def load_corpus(corpus_file: str | None = None, sample: int | None = None, seed: int = 0, min_chars: int = 0,
                max_chars: int | None = None, split_prefix: float | None = None, **kwargs) -> dict:
    """The documents of a corpus JSONL file (e.g. the test split ``ttt-index corpus`` wrote),
    optionally a seeded sample of them (``seeded_sample``). The file comes from
    ``--metadata '{"corpus_file": ...}'`` or ``TTT_NN_CORPUS_FILE``."""
    corpus_file = corpus_file or os.environ.get("TTT_NN_CORPUS_FILE")
    if not corpus_file:
        raise ValueError("ttt_corpus reads a corpus file: pass --metadata "
                         "'{\"corpus_file\": \"path/to/x.test.jsonl\"}' or set TTT_NN_CORPUS_FILE")
    path = Path(corpus_file).expanduser()
    rows = list(read_jsonl(path))
    if sample is not None or min_chars or max_chars:
        picked = seeded_sample(len(rows), lambda positions: [rows[p]["text"] for p in positions], sample, seed,
                               min_chars, max_chars)
        rows = [rows[p] for p, _ in picked]
    return _dataset(rows, str(path), split_prefix)


def load_bundled(subset: str = "stdlib_code", split_prefix: float | None = None, **kwargs) -> dict:
    """Held-out test split of the bundled corpus (written on first use)."""
    from lm_eval_ttt.assets import ensure_default_corpus

    path = ensure_default_corpus() / f"{subset}.test.jsonl"
    return _dataset(list(read_jsonl(path)), str(path), split_prefix)


def load_pile(pile_set_name: str, pile_file: str | None = None, split_prefix: float | None = None, **kwargs) -> dict:
    """One Pile subset from the user's local copy of the Pile test (or validation) file.

    Point at it with ``--metadata '{"pile_file": "/data/pile/test.jsonl.zst"}'`` or the
    ``PILE_TEST_FILE`` environment variable.
    """
    pile_file = pile_file or os.environ.get("PILE_TEST_FILE")
    if not pile_file:
        raise ValueError(
            "the Pile tasks read a local copy of the Pile: pass --metadata "
            "'{\"pile_file\": \"/path/to/test.jsonl.zst\"}' or set PILE_TEST_FILE"
        )
    path = Path(pile_file).expanduser()
    rows = [r for r in read_jsonl(path) if (r.get("meta") or {}).get("pile_set_name") == pile_set_name]
    return _dataset(rows, f"{path} (pile_set_name {pile_set_name!r})", split_prefix)
