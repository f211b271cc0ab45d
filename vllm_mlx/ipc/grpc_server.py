"""What every gRPC worker (engine, media) serves besides its own service: the
standard health service and reflection, NOT_SERVING until the worker is
ready, and a graceful stop."""

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


class Listening:
    """A started server: the port it got, and its health to report."""

    def __init__(self, server: grpc.aio.Server, service_name: str, port: int,
                 health_servicer: health.aio.HealthServicer):
        self.server = server
        self.service_name = service_name
        self.port = port
        self._health = health_servicer

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", self.service_name):
            await self._health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace=grace)


async def listen(server: grpc.aio.Server, service_name: str, host: str,
                 port: int) -> Listening:
    """Add health and reflection to `server` (its own servicer already added),
    listen on host:port and start, reporting NOT_SERVING."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    listening = Listening(server, service_name, bound, health_servicer)
    await listening.set_serving(False)
    return listening
