"""Service-wide endpoints (PROTOCOL.md 2.1, 3.1): client/config, client/dynamic_config,
auth/token, telemetry, healthz and get_server_capabilities."""

from __future__ import annotations

import hmac
from typing import Final

from tinkex_trio.types import (
    AuthTokenResponse,
    DynamicConfigResponse,
    HealthResponse,
    ServerCapabilities,
    SupportedModel,
    TelemetryResponse,
)

from ._backend import API, Backend
from ._http import Handler, HTTPError, Request, Response, json_response
from ._jwt import JwtIssuer

#: client/dynamic_config (PROTOCOL.md 2.1, 4.9): cancel_future is served.
DYNAMIC_CONFIG: Final = DynamicConfigResponse(
    refresh_interval_sec=300.0, sample_cancel_enabled=True, sample_cancel_max_batch_size=64
)


class ServiceRoutes:
    """Bootstrap, auth, telemetry, health and capabilities."""

    def __init__(self, backend: Backend, *, jwt: JwtIssuer | None = None) -> None:
        self.backend = backend
        self.jwt = jwt

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{API}/client/config", self.client_config),
            ("POST", f"{API}/client/dynamic_config", self.dynamic_config),
            ("POST", f"{API}/auth/token", self.auth_token),
            ("POST", f"{API}/telemetry", self.telemetry),
            ("GET", f"{API}/healthz", self.healthz),
            ("GET", f"{API}/get_server_capabilities", self.capabilities),
        ]

    async def client_config(self, request: Request) -> Response:
        return json_response(self.backend.client_config)

    async def dynamic_config(self, request: Request) -> Response:
        return json_response(DYNAMIC_CONFIG)

    async def auth_token(self, request: Request) -> Response:
        """`{"jwt": ...}` for the API key (PROTOCOL.md 1.3, 3.1); 404 without JWT mode.

        Only the API key itself is exchanged: a JWT presented here is refused (401), so a
        leaked short-lived token cannot renew itself forever without the key.
        """
        if self.jwt is None:
            raise HTTPError(
                404, "JWT exchange is off on this backend (start it with jwt_auth=True / --jwt)"
            )
        key = request.header("x-api-key") or ""
        if not hmac.compare_digest(key.encode(), self.backend.api_key.encode()):
            raise HTTPError(
                401,
                "auth/token exchanges the API key only, not a JWT; send the API key in X-API-Key",
            )
        return json_response(AuthTokenResponse(jwt=self.jwt.issue()))

    async def telemetry(self, request: Request) -> Response:
        # Accepted whatever it holds: a 0.15 client retries a rejected batch every second
        # forever (PROTOCOL.md A.6.3), and the local backend has no use for the events.
        return json_response(TelemetryResponse(status="accepted"))

    async def healthz(self, request: Request) -> Response:
        return json_response(HealthResponse(status="ok"))

    async def capabilities(self, request: Request) -> Response:
        return json_response(
            ServerCapabilities(
                supported_models=[
                    SupportedModel(
                        model_name=m.name,
                        max_context_length=m.max_context_length,
                        trainable=True,
                        sampleable=True,
                    )
                    for m in self.backend.models.values()
                ]
            )
        )
