"""The index a retriever queries: ``KnnIndex``, and ``open_index`` above its two backends.

``KnnIndex`` is the contract, in the way lm-eval's ``LM`` declares a model's: the in-process
``search.LocalIndex`` and the gRPC ``client.GrpcIndex`` both satisfy it (a remote index has
the local one's surface, as faiss's ``contrib/client_server.ClientIndex`` mirrors a local
index), and so does any test double. ``open_index(spec, options)`` picks the backend from
one spec string, so the harness models and ``ttt-nn tune`` build no client themselves and
no option is lost on the way (benchmarks that compare the backends build each one).

This module sits above both backends and nothing in the package imports it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .client import GrpcIndex, parse_addresses
from .manifest import MANIFEST_NAME, Manifest
from .options import GRPC_PREFIX, IndexOptions
from .search import LocalIndex, SearchKnobs, SearchResult


@runtime_checkable
class KnnIndex(Protocol):
    """A k-nearest-neighbour index over a corpus, answering in global document ids."""

    manifest: Manifest  # what the index was built from: encoder, dims, metric, shards, corpus
    knobs: SearchKnobs  # the search settings every answer of this index uses (nprobe, efSearch, refine)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """The exact top-k of each query row under the index's layout, nearest first, ties to
        the smaller id; rows padded with id -1 where fewer exist. ``missing_shards`` names,
        per query, the shards that did not answer (only under ``failure_policy=degrade``).
        Raises ``search.QueryError`` for a wrong dimension, non-finite values or k out of range."""
        ...

    def texts(self, ids: Sequence[int]) -> list[str | None]:
        """The documents' texts in the given order; None where a shard is down (degrade)."""
        ...

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray | None, str]:
        """The documents' vectors (float32 rows) and where they came from ("stored-f16",
        "exact"), or (None, "none") when the index keeps only lossy codes or a shard is down."""
        ...

    def close(self) -> None:
        """Release files and connections; the index answers nothing afterwards."""
        ...


def is_remote(spec: str | Path) -> bool:
    return str(spec).startswith(GRPC_PREFIX)


def spec_problem(spec: str | Path) -> str | None:
    """Why ``spec`` names no index, as far as can be told without opening it (milliseconds:
    callers check it before a model loads), or None."""
    if is_remote(spec):
        try:
            parse_addresses(str(spec))
        except ValueError as e:
            return str(e)
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        return f"{spec}: no such index directory (build one with `ttt-index build`)"
    if not (path / MANIFEST_NAME).is_file():
        return f"{spec}: not an index directory (no {MANIFEST_NAME}; build one with `ttt-index build`)"
    return None


def open_index(spec: str | Path, options: IndexOptions = IndexOptions()) -> KnnIndex:
    """An index directory -> ``LocalIndex``; ``grpc://h:p+h:p`` -> ``GrpcIndex``."""
    if is_remote(spec):
        return GrpcIndex(parse_addresses(str(spec)), options)
    return LocalIndex(spec, options)
