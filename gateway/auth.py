"""The optional API key. A middleware rather than a route dependency, so it
runs before the body is parsed and guards every route (404s, /metrics and
/openapi.json included) except the health probe."""

import hmac

from gateway.errors import Unauthorized, error_response

OPEN_PATHS = frozenset({"/health"})


def _supplied_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
        elif name == b"x-api-key":
            return value.strip()
    return None


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        supplied = _supplied_key(scope["headers"])
        # compare_digest takes as long for a near miss as for a wild guess.
        if supplied is None or not hmac.compare_digest(supplied, self.key):
            error = Unauthorized(
                "Incorrect API key provided" if supplied is not None else
                "You didn't provide an API key: send it as 'Authorization: Bearer KEY' "
                "or 'x-api-key: KEY'")
            return await error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)
