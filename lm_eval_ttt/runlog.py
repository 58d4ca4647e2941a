"""The per-document log of one run's settings: what makes results resumable and auditable.

Every scored document is one JSON line (neighbours, losses, scores, timings). Files are
named by the settings hash (``<method>-<hash>``): a rerun with the same settings resumes, any
change that can alter a score starts a new log. Each rank of a data-parallel run appends
to its own file (``<stem>.rank<R>.jsonl``) under a lock held for the whole run, and readers
merge every rank's file, so resuming works per rank, after changing the number of ranks,
and a second run on the same log directory waits for the first instead of scoring the same
documents twice. A record scored from a degraded retrieval (a shard was down) is never
reused: a later run scores that document again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from filelock import Timeout

from index_server.atomic import atomic_write

from .jsonl import append_record, lock_for, read_records

WAIT_MESSAGE_EVERY_S = 30.0
# A document's logged seconds: together, what scoring it cost (model loading excluded).
TIMINGS = ("retrieve_s", "experts_s", "train_s", "score_s", "reset_s")


def document_seconds(record: dict) -> float:
    return sum(record.get(t, 0.0) for t in TIMINGS)


def global_rank(local_rank: int) -> int:
    """The process's rank across all machines (HFLM's ``rank`` is the local one)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", local_rank))


def rank_files(stem: Path) -> list[Path]:
    return sorted(stem.parent.glob(f"{stem.name}.rank*.jsonl"))


def merged_records(paths) -> dict[str, dict]:
    """The latest record of every document in the given log files."""
    merged: dict[str, dict] = {}
    for path in paths:
        for record in read_records(path):
            if "doc_key" in record:
                merged[record["doc_key"]] = record
    return merged


def read_log(stem: Path) -> dict[str, dict]:
    """The latest record of every document in all rank files of a log."""
    return merged_records(rank_files(stem))


def is_degraded(record: dict) -> bool:
    return bool(record.get("missing_shards"))


class RunLog:
    """The log files of one settings identity, held open by one process (one rank)."""

    def __init__(self, directory: Path, stem_name: str, settings: dict, rank: int):
        self.stem = Path(directory) / stem_name
        self.settings = settings
        self.path = self.stem.with_name(f"{stem_name}.rank{rank}.jsonl")
        self._lock = lock_for(self.path)

    @property
    def settings_path(self) -> Path:
        return self.settings_path_of(self.stem)

    @staticmethod
    def settings_path_of(stem: Path) -> Path:
        return stem.with_name(stem.name + ".settings.json")

    def __enter__(self) -> RunLog:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        waited = 0.0
        while True:
            try:
                self._lock.acquire(timeout=WAIT_MESSAGE_EVERY_S)
                break
            except Timeout:
                waited += WAIT_MESSAGE_EVERY_S
                print(f"ttt-nn: waiting for another run writing {self.path} ({waited:.0f} s); it will score the "
                      f"documents this run would repeat", file=sys.stderr, flush=True)
        if not self.settings_path.is_file():
            atomic_write(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True, default=str) + "\n")
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def finished(self, resume: bool) -> dict[str, dict]:
        """Documents that need no scoring: every rank's records, minus degraded ones."""
        if not resume:
            return {}
        return {k: r for k, r in read_log(self.stem).items() if not is_degraded(r)}

    def append(self, record: dict) -> None:
        append_record(self.path, {**record, "logged_at": time.time()})
