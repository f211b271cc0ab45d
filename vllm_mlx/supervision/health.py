"""Asking a server's standard health check: whether it answers at all, and
waiting for it to say SERVING."""

import time
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def answers(target: str, timeout: float) -> bool:
    """Whether a server answers its health check at all within `timeout`
    (serving or not: one that is loading answers too). `target`: a gRPC
    address, or an http:// URL, where any HTTP status is an answer."""
    if target.startswith("http"):
        try:
            with urllib.request.urlopen(target, timeout=timeout):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
    with grpc.insecure_channel(target) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=timeout)
            return True
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.UNAVAILABLE)


def wait_for_serving(address: str, timeout: float, service: str = "",
                     is_alive=lambda: True) -> None:
    """Block until `address` reports SERVING; raise TimeoutError after `timeout`
    seconds, or RuntimeError as soon as `is_alive()` turns false."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not is_alive():
                raise RuntimeError(f"the server at {address} exited while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} did not report SERVING within {timeout:.0f}s")
