"""How to open an index: one spec string plus every option, with their defaults in one place.

``open_index(spec, options)`` returns an object with the in-process index's surface
(``manifest``, ``search``, ``texts``, ``vectors``, ``close``) whether ``spec`` is an index
directory or ``grpc://host:port+host:port`` shard servers, the way faiss's
``contrib/client_server.ClientIndex`` mirrors a local index. Callers (the harness models,
the CLI, benchmarks) build no client themselves, so no option is lost on the way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TOKEN_ENV = "TTT_NN_INDEX_TOKEN"
GRPC_PREFIX = "grpc://"
MAX_K = 4096  # largest k a search accepts, in process and (by default) from a server


@dataclass(frozen=True)
class IndexOptions:
    timeout_s: float = 30.0  # deadline of each gRPC call
    retries: int = 2  # extra attempts on transient gRPC errors
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
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"timeout_s must be positive and retries, backoff_s not negative; got "
                             f"{self.timeout_s}, {self.retries}, {self.backoff_s}")

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
    (they used to turn authentication off without a word)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{path}: cannot read token file: {e.strerror}") from e
    if not token:
        raise ValueError(f"{path}: token file is empty")
    return token


def is_remote(spec: str) -> bool:
    return str(spec).startswith(GRPC_PREFIX)


def open_index(spec: str | Path, options: IndexOptions = IndexOptions()):
    """An index directory -> ``LocalIndex``; ``grpc://h:p+h:p`` -> ``GrpcIndex``."""
    if is_remote(str(spec)):
        from .client import GrpcIndex, parse_addresses

        return GrpcIndex(parse_addresses(str(spec)), options)
    from .search import LocalIndex

    return LocalIndex(spec, options)
