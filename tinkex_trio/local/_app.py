"""The local backend's ASGI app: every endpoint of PROTOCOL.md sections 3-4 and Appendix A.

The endpoints live by domain in `_routes_session.py`, `_routes_training.py`,
`_routes_sampling.py`, `_routes_futures.py` and `_routes_rest.py`; their shared state and
helpers in `_backend.py`. This module wires them into one ASGI callable: routing,
authentication and the mapping of exceptions to error responses.

Authentication: every `/api/v1/...` request but `healthz` carries `X-API-Key`: the backend's
key or, with `jwt_auth=True`, also a JWT from `auth/token` (`_jwt.py`, PROTOCOL.md 1.3). An
expired or foreign JWT is answered 401 with `WWW-Authenticate: Bearer error="invalid_token"`.

`open_backend_app(...)` is an async context manager that owns the backend's background tasks
(training lanes, the sampling batcher, archive builds, the checkpoint reaper) in one nursery and
yields the ASGI callable. Hypercorn serves it (`server.py`); tests drive it in-process with
`httpx.ASGITransport`.

Request bodies are decoded with `tinkex_trio.types.decode_request`, which accepts both JSON
conventions of Appendix A.0 (`type` present or not, null or omitted). Bad input of any kind is
answered with a 4xx JSON body `{"detail": ..., "category": "user"}` that names the problem, or
(for problems only the engine can see) a failed future with category `user`; an unexpected
exception in a handler becomes a 500 with a JSON body and a logged traceback, never a crash.

Data directory layout:

    state.sqlite3           the store (_store.py)
    api_key, secret         generated on first start (mode 0600)
    checkpoints/<run>/<segment>/<name>/   checkpoint files (PEFT layout)
    ephemeral/<sampler>/    weights behind unnamed save_weights_for_sampler sessions
    archives/               cached checkpoint tar.gz files
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio

from ._backend import (
    API,
    DEFAULT_CLIENT_FLAGS,
    DEFAULT_MAX_QUEUED_SAMPLES,
    DEFAULT_METADATA_ONLY_THRESHOLD,
    AppSettings,
    Backend,
)
from ._engine_api import Engine, EngineUserError, ModelInfo
from ._futures import DEFAULT_POLL_TIMEOUT
from ._http import (
    HTTPError,
    Receive,
    Request,
    Response,
    Router,
    Scope,
    Send,
    StreamResponse,
    error_response,
    handle_lifespan,
    read_request,
    send_response,
)
from ._jwt import DEFAULT_JWT_LIFETIME, JwtIssuer
from ._routes_futures import FutureRoutes
from ._routes_rest import RestRoutes
from ._routes_sampling import SamplingRoutes
from ._routes_session import SessionRoutes
from ._routes_training import TrainingRoutes
from ._scheduler import EngineRunner
from ._store import Store

logger = logging.getLogger("tinkex_trio.local.app")

API_KEY_PREFIX = "tml-"


def _read_or_create(path: Path, make: Callable[[], str]) -> str:
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def load_or_create_api_key(data_dir: Path) -> str:
    """The server's API key: `<data_dir>/api_key`, generated (`tml-` + random) on first use."""
    return _read_or_create(data_dir / "api_key", lambda: API_KEY_PREFIX + secrets.token_urlsafe(32))


def load_or_create_secret(data_dir: Path) -> bytes:
    """The HMAC key for archive URLs, kept across restarts so issued URLs stay valid."""
    return bytes.fromhex(_read_or_create(data_dir / "secret", lambda: secrets.token_hex(32)))


class BackendApp(Backend):
    """The ASGI callable over the backend state. Build it with `open_backend_app`."""

    def __init__(
        self,
        settings: AppSettings,
        store: Store,
        runner: EngineRunner,
        models: list[ModelInfo],
        nursery: trio.Nursery,
        *,
        jwt: JwtIssuer | None = None,
    ) -> None:
        super().__init__(settings, store, runner, models, nursery)
        self._api_key = settings.api_key.encode()
        self.jwt = jwt
        """Issues and checks JWTs when the backend runs in JWT-exchange mode (else None)."""
        self.router = Router()
        for group in (
            SessionRoutes(self, jwt=jwt),
            TrainingRoutes(self),
            SamplingRoutes(self),
            FutureRoutes(self),
            RestRoutes(self),
        ):
            for method, pattern, handler in group.routes():
                self.router.add(method, pattern, handler)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await handle_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            request = await read_request(scope, receive)
            response = await self._dispatch(request)
        except HTTPError as exc:
            response = error_response(exc)
        await send_response(send, response)

    async def _dispatch(self, request: Request) -> Response | StreamResponse:
        try:
            handler, params = self.router.resolve(request.method, request.path)
            request.params = params
            if request.path.startswith(API + "/") and request.path != API + "/healthz":
                self._authenticate(request)
            return await handler(request)
        except HTTPError as exc:
            return error_response(exc)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return error_response(HTTPError(400, f"invalid request body: {exc}"))
        except EngineUserError as exc:
            return error_response(HTTPError(400, str(exc)))
        except Exception as exc:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(
                HTTPError(500, f"internal error: {type(exc).__name__}: {exc}", category="server")
            )

    def _authenticate(self, request: Request) -> None:
        key = request.header("x-api-key")
        if key is None:
            raise HTTPError(401, "missing X-API-Key header")
        if hmac.compare_digest(key.encode(), self._api_key):
            return
        if self.jwt is not None and key.startswith("eyJ"):
            if self.jwt.verify(key) is None:
                # PROTOCOL.md 1.3: this header makes the client exchange again and replay.
                raise HTTPError(
                    401,
                    "expired or invalid token; exchange the API key at /api/v1/auth/token",
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            return
        raise HTTPError(401, "invalid API key for this local backend")


@asynccontextmanager
async def open_backend_app(
    *,
    data_dir: Path,
    engine: Engine,
    api_key: str | None = None,
    poll_timeout: float = DEFAULT_POLL_TIMEOUT,
    engine_in_thread: bool = True,
    client_flags: dict[str, Any] | None = None,
    max_queued_samples: int | None = DEFAULT_MAX_QUEUED_SAMPLES,
    metadata_only_threshold: int | None = DEFAULT_METADATA_ONLY_THRESHOLD,
    jwt_auth: bool = False,
    jwt_lifetime: float = DEFAULT_JWT_LIFETIME,
) -> AsyncIterator[BackendApp]:
    """Open the store, start the background tasks, yield the ASGI app; stop them on exit.

    `engine_in_thread=False` runs engine calls inline on the trio thread (virtual-time tests
    with a fake engine); the default runs them in one worker thread. `client_flags` are
    merged over `DEFAULT_CLIENT_FLAGS` for `client/config` (e.g. `proto_compress_fwdbwd`,
    `fwdbwd_max_chunk_len`). `max_queued_samples` is the sampling back-pressure limit
    (`DEFAULT_MAX_QUEUED_SAMPLES`; None: unlimited). Results larger than
    `metadata_only_threshold` bytes are announced metadata-only first (PROTOCOL.md 4.4;
    `DEFAULT_METADATA_ONLY_THRESHOLD`; None: never). `jwt_auth=True` turns on JWT-exchange
    auth (PROTOCOL.md 1.3): `client/config` says `pjwt_auth_enabled: true` and `auth/token`
    issues JWTs valid for `jwt_lifetime` seconds; the raw key stays valid too.

    Raises:
        ValueError: `max_queued_samples` is below 1, or `jwt_lifetime` is not positive.
    """
    if max_queued_samples is not None and max_queued_samples < 1:
        raise ValueError(f"max_queued_samples must be >= 1 or None, got {max_queued_samples!r}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = AppSettings(
        data_dir=data_dir,
        api_key=api_key if api_key is not None else load_or_create_api_key(data_dir),
        secret=load_or_create_secret(data_dir),
        poll_timeout=poll_timeout,
        engine_in_thread=engine_in_thread,
        client_flags={
            **DEFAULT_CLIENT_FLAGS,
            **({"pjwt_auth_enabled": True} if jwt_auth else {}),
            **(client_flags or {}),
        },
        max_queued_samples=max_queued_samples,
        metadata_only_threshold=metadata_only_threshold,
    )
    jwt = JwtIssuer(settings.secret, lifetime=jwt_lifetime) if jwt_auth else None
    store = Store.open(data_dir / "state.sqlite3")
    try:
        runner = EngineRunner(engine, in_thread=engine_in_thread)
        models = await runner.call(engine.models)
        async with trio.open_nursery() as nursery:
            app = BackendApp(settings, store, runner, models, nursery, jwt=jwt)
            await nursery.start(app.lanes.run)
            await nursery.start(app.batcher.run)
            nursery.start_soon(app.reap_forever)
            try:
                yield app
            finally:
                nursery.cancel_scope.cancel(reason="local backend closing")
    finally:
        store.close()


__all__ = [
    "DEFAULT_MAX_QUEUED_SAMPLES",
    "DEFAULT_METADATA_ONLY_THRESHOLD",
    "AppSettings",
    "BackendApp",
    "load_or_create_api_key",
    "load_or_create_secret",
    "open_backend_app",
]
