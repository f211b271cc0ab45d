from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_KIND_UNSPECIFIED: _ClassVar[MediaKind]
    MEDIA_KIND_IMAGE: _ClassVar[MediaKind]
    MEDIA_KIND_VIDEO: _ClassVar[MediaKind]
MEDIA_KIND_UNSPECIFIED: MediaKind
MEDIA_KIND_IMAGE: MediaKind
MEDIA_KIND_VIDEO: MediaKind

class MediaSource(_message.Message):
    __slots__ = ("kind", "url", "path", "fps", "max_frames")
    KIND_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    kind: MediaKind
    url: str
    path: str
    fps: float
    max_frames: int
    def __init__(self, kind: _Optional[_Union[MediaKind, str]] = ..., url: _Optional[str] = ..., path: _Optional[str] = ..., fps: _Optional[float] = ..., max_frames: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("request_id", "items", "shared_memory", "owner_pid")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    OWNER_PID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[MediaSource]
    shared_memory: bool
    owner_pid: int
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[MediaSource, _Mapping]]] = ..., shared_memory: _Optional[bool] = ..., owner_pid: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class PreparedMedia(_message.Message):
    __slots__ = ("kind", "content_hash", "tensors", "placeholder_token_id", "num_placeholder_tokens", "frames", "width", "height", "prepare_seconds", "shm_name", "token_ids")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PLACEHOLDER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PREPARE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    kind: MediaKind
    content_hash: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    placeholder_token_id: int
    num_placeholder_tokens: int
    frames: int
    width: int
    height: int
    prepare_seconds: float
    shm_name: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[MediaKind, str]] = ..., content_hash: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., placeholder_token_id: _Optional[int] = ..., num_placeholder_tokens: _Optional[int] = ..., frames: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., prepare_seconds: _Optional[float] = ..., shm_name: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PreparedMedia]
    def __init__(self, items: _Optional[_Iterable[_Union[PreparedMedia, _Mapping]]] = ...) -> None: ...
