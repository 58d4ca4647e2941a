"""What server and client agree on besides the .proto: the service name, the token's
metadata key, message limits, and array <-> bytes conversions of the messages.

Everything is little-endian and row-major so the format does not depend on the host.
"""

from __future__ import annotations

import numpy as np

SERVICE_NAME = "tttnn.knn.v1.KnnShard"  # as proto/knn.proto declares it
TOKEN_METADATA_KEY = "authorization"  # metadata that carries "Bearer <token>"
VECTOR_DTYPE = np.dtype("<f4")
ID_DTYPE = np.dtype("<i8")
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# Room left in a message for protobuf framing around the texts, vectors or ids themselves.
MESSAGE_OVERHEAD = 64 << 10


def search_answer_bytes(n: int, k: int) -> int:
    """Payload of a Search answer: n * k distances and ids."""
    return n * k * (VECTOR_DTYPE.itemsize + ID_DTYPE.itemsize)


def pack(array: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def unpack(data: bytes, dtype: np.dtype, columns: int) -> np.ndarray:
    """Rows of ``columns`` values; raises ValueError when the byte count does not fit."""
    if columns <= 0:
        raise ValueError(f"column count must be positive, got {columns}")
    row_bytes = dtype.itemsize * columns
    if len(data) % row_bytes:
        raise ValueError(f"{len(data)} bytes is not a whole number of {columns}-value {dtype.name} rows")
    return np.frombuffer(data, dtype=dtype).reshape(-1, columns)
