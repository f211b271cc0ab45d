from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ErrorCode]
    ERROR_CODE_CONTEXT_LENGTH_EXCEEDED: _ClassVar[ErrorCode]
    ERROR_CODE_KV_BUDGET_EXCEEDED: _ClassVar[ErrorCode]
    ERROR_CODE_UNSUPPORTED: _ClassVar[ErrorCode]
    ERROR_CODE_MEDIA_REFUSED: _ClassVar[ErrorCode]
    ERROR_CODE_OVERLOADED: _ClassVar[ErrorCode]
    ERROR_CODE_DUPLICATE_REQUEST_ID: _ClassVar[ErrorCode]
    ERROR_CODE_LOADING: _ClassVar[ErrorCode]
    ERROR_CODE_MEDIA_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_ARGUMENT: ErrorCode
ERROR_CODE_CONTEXT_LENGTH_EXCEEDED: ErrorCode
ERROR_CODE_KV_BUDGET_EXCEEDED: ErrorCode
ERROR_CODE_UNSUPPORTED: ErrorCode
ERROR_CODE_MEDIA_REFUSED: ErrorCode
ERROR_CODE_OVERLOADED: ErrorCode
ERROR_CODE_DUPLICATE_REQUEST_ID: ErrorCode
ERROR_CODE_LOADING: ErrorCode
ERROR_CODE_MEDIA_UNAVAILABLE: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode

class ErrorInfo(_message.Message):
    __slots__ = ("code", "field", "item")
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    field: str
    item: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., field: _Optional[str] = ..., item: _Optional[int] = ...) -> None: ...
