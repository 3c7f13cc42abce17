"""Bootstrap, session and telemetry endpoints (PROTOCOL.md 3.1, 2.1)."""

from __future__ import annotations

import uuid
from typing import Any, Final

import msgspec

from tinkex_trio.types import (
    CreateSessionRequest,
    CreateSessionResponse,
    ServerCapabilities,
    SessionHeartbeatRequest,
    SupportedModel,
    decode_request,
)

from ._backend import (
    API,
    Backend,
    now,
    or_none,
)
from ._http import (
    Handler,
    HTTPError,
    Request,
    Response,
    json_response,
)
from ._jwt import JwtIssuer

#: client/dynamic_config (PROTOCOL.md 2.1, 4.9): cancel_future is served.
DYNAMIC_CLIENT_FLAGS: Final[dict[str, Any]] = {
    "refresh_interval_sec": 300,
    "sample_cancel_enabled": True,
    "sample_cancel_max_batch_size": 64,
}


class SessionRoutes:
    """`client/config`, sessions, heartbeats, telemetry, health and capabilities."""

    def __init__(self, backend: Backend, *, jwt: JwtIssuer | None = None) -> None:
        self.backend = backend
        self.jwt = jwt

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{API}/client/config", self.client_config),
            ("POST", f"{API}/client/dynamic_config", self.dynamic_config),
            ("POST", f"{API}/auth/token", self.auth_token),
            ("POST", f"{API}/create_session", self.create_session),
            ("POST", f"{API}/session_heartbeat", self.session_heartbeat),
            ("POST", f"{API}/sessions/(?P<session_id>[^/]+)/finish", self.finish_session),
            ("POST", f"{API}/telemetry", self.telemetry),
            ("GET", f"{API}/healthz", self.healthz),
            ("GET", f"{API}/get_server_capabilities", self.capabilities),
        ]

    async def client_config(self, request: Request) -> Response:
        return json_response(self.backend.settings.client_flags)

    async def auth_token(self, request: Request) -> Response:
        """`{"jwt": ...}` for an authenticated caller (PROTOCOL.md 1.3, 3.1); 404 without JWT mode."""
        if self.jwt is None:
            raise HTTPError(
                404, "JWT exchange is off on this backend (start it with jwt_auth=True / --jwt)"
            )
        return json_response({"jwt": self.jwt.issue()})

    async def dynamic_config(self, request: Request) -> Response:
        return json_response(DYNAMIC_CLIENT_FLAGS)

    async def create_session(self, request: Request) -> Response:
        body = decode_request(request.body, CreateSessionRequest)
        session_id = str(uuid.uuid4())
        self.backend.store.insert_session(
            session_id,
            created_at=now(),
            tags=list(body.tags),
            user_metadata=body.user_metadata,
            project_id=or_none(body.project_id),
            display_name=or_none(body.display_name),
            sdk_version=body.sdk_version,
        )
        return json_response(CreateSessionResponse(session_id=session_id))

    async def session_heartbeat(self, request: Request) -> Response:
        body = decode_request(request.body, SessionHeartbeatRequest)
        session = self.backend.store.get_session(body.session_id)
        if session is None:
            raise HTTPError(404, f"unknown session_id {body.session_id!r}")
        if session.finished_reason is not None:
            raise HTTPError(410, f"session {body.session_id!r} is finished")
        self.backend.store.heartbeat(body.session_id, now())
        return json_response({"type": "session_heartbeat"})

    async def finish_session(self, request: Request) -> Response:
        session_id = request.params["session_id"]
        self.backend.require_session(session_id)
        reason = "success"
        if request.body.strip():
            raw = msgspec.json.decode(request.body)
            if isinstance(raw, dict) and isinstance(raw.get("reason"), dict):
                reason = str(raw["reason"].get("type", "success"))
        self.backend.store.finish_session(session_id, reason)
        return json_response({})

    async def telemetry(self, request: Request) -> Response:
        # Accepted whatever it holds: a 0.15 client retries a rejected batch every second
        # forever (PROTOCOL.md A.6.3), and the local backend has no use for the events.
        return json_response({"status": "accepted"})

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

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
