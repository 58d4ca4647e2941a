"""Append-only JSONL files that survive crashes and several writers.

The per-document logs and the neighbour cache are JSONL files appended one record at a
time. A process killed mid-write leaves a truncated last line: readers skip it and say so
(``path:line``), instead of crashing every later run, and the next writer first ends the
broken line so its record is not glued onto it. Writers take a ``filelock`` lock next to
the file, so records of concurrent processes never interleave.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from filelock import FileLock


class SkippedLineWarning(UserWarning):
    """A JSONL line that could not be read (truncated by a crash, or not JSON) was skipped."""


def lock_for(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock")


_warned: set[tuple[str, int, int]] = set()  # (file, line, hash of the line): said once per process


def read_records(path: Path) -> list[dict]:
    """Every well-formed record of a JSONL file; bad lines are skipped with a warning."""
    records = []
    if not path.is_file():
        return records
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            key = (str(path), line_no, hash(raw))
            if key not in _warned:
                _warned.add(key)
                last = line_no == len(lines)  # no newline after it: a write cut short
                reason = "truncated last record (an interrupted write?)" if last else f"unreadable record ({e})"
                warnings.warn(f"{path}:{line_no}: {reason}; skipped", SkippedLineWarning, stacklevel=2)
            continue
        records.append(record)
    return records


def _whole(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def append_record(path: Path, record: dict) -> None:
    """Append one record as one line; the caller holds the file's lock. A last line a crash
    cut short (no newline after it, not a whole record) is removed first: it is no record."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        size = f.tell()
        if size > 0:
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
            if not tail.endswith(b"\n"):
                newline = tail.rfind(b"\n")
                if _whole(tail[newline + 1 :]) or (newline < 0 and size > len(tail)):
                    data = b"\n" + data  # a whole record (readers count it), or a line over 1 MiB: end it
                else:
                    f.truncate(size - len(tail) + newline + 1)
        f.write(data)
        f.flush()
