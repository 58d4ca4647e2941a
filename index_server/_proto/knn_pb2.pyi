from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("k", "dim", "vectors", "index_identity", "nprobe", "ef_search", "refine_factor")
    K_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    INDEX_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    REFINE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    k: int
    dim: int
    vectors: bytes
    index_identity: str
    nprobe: int
    ef_search: int
    refine_factor: int
    def __init__(self, k: _Optional[int] = ..., dim: _Optional[int] = ..., vectors: _Optional[bytes] = ..., index_identity: _Optional[str] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., refine_factor: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("n", "k", "ids", "distances")
    N_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    n: int
    k: int
    ids: bytes
    distances: bytes
    def __init__(self, n: _Optional[int] = ..., k: _Optional[int] = ..., ids: _Optional[bytes] = ..., distances: _Optional[bytes] = ...) -> None: ...

class FetchTextsRequest(_message.Message):
    __slots__ = ("ids", "index_identity")
    IDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    index_identity: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., index_identity: _Optional[str] = ...) -> None: ...

class FetchTextsResponse(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchVectorsRequest(_message.Message):
    __slots__ = ("ids", "index_identity")
    IDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    index_identity: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., index_identity: _Optional[str] = ...) -> None: ...

class FetchVectorsResponse(_message.Message):
    __slots__ = ("dim", "vectors", "source")
    DIM_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    dim: int
    vectors: bytes
    source: str
    def __init__(self, dim: _Optional[int] = ..., vectors: _Optional[bytes] = ..., source: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardRange(_message.Message):
    __slots__ = ("index", "start", "end")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    index: int
    start: int
    end: int
    def __init__(self, index: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("index_identity", "manifest_json", "shards", "n_vectors", "dim", "max_k", "max_batch", "nprobe", "ef_search", "refine_factor", "max_message_bytes")
    INDEX_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    N_VECTORS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    REFINE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    index_identity: str
    manifest_json: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardRange]
    n_vectors: int
    dim: int
    max_k: int
    max_batch: int
    nprobe: int
    ef_search: int
    refine_factor: int
    max_message_bytes: int
    def __init__(self, index_identity: _Optional[str] = ..., manifest_json: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardRange, _Mapping]]] = ..., n_vectors: _Optional[int] = ..., dim: _Optional[int] = ..., max_k: _Optional[int] = ..., max_batch: _Optional[int] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., refine_factor: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
