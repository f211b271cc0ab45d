"""Waiting for a gRPC server's standard health check to say SERVING."""

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


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
