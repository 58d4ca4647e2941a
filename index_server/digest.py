"""File checksums of an index: a full sha256 and a quick sampled fingerprint, in one pass.

The quick fingerprint (size plus the first, middle and last MiB) is checked every time an
index is opened or served: it catches a truncated, swapped, rotated or copied-over file
in milliseconds whatever its size. ``--full`` re-hashes everything against the sha256.
At build time both come from a single read of each file (``file_digests``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE = 1 << 20  # bytes hashed at the head, middle and tail of a file
_BLOCK = 1 << 22


class HashingWriter:
    """Writes to an open binary file while hashing what passes through (sha256, byte count),
    so a file just written is never read back to be checksummed. Callable as well, for
    ``faiss.PyCallbackIOWriter``."""

    def __init__(self, file):
        self.file, self.sha, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.file.write(data)
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    __call__ = write


def _regions(size: int) -> list[tuple[int, int]]:
    """Sampled byte ranges [start, end): head, middle, tail (merged when they overlap)."""
    if size <= 3 * SAMPLE:
        return [(0, size)]
    middle = size // 2 - SAMPLE // 2
    return [(0, SAMPLE), (middle, middle + SAMPLE), (size - SAMPLE, size)]


def file_fingerprint(path: Path) -> str:
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for start, end in _regions(size):
            f.seek(start)
            digest.update(f.read(end - start))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return file_digests(path)[1]


def file_digests(path: Path) -> tuple[int, str, str]:
    """(size, sha256, fingerprint) from one sequential read of the file."""
    size = Path(path).stat().st_size
    regions = _regions(size)
    full, quick = hashlib.sha256(), hashlib.sha256(str(size).encode())
    pending = [bytearray() for _ in regions]
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            full.update(block)
            end = offset + len(block)
            for (a, b), buf in zip(regions, pending):
                lo, hi = max(a, offset), min(b, end)
                if lo < hi:
                    buf += block[lo - offset : hi - offset]
            offset = end
    for buf in pending:
        quick.update(buf)
    return size, full.hexdigest(), quick.hexdigest()


def chunked_sha256(path: Path, chunk_ends: tuple[int, ...]) -> str:
    """sha256 of the hex sha256s of consecutive chunks ending at ``chunk_ends`` (how the
    embedding parts hash a corpus file while reading it once)."""
    outer, start = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for end in chunk_ends:
            inner = hashlib.sha256()
            while start < end:
                block = f.read(min(_BLOCK, end - start))
                if not block:
                    break
                inner.update(block)
                start += len(block)
            outer.update(inner.hexdigest().encode())
    return outer.hexdigest()
