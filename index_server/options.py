"""How to open an index: every option, with its default, in one place (``IndexOptions``).

A leaf of data: it imports nothing else of the package, so every backend, the CLI and the
harness's settings can derive their defaults and help texts from it. ``index.open_index``
takes these options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TOKEN_ENV = "TTT_NN_INDEX_TOKEN"
GRPC_PREFIX = "grpc://"
MAX_K = 4096  # largest k a search accepts, in process and (by default) from a server
REFINE_FACTOR = 4  # approximate candidates per neighbour re-ranked exactly, unless a caller says
NLIST_PER_NPROBE = 32  # an IVF index built here probes 1/32 of its lists unless told otherwise
MAX_DEFAULT_NPROBE = 256
MAX_RETRIES = 4  # gRPC's retry policy allows at most 5 attempts per call


@dataclass(frozen=True)
class IndexOptions:
    timeout_s: float = 30.0  # deadline of each gRPC call, its retries included
    retries: int = 2  # extra attempts of a call that failed UNAVAILABLE (gRPC's own retry policy)
    backoff_s: float = 0.2  # first retry delay, doubled each time
    failure_policy: Literal["fail", "degrade"] = "fail"
    token_file: Path | None = None  # bearer token of the servers; else $TTT_NN_INDEX_TOKEN
    tls_ca: Path | None = None  # PEM root certificate: enables TLS
    # Search settings; None: the server's (gRPC), else the index's own (search.index_defaults)
    nprobe: int | None = None  # IVF lists visited per query
    ef_search: int | None = None  # HNSW candidate list size
    refine_factor: int | None = None  # --refine indexes: candidates per neighbour re-ranked exactly (>= 1)
    max_k: int = MAX_K  # largest k the in-process index accepts
    corpus_root: Path | None = None  # where the corpus lives on this machine, if moved since the build

    def __post_init__(self):
        if self.failure_policy not in ("fail", "degrade"):
            raise ValueError(f"failure_policy must be 'fail' or 'degrade', got {self.failure_policy!r}")
        for name in ("nprobe", "ef_search", "refine_factor", "max_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.timeout_s <= 0 or not 0 <= self.retries <= MAX_RETRIES or self.backoff_s < 0:
            raise ValueError(f"timeout_s must be positive, retries in [0, {MAX_RETRIES}] and backoff_s not negative; "
                             f"got {self.timeout_s}, {self.retries}, {self.backoff_s}")

    def token(self) -> str | None:
        """The bearer token from ``token_file`` or the environment; an empty one is an error."""
        if self.token_file is not None:
            return read_token_file(Path(self.token_file))
        value = os.environ.get(TOKEN_ENV)
        if value is not None and not value.strip():
            raise ValueError(f"${TOKEN_ENV} is set but empty: an empty token would turn authentication off")
        return value.strip() if value else None


def read_token_file(path: Path) -> str:
    """A bearer token file's content, stripped; empty or whitespace-only files are refused
    (an empty token would turn authentication off without a word)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{path}: cannot read token file: {e.strerror}") from e
    if not token:
        raise ValueError(f"{path}: token file is empty")
    return token
