"""The local backend's ASGI app: every endpoint of PROTOCOL.md sections 3-4 and Appendix A.

The endpoints live by resource in `_routes_service.py` (bootstrap, auth, telemetry),
`_routes_sessions.py`, `_routes_models.py` (training runs), `_routes_checkpoints.py`,
`_routes_sampling.py`, `_routes_futures.py` and `_routes_custom_loss.py`; their shared state in `_backend.py`. This
module wires them into one ASGI callable: routing, authentication and the mapping of
exceptions to error responses.

Authentication: every `/api/v1/...` request but `healthz` carries `X-API-Key`: the backend's
key or, with `jwt_auth`, also a JWT from `auth/token` (`_jwt.py`, PROTOCOL.md 1.3). An
expired or foreign JWT is answered 401 with `WWW-Authenticate: Bearer error="invalid_token"`.

`open_backend_app(settings, engine)` is an async context manager that owns the backend's
background tasks (training lanes, the sampling batcher, archive builds, the checkpoint reaper)
in one nursery and yields the ASGI callable. Hypercorn serves it (`server.py`); tests drive it
in-process with `httpx.ASGITransport`.

Request bodies are decoded with `tinkex_trio.types.decode_request`, which accepts both JSON
conventions of Appendix A.0 (`type` present or not, null or omitted); every answer is encoded
from the same `tinkex_trio.types` Structs the SDK decodes (`_http.json_response` takes nothing
else). Bad input of any kind is answered with a 4xx JSON body `{"detail": ..., "category":
"user"}` that names the problem, or (for problems only the engine can see) a failed future with
category `user`; an unexpected exception in a handler becomes a 500 with a JSON body and a
logged traceback, never a crash.

Data directory layout:

    state.sqlite3           the store (_store.py)
    api_key, secret         generated on first start (mode 0600)
    checkpoints/, ephemeral/, staging/, archives/   checkpoint files (_checkpoints.py)
    traces/                 session trace exports (_trace_exports.py)
"""

from __future__ import annotations

import hmac
import logging
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import trio

from ._backend import API, Backend
from ._durable import (
    Leftover,
    check_data_dir,
    leftover_size,
    remove_leftovers,
    write_file_atomically,
)
from ._engine_api import Engine, EngineUserError
from ._http import (
    BodyBudget,
    Handler,
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
    read_body,
    request_head,
    send_response,
)
from ._jwt import JwtIssuer
from ._residency import OFFLOAD_DIR, Residency
from ._routes_admin import AdminRoutes
from ._routes_checkpoints import CheckpointRoutes
from ._routes_custom_loss import CustomLossRoutes
from ._routes_futures import FutureRoutes
from ._routes_models import ModelRoutes
from ._routes_sampling import SamplingRoutes
from ._routes_service import ServiceRoutes
from ._routes_sessions import SessionRoutes
from ._scheduler import EngineRunner
from ._settings import LocalBackendSettings
from ._store import Store

logger = logging.getLogger("tinkex_trio.local.app")

API_KEY_PREFIX = "tml-"


def _read_or_create(path: Path, make: Callable[[], str]) -> str:
    if path.is_file():
        return path.read_text().strip()
    value = make()
    write_file_atomically(path, (value + "\n").encode(), mode=0o600)
    return value


def load_or_create_api_key(data_dir: Path) -> str:
    """The server's API key: `<data_dir>/api_key`, generated (`tml-` + random) on first use."""
    return _read_or_create(data_dir / "api_key", lambda: API_KEY_PREFIX + secrets.token_urlsafe(32))


def load_or_create_secret(data_dir: Path) -> bytes:
    """The HMAC key for archive URLs, kept across restarts so issued URLs stay valid."""
    return bytes.fromhex(_read_or_create(data_dir / "secret", lambda: secrets.token_hex(32)))


class BackendApp:
    """The ASGI callable over a `Backend`. Build it with `open_backend_app`."""

    def __init__(self, backend: Backend, *, jwt: JwtIssuer | None = None) -> None:
        self.backend = backend
        self.jwt = jwt
        """Issues and checks JWTs when the backend runs in JWT-exchange mode (else None)."""
        self._api_key = backend.api_key.encode()
        self.body_budget = BodyBudget(backend.settings.max_body_bytes_in_flight)
        self.router = Router()
        for group in (
            ServiceRoutes(backend, jwt=jwt),
            SessionRoutes(backend),
            ModelRoutes(backend),
            CheckpointRoutes(backend),
            SamplingRoutes(backend),
            FutureRoutes(backend),
            AdminRoutes(backend),
            CustomLossRoutes(backend),
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
        settings = self.backend.settings
        reserved = 0
        try:
            # Route and authenticate from the head alone: a request that will be refused is
            # refused before a byte of its body is read (hypercorn stops reading the socket
            # while the app does not take the body, so an unread body costs no memory).
            request = request_head(scope)
            handler, request.params = self.router.resolve(request.method, request.path)
            if request.path.startswith(API + "/") and request.path != API + "/healthz":
                self._authenticate(request)
            reserved = await read_body(
                request,
                receive,
                max_size=settings.max_request_body,
                budget=self.body_budget,
                read_timeout=settings.read_timeout,
            )
            response = await self._dispatch(handler, request)
        except HTTPError as exc:
            response = error_response(exc)
        finally:
            self.body_budget.release(reserved)
        await send_response(send, response)

    async def _dispatch(self, handler: Handler, request: Request) -> Response | StreamResponse:
        try:
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


def _remove_leftovers(data_dir: Path) -> None:
    """Delete what writes interrupted by a crash left behind (`_durable.py`), and adapters
    offloaded by an earlier run (`_residency.py`: their runs are corrupted now), and say so."""
    removed = remove_leftovers(data_dir)
    offload_dir = data_dir / OFFLOAD_DIR
    if offload_dir.is_dir():
        for entry in sorted(offload_dir.iterdir()):
            removed.append(Leftover(entry, leftover_size(entry)))
        shutil.rmtree(offload_dir)
    for leftover in removed:
        logger.warning(
            "removed %s (%d bytes): an interrupted write from an earlier run",
            leftover.path,
            leftover.size,
        )
    if removed:
        logger.warning(
            "start-up removed %d leftover(s) of interrupted writes, %d bytes in all",
            len(removed),
            sum(leftover.size for leftover in removed),
        )


@asynccontextmanager
async def open_backend_app(
    settings: LocalBackendSettings, engine: Engine, *, engine_in_thread: bool = True
) -> AsyncIterator[BackendApp]:
    """Open the store, start the background tasks, yield the ASGI app; stop them on exit.

    `settings` says everything but the engine (`LocalBackendSettings`; `host` and `port` are
    the server's business, not the app's). An unusable data directory raises
    `DataDirectoryError` (or `StoreOpenError` for its database) before anything starts.
    `engine_in_thread=False` runs engine calls inline on
    the trio thread (virtual-time tests with a fake engine); the default runs them in one
    worker thread.
    """
    data_dir = settings.data_dir
    check_data_dir(data_dir)
    _remove_leftovers(data_dir)
    api_key = settings.api_key if settings.api_key is not None else load_or_create_api_key(data_dir)
    secret = load_or_create_secret(data_dir)
    jwt = JwtIssuer(secret, lifetime=settings.jwt_lifetime) if settings.jwt_auth else None
    store = Store.open(data_dir / "state.sqlite3")
    try:
        offload_dir = data_dir / OFFLOAD_DIR
        runner = EngineRunner(
            engine,
            in_thread=engine_in_thread,
            residency=Residency(offload_dir, settings.max_resident_adapters),
        )
        models = await runner.models()
        async with trio.open_nursery() as nursery:
            backend = Backend(settings, api_key, secret, store, runner, models, nursery)
            await nursery.start(backend.lanes.run)
            await nursery.start(backend.batcher.run)
            await nursery.start(backend.expiry.run)
            nursery.start_soon(backend.checkpoints.reap_forever)
            try:
                yield BackendApp(backend, jwt=jwt)
            finally:
                nursery.cancel_scope.cancel(reason="local backend closing")
    finally:
        store.close()


__all__ = [
    "BackendApp",
    "load_or_create_api_key",
    "load_or_create_secret",
    "open_backend_app",
]
