"""ErrorInfo (proto/vllm_mlx/v1/errors.proto) on failed gRPC calls: the
servers (engine, media workers) fail a call with `abort`, which attaches it
under the trailing-metadata key ERROR_INFO_KEY; clients (the engine's media
client, the gateway) read it back with `error_info`. Codes and fields travel
as data, so no client ever reads them out of a message's text."""

from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from vllm_mlx.v1 import errors_pb2 as epb

ERROR_INFO_KEY = "vllm-mlx-error-bin"  # "-bin": gRPC carries the value as bytes

# The gRPC status each code comes with: the coarse class that clients not
# reading ErrorInfo (and gRPC's own retry logic) go by.
STATUS: dict[int, grpc.StatusCode] = {
    epb.ERROR_CODE_INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    epb.ERROR_CODE_CONTEXT_LENGTH_EXCEEDED: grpc.StatusCode.INVALID_ARGUMENT,
    epb.ERROR_CODE_KV_BUDGET_EXCEEDED: grpc.StatusCode.INVALID_ARGUMENT,
    epb.ERROR_CODE_UNSUPPORTED: grpc.StatusCode.INVALID_ARGUMENT,
    epb.ERROR_CODE_MEDIA_REFUSED: grpc.StatusCode.INVALID_ARGUMENT,
    epb.ERROR_CODE_OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    epb.ERROR_CODE_DUPLICATE_REQUEST_ID: grpc.StatusCode.ALREADY_EXISTS,
    epb.ERROR_CODE_LOADING: grpc.StatusCode.UNAVAILABLE,
    epb.ERROR_CODE_MEDIA_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    epb.ERROR_CODE_INTERNAL: grpc.StatusCode.INTERNAL,
}


def trailing_metadata(info: epb.ErrorInfo) -> tuple[tuple[str, bytes], ...]:
    return ((ERROR_INFO_KEY, info.SerializeToString()),)


async def abort(context: grpc.aio.ServicerContext, code: int, message: str, field: str = "",
                item: int | None = None) -> NoReturn:
    """End the call with `code`'s status, `message` for people, and the
    ErrorInfo for programs. Raises, as context.abort does."""
    info = epb.ErrorInfo(code=code, field=field, item=item)
    await context.abort(STATUS[code], message, trailing_metadata=trailing_metadata(info))
    raise AssertionError("context.abort returned")  # it raises; this keeps NoReturn honest


def error_info(error: grpc.RpcError) -> epb.ErrorInfo | None:
    """The ErrorInfo a server attached to a failed call; None when the call
    was failed by the gRPC layer (or by something that is not our server)."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if trailing else None) or ():
        if key == ERROR_INFO_KEY and isinstance(value, bytes):
            try:
                return epb.ErrorInfo.FromString(value)
            except DecodeError:
                return None
    return None
