"""The local backend's ASGI app: every endpoint of PROTOCOL.md sections 3-4 and Appendix A.

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

import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import msgspec
import trio

from tinkex_trio import _protobuf
from tinkex_trio.types import (
    UNSET,
    Checkpoint,
    CheckpointsListResponse,
    CreateModelRequest,
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    Cursor,
    ForwardBackwardInput,
    ForwardBackwardRequest,
    ForwardRequest,
    GetInfoRequest,
    GetInfoResponse,
    GetSamplerResponse,
    GetSessionResponse,
    ListSessionsResponse,
    LoadWeightsRequest,
    ModelData,
    OptimStepRequest,
    ParsedTinkerPath,
    RetrieveFutureRequest,
    SampleRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    ServerCapabilities,
    SessionHeartbeatRequest,
    SetCheckpointTtlRequest,
    SupportedModel,
    TrainingRun,
    TrainingRunsResponse,
    UnloadModelRequest,
    UntypedAPIFuture,
    WeightsInfoRequest,
    WeightsInfoResponse,
    decode_request,
)

from . import _convert
from ._archive import (
    ARCHIVE_ROUTE_PREFIX,
    ARCHIVE_URL_TTL,
    STREAM_CHUNK,
    ArchiveBuilder,
    archive_token,
    sign,
    verify,
)
from ._engine_api import Engine, EngineUserError, ModelInfo, SampleResult
from ._futures import DEFAULT_POLL_TIMEOUT, FutureRegistry, render_result
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
    json_response,
    read_request,
    send_response,
)
from ._scheduler import EngineRunner, JobFn, SampleBatcher, TrainingLanes
from ._store import CheckpointRow, ModelRow, SamplingSessionRow, Store

logger = logging.getLogger("tinkex_trio.local.app")

T = TypeVar("T")

API = "/api/v1"
_RUN = r"(?P<run_id>[^/]+)"
_CKPT = r"(?P<checkpoint_id>(?:weights|sampler_weights)/[^/]+)"
#: Checkpoint names become one path segment of a `tinker://` path (PROTOCOL.md 5.4): no `/`.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-]{0,199}")
#: Default and largest page sizes of the REST listings (PROTOCOL.md 3.5).
DEFAULT_RUNS_LIMIT = 20
DEFAULT_CHECKPOINTS_LIMIT = 100
MAX_PAGE_LIMIT = 1000
#: How often expired checkpoints (ttl_seconds) are deleted.
REAP_INTERVAL = 60.0
#: The owner reported for every run: the local backend has one user.
LOCAL_OWNER = "tml:user:local"
API_KEY_PREFIX = "tml-"
#: client/config flags (PROTOCOL.md 2.1) unless `client_flags=` overrides them: plain API-key
#: auth, httpx transport for the official SDK, session-wide completion polling (4.8) offered.
DEFAULT_CLIENT_FLAGS: Final[dict[str, Any]] = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "sample_use_retrieve_futures": True,
}
#: client/dynamic_config (PROTOCOL.md 2.1, 4.9): cancel_future is served.
DYNAMIC_CLIENT_FLAGS: Final[dict[str, Any]] = {
    "refresh_interval_sec": 300,
    "sample_cancel_enabled": True,
    "sample_cancel_max_batch_size": 64,
}
#: PROTOCOL.md 4.8: retrieve_futures long-polls like retrieve_future unless `timeout` says less.
MAX_RETRIEVE_FUTURES_TIMEOUT: Final = 30.0
#: PROTOCOL.md 9.5, 10.8: `asample` answers 429 once this many sampling requests wait for the
#: engine. 256 is 16 full engine batches (`SAMPLE_BATCH_MAX`), minutes of CPU decoding: more
#: queued work only adds latency and held memory, while a burst from one SDK (up to 400
#: concurrent submits, 9.5) is pushed back instead of starving other clients. It stays well
#: above the 10 submissions the SDK allows itself while backing off, so a backed-off client
#: refills the queue without another 429 storm.
DEFAULT_MAX_QUEUED_SAMPLES: Final = 256
#: PROTOCOL.md 4.4: a finished result larger than this is first answered metadata-only to a
#: poll that allows it. The SDK reserves the announced bytes from its 50 MiB in-flight response
#: budget (2.1) before fetching, so a dozen 4 MiB payloads still fit at once; below that an
#: extra round trip costs more than the memory it protects.
DEFAULT_METADATA_ONLY_THRESHOLD: Final = 4 * 1024 * 1024
#: The `retry-after-ms` of that 429: the SDK's own back-off window (PROTOCOL.md 9.5, 1 s);
#: clients that honour the header (layer A, 9.3) wait as long as the SDK does.
SAMPLE_RETRY_AFTER_MS: Final = 1000


class _FuturesTarget(msgspec.Struct, kw_only=True):
    sampling_session_id: str
    cloned_sampler_id: int = 0
    type: Literal["sampling_session"] = "sampling_session"


class _RetrieveFuturesRequest(msgspec.Struct, kw_only=True):
    """Body of `POST /api/v1/retrieve_futures` (PROTOCOL.md 4.8)."""

    target: _FuturesTarget
    prev_cursor: int = 0
    retrieved_request_ids: list[str] = []
    timeout: float | None = None


class _Completion(msgspec.Struct, kw_only=True, omit_defaults=True):
    state: str
    request_id: str
    response_payload_uncompressed_size: int | None = None


class _RetrieveFuturesResponse(msgspec.Struct, kw_only=True):
    completions: list[_Completion]
    cursor: int


class _CompleteMetadata(msgspec.Struct, kw_only=True):
    """A finished future whose payload is withheld until the next poll (PROTOCOL.md 4.4)."""

    status: Literal["complete_metadata"] = "complete_metadata"
    response_payload_size: int


class _CancelFutureRequest(msgspec.Struct, kw_only=True):
    request_id: str


def _now() -> float:
    return time.time()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _hash(obj: object) -> str:
    return hashlib.sha256(msgspec.json.encode(obj)).hexdigest()


def _json(obj: object) -> bytes:
    return msgspec.json.encode(obj)


def _set(value: T | Any) -> T | None:
    """UNSET → None, for optional request fields."""
    return None if value is UNSET else value


def _run_dir_name(run_id: str) -> str:
    return run_id.replace(":", "_")


def _check_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise HTTPError(
            400,
            f"{what} {name!r} is not a valid checkpoint name: use letters, digits, '.', '_' and "
            "'-' (no '/'), at most 200 characters",
        )
    return name


def _int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, f"query parameter {name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise HTTPError(400, f"query parameter {name}={value} must be in {lo}..{hi}")
    return value


@dataclass(frozen=True)
class AppSettings:
    data_dir: Path
    api_key: str
    secret: bytes
    poll_timeout: float = DEFAULT_POLL_TIMEOUT
    engine_in_thread: bool = True
    client_flags: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CLIENT_FLAGS))
    #: None: no limit (every asample is queued).
    max_queued_samples: int | None = DEFAULT_MAX_QUEUED_SAMPLES
    #: None: results are always inlined.
    metadata_only_threshold: int | None = DEFAULT_METADATA_ONLY_THRESHOLD


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


class BackendApp:
    """The ASGI callable plus the backend state. Build it with `open_backend_app`."""

    def __init__(
        self,
        settings: AppSettings,
        store: Store,
        runner: EngineRunner,
        models: list[ModelInfo],
        nursery: trio.Nursery,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.models = {m.name: m for m in models}
        self._nursery = nursery
        self.registry = FutureRegistry(store)
        self.lanes = TrainingLanes(self.registry, self._persist_seq)
        self.batcher = SampleBatcher(runner, self.registry)
        self.archives = ArchiveBuilder(settings.data_dir / "archives")
        self._api_key = settings.api_key.encode()
        self.router = Router()
        self._add_routes()

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
        if not hmac.compare_digest(key.encode(), self._api_key):
            raise HTTPError(401, "invalid API key for this local backend")

    def _add_routes(self) -> None:
        add = self.router.add
        # Bootstrap, session, telemetry (PROTOCOL.md 3.1)
        add("POST", f"{API}/client/config", self.client_config)
        add("POST", f"{API}/client/dynamic_config", self.dynamic_config)
        add("POST", f"{API}/create_session", self.create_session)
        add("POST", f"{API}/session_heartbeat", self.session_heartbeat)
        add("POST", f"{API}/sessions/(?P<session_id>[^/]+)/finish", self.finish_session)
        add("POST", f"{API}/telemetry", self.telemetry)
        add("GET", f"{API}/healthz", self.healthz)
        add("GET", f"{API}/get_server_capabilities", self.capabilities)
        # Training (3.2, A.1)
        add("POST", f"{API}/create_model", self.create_model)
        add("POST", f"{API}/get_info", self.get_info)
        add("POST", f"{API}/forward", self.forward)
        add("POST", f"{API}/forward_backward", self.forward_backward)
        add("POST", f"{API}/optim_step", self.optim_step)
        add("POST", f"{API}/save_weights", self.save_weights)
        add("POST", f"{API}/save_weights_for_sampler", self.save_weights_for_sampler)
        add("POST", f"{API}/load_weights", self.load_weights)
        add("POST", f"{API}/unload_model", self.unload_model)
        # Sampling (3.3, A.2)
        add("POST", f"{API}/create_sampling_session", self.create_sampling_session)
        add("GET", f"{API}/samplers/(?P<sampler_id>[^/]+)", self.get_sampler)
        add("POST", f"{API}/asample", self.asample)
        # Futures (4)
        add("POST", f"{API}/retrieve_future", self.retrieve_future)
        add("POST", f"{API}/retrieve_futures", self.retrieve_futures)
        add("POST", f"{API}/cancel_future", self.cancel_future)
        # REST (3.5, A.4)
        add("GET", f"{API}/training_runs", self.list_training_runs)
        add("GET", f"{API}/training_runs/{_RUN}", self.get_training_run)
        add("GET", f"{API}/training_runs/{_RUN}/checkpoints", self.run_checkpoints)
        add("DELETE", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}", self.delete_checkpoint)
        add("POST", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}/publish", self.publish)
        add("DELETE", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}/publish", self.unpublish)
        add("PUT", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}/ttl", self.set_ttl)
        add("GET", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}/archive", self.archive_url)
        add("GET", f"{API}/checkpoints", self.list_checkpoints)
        add("POST", f"{API}/weights_info", self.weights_info)
        add("GET", f"{API}/sessions", self.list_sessions)
        add("GET", f"{API}/sessions/(?P<session_id>[^/]+)", self.get_session)
        add("GET", f"{ARCHIVE_ROUTE_PREFIX}(?P<token>[0-9a-f]{{40}}\\.tar\\.gz)", self.download)

    # --------------------------------------------------------------- helpers

    def _model_info(self, base_model: str) -> ModelInfo:
        info = self.models.get(base_model)
        if info is None:
            raise HTTPError(
                400,
                f"unknown base_model {base_model!r}; this backend serves {sorted(self.models)}",
            )
        return info

    def _session(self, session_id: str) -> None:
        if self.store.get_session(session_id) is None:
            raise HTTPError(404, f"unknown session_id {session_id!r}; call create_session first")

    def _model(self, model_id: str) -> ModelRow:
        model = self.store.get_model(model_id)
        if model is None:
            raise HTTPError(404, f"unknown model_id {model_id!r}")
        return model

    def _ensure_lane(self, model: ModelRow) -> None:
        if not self.lanes.has_lane(model.model_id):
            last = self.store.max_seq_of_model(model.model_id)
            start = max(model.next_seq_id, -1 if last is None else last + 1)
            self.lanes.open_lane(model.model_id, start)

    def _persist_seq(self, model_id: str, next_seq: int) -> None:
        self.store.update_model(model_id, next_seq_id=next_seq)

    def _checkpoint_dir(self, run_id: str, checkpoint_id: str) -> Path:
        return self.settings.data_dir / "checkpoints" / _run_dir_name(run_id) / checkpoint_id

    def _live_checkpoint(self, run_id: str, checkpoint_id: str) -> CheckpointRow | None:
        ck = self.store.get_checkpoint(run_id, checkpoint_id)
        if ck is not None and ck.expires_at is not None and ck.expires_at <= _now():
            self._remove_checkpoint(ck)
            return None
        return ck

    def _checkpoint_or_404(self, run_id: str, checkpoint_id: str) -> CheckpointRow:
        ck = self._live_checkpoint(run_id, checkpoint_id)
        if ck is None:
            raise HTTPError(404, f"no checkpoint {checkpoint_id!r} in training run {run_id!r}")
        return ck

    def _checkpoint_from_path(self, tinker_path: str, field: str) -> CheckpointRow:
        try:
            parsed = ParsedTinkerPath.parse(tinker_path)
        except ValueError as exc:
            raise HTTPError(400, f"{field}: {exc}") from None
        if parsed.kind == "external":
            raise HTTPError(400, f"{field}: external_weights checkpoints are not supported here")
        ck = self._live_checkpoint(parsed.training_run_id, parsed.checkpoint_id)
        if ck is None:
            raise HTTPError(404, f"{field}: no checkpoint at {tinker_path!r}")
        return ck

    def _remove_checkpoint(self, ck: CheckpointRow) -> None:
        self.store.delete_checkpoint(ck.run_id, ck.checkpoint_id)
        self.archives.remove(archive_token(ck.run_id, ck.checkpoint_id, ck.created_at))
        shutil.rmtree(ck.path, ignore_errors=True)

    def _checkpoint_wire(self, ck: CheckpointRow) -> Checkpoint:
        return Checkpoint(
            checkpoint_id=ck.checkpoint_id,
            checkpoint_type=ck.checkpoint_type,
            time=_dt(ck.created_at),
            tinker_path=ck.tinker_path,
            size_bytes=ck.size_bytes,
            public=ck.public,
            user_metadata=ck.user_metadata,
            expires_at=None if ck.expires_at is None else _dt(ck.expires_at),
        )

    def _future_response(
        self, request_id: str, model_id: str | None = None, sample_ids: list[str] | None = None
    ) -> Response:
        return json_response(
            UntypedAPIFuture(
                request_id=request_id, model_id=model_id, sample_sequence_ids=sample_ids
            )
        )

    def _duplicate(
        self, *, model_id: str | None, sampler_id: str | None, seq_id: int, payload_hash: str
    ) -> str | None:
        """The request id of an earlier submission of this seq_id, or None; 409 if it differs."""
        row = self.store.find_future_by_seq(
            model_id=model_id, sampling_session_id=sampler_id, seq_id=seq_id
        )
        if row is None:
            return None
        if row.payload_hash != payload_hash:
            owner = model_id if model_id is not None else sampler_id
            raise HTTPError(
                409,
                f"seq_id {seq_id} of {owner!r} was already submitted with a different payload "
                f"(request {row.request_id})",
            )
        return row.request_id

    async def _submit_training(
        self,
        request: Request,
        *,
        model_id: str,
        seq_id: int | None,
        request_type: str,
        payload: object,
        prepare: Callable[[ModelRow], JobFn],
        allow_corrupted: bool = False,
    ) -> Response:
        """The common path of every seq_id-ordered training request (PROTOCOL.md 5.2).

        Dedup first (same payload → the original request id, different → 409), then checks
        and conversion via `prepare` (raising 4xx), then queue the job in the model's lane.
        Any 4xx after the model is known consumes the seq_id so later requests do not wait.
        """
        model = self._model(model_id)
        self._ensure_lane(model)
        payload_hash = _hash(payload)
        if seq_id is not None:
            earlier = self._duplicate(
                model_id=model_id, sampler_id=None, seq_id=seq_id, payload_hash=payload_hash
            )
            if earlier is not None:
                await trio.lowlevel.checkpoint()
                return self._future_response(earlier, model_id)
        try:
            if seq_id is not None and (
                seq_id < self.lanes.next_seq(model_id) or self.lanes.is_queued(model_id, seq_id)
            ):
                raise HTTPError(
                    400,
                    f"seq_id {seq_id} of {model_id!r} was already used; the next expected "
                    f"seq_id is {self.lanes.next_seq(model_id)}",
                )
            if seq_id is not None and seq_id < 1:
                raise HTTPError(400, f"seq_id must be >= 1 (got {seq_id}); 0 is create_model")
            if model.unloaded:
                raise HTTPError(400, f"model {model_id!r} was unloaded; create a new one")
            if model.corrupted and not allow_corrupted:
                raise HTTPError(
                    400,
                    f"model {model_id!r} lost its in-memory state (the backend restarted or its "
                    "creation failed); create a training client from a saved checkpoint",
                )
            job = prepare(model)
        except (HTTPError, EngineUserError) as exc:
            if seq_id is not None:
                self.lanes.consume(model_id, seq_id)
            if isinstance(exc, EngineUserError):
                raise HTTPError(400, str(exc)) from None
            raise
        request_id = self.registry.create(
            request_type=request_type, payload_hash=payload_hash, model_id=model_id, seq_id=seq_id
        )
        self.store.update_model(model_id, last_request_time=_now())
        if seq_id is None:
            self.lanes.submit_unsequenced(model_id, request_id, job)
        else:
            self.lanes.submit(model_id, seq_id, request_id, job)
        await trio.lowlevel.checkpoint()
        return self._future_response(request_id, model_id)

    def _protobuf_fwdbwd(self, request: Request) -> ForwardRequest | ForwardBackwardRequest:
        """A protobuf forward_backward body (PROTOCOL.md 6.2-6.3) as our JSON-form request.

        `forward_only` picks the forward form. Config values must be numbers (our losses take
        no text options). On a bad body the seq_id is consumed if it could be read.
        """
        body = request.body
        encoding = (request.header("content-encoding") or "").strip().lower()
        try:
            if encoding == _protobuf.ZSTD_ENCODING:
                body = _protobuf.decompress(body)
            elif encoding not in ("", "identity"):
                raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported; use zstd")
            decoded = _protobuf.decode_forward_backward_request(body)
        except ValueError as exc:
            raise HTTPError(400, f"invalid protobuf forward_backward body: {exc}") from None
        config: dict[str, float] = {}
        for key, value in decoded.loss_fn_config.items():
            if isinstance(value, str):
                if decoded.seq_id is not None:
                    self._consume(decoded.model_id, decoded.seq_id)
                raise HTTPError(400, f"loss_fn_config[{key!r}] must be a number, got {value!r}")
            config[key] = value
        fb_input = ForwardBackwardInput(
            data=decoded.data, loss_fn=decoded.loss_fn, loss_fn_config=config or UNSET
        )
        seq_id = UNSET if decoded.seq_id is None else decoded.seq_id
        if decoded.forward_only:
            return ForwardRequest(forward_input=fb_input, model_id=decoded.model_id, seq_id=seq_id)
        return ForwardBackwardRequest(
            forward_backward_input=fb_input, model_id=decoded.model_id, seq_id=seq_id
        )

    def _consume(self, model_id: str, seq_id: int) -> None:
        model = self.store.get_model(model_id)
        if model is not None:
            self._ensure_lane(model)
            self.lanes.consume(model_id, seq_id)

    async def _training_body(self, request: Request, type_: type[T]) -> T:
        """Decode a seq_id-ordered body; on a 400 consume the seq_id if the ids are readable."""
        try:
            return decode_request(request.body, type_)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self._consume_from_raw(request.body)
            raise

    def _consume_from_raw(self, body: bytes) -> None:
        try:
            raw = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return
        if not isinstance(raw, dict):
            return
        model_id, seq_id = raw.get("model_id"), raw.get("seq_id")
        if isinstance(model_id, str) and isinstance(seq_id, int):
            model = self.store.get_model(model_id)
            if model is not None:
                self._ensure_lane(model)
                self.lanes.consume(model_id, seq_id)

    # --------------------------------------------------- session / bootstrap

    async def client_config(self, request: Request) -> Response:
        return json_response(self.settings.client_flags)

    async def dynamic_config(self, request: Request) -> Response:
        return json_response(DYNAMIC_CLIENT_FLAGS)

    async def create_session(self, request: Request) -> Response:
        body = decode_request(request.body, CreateSessionRequest)
        session_id = str(uuid.uuid4())
        self.store.insert_session(
            session_id,
            created_at=_now(),
            tags=list(body.tags),
            user_metadata=body.user_metadata,
            project_id=_set(body.project_id),
            display_name=_set(body.display_name),
            sdk_version=body.sdk_version,
        )
        return json_response(CreateSessionResponse(session_id=session_id))

    async def session_heartbeat(self, request: Request) -> Response:
        body = decode_request(request.body, SessionHeartbeatRequest)
        session = self.store.get_session(body.session_id)
        if session is None:
            raise HTTPError(404, f"unknown session_id {body.session_id!r}")
        if session.finished_reason is not None:
            raise HTTPError(410, f"session {body.session_id!r} is finished")
        self.store.heartbeat(body.session_id, _now())
        return json_response({"type": "session_heartbeat"})

    async def finish_session(self, request: Request) -> Response:
        session_id = request.params["session_id"]
        self._session(session_id)
        reason = "success"
        if request.body.strip():
            raw = msgspec.json.decode(request.body)
            if isinstance(raw, dict) and isinstance(raw.get("reason"), dict):
                reason = str(raw["reason"].get("type", "success"))
        self.store.finish_session(session_id, reason)
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
                    for m in self.models.values()
                ]
            )
        )

    # -------------------------------------------------------------- training

    async def create_model(self, request: Request) -> Response:
        body = decode_request(request.body, CreateModelRequest)
        self._session(body.session_id)
        info = self._model_info(body.base_model)
        spec = _convert.lora_spec(body.lora_config)
        family = body.optimizer_config.get("type", "adamw")
        if family not in ("adamw", "adam"):
            raise HTTPError(400, f"optimizer_config type {family!r} is not supported; use adamw")
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        payload_hash = _hash(body)
        earlier = self._duplicate(
            model_id=model_id, sampler_id=None, seq_id=0, payload_hash=payload_hash
        )
        if earlier is not None:
            return self._future_response(earlier, model_id)
        if self.store.get_model(model_id) is not None:
            raise HTTPError(400, f"model {model_id!r} already exists (model_seq_id reused)")
        self.store.insert_model(
            model_id=model_id,
            session_id=body.session_id,
            model_seq_id=body.model_seq_id,
            base_model=info.name,
            lora_config=_convert.lora_config_dict(spec),
            optimizer_config=body.optimizer_config,
            user_metadata=_set(body.user_metadata),
            now=_now(),
        )
        self.lanes.open_lane(model_id, 0)
        request_id = self.registry.create(
            request_type="CreateModel", payload_hash=payload_hash, model_id=model_id, seq_id=0
        )

        async def job() -> bytes:
            try:
                await self.runner.call(self.runner.engine.create_adapter, model_id, info.name, spec)
            except BaseException:
                self.store.update_model(model_id, corrupted=1)
                raise
            return _json({"model_id": model_id, "type": "create_model"})

        self.lanes.submit(model_id, 0, request_id, job)
        return self._future_response(request_id, model_id)

    async def get_info(self, request: Request) -> Response:
        body = decode_request(request.body, GetInfoRequest)
        model = self._model(body.model_id)
        info = self.models.get(model.base_model)
        return json_response(
            GetInfoResponse(
                model_id=model.model_id,
                model_data=ModelData(
                    arch=info.arch if info else None,
                    model_name=model.base_model,
                    tokenizer_id=info.tokenizer_id if info else None,
                ),
                optimizer_config=model.optimizer_config,
                is_lora=True,
                lora_rank=int(model.lora_config.get("rank", 0)) or None,
                model_name=model.base_model,
            )
        )

    async def forward(self, request: Request) -> Response:
        body = await self._training_body(request, ForwardRequest)
        return await self._forward_backward(
            request, body, body.forward_input, forward_only=True, request_type="Forward"
        )

    async def forward_backward(self, request: Request) -> Response:
        content_type = request.header("content-type") or ""
        if _protobuf.PROTOBUF_CONTENT_TYPE in content_type:
            # PROTOCOL.md 3.9: protobuf forward is forward_backward with forward_only set.
            proto_body = self._protobuf_fwdbwd(request)
            if isinstance(proto_body, ForwardRequest):
                return await self._forward_backward(
                    request,
                    proto_body,
                    proto_body.forward_input,
                    forward_only=True,
                    request_type="Forward",
                )
            return await self._forward_backward(
                request,
                proto_body,
                proto_body.forward_backward_input,
                forward_only=False,
                request_type="ForwardBackward",
            )
        body = await self._training_body(request, ForwardBackwardRequest)
        return await self._forward_backward(
            request,
            body,
            body.forward_backward_input,
            forward_only=False,
            request_type="ForwardBackward",
        )

    async def _forward_backward(
        self,
        request: Request,
        body: ForwardRequest | ForwardBackwardRequest,
        fb_input: Any,
        *,
        forward_only: bool,
        request_type: str,
    ) -> Response:
        def prepare(model: ModelRow) -> JobFn:
            info = self._model_info(model.base_model)
            if not fb_input.data:
                raise EngineUserError("data is empty; send at least one datum")
            loss = _convert.loss_name(fb_input.loss_fn)
            config = _convert.loss_config(fb_input.loss_fn_config)
            arrays = [_convert.datum_arrays(d, i, info) for i, d in enumerate(fb_input.data)]

            async def job() -> bytes:
                result = await self.runner.call(
                    self.runner.engine.forward_backward,
                    model.model_id,
                    arrays,
                    loss,
                    config,
                    forward_only,
                )
                if len(result.logprobs) != len(arrays):
                    raise RuntimeError(
                        f"engine returned {len(result.logprobs)} outputs for {len(arrays)} datums"
                    )
                outputs = [
                    {
                        "logprobs": {
                            "data": lp.astype("float32").tolist(),
                            "dtype": "float32",
                            "shape": list(lp.shape),
                        }
                    }
                    for lp in result.logprobs
                ]
                # Built as a dict: all three keys must be present (PROTOCOL.md A.1.5).
                return _json(
                    {
                        "loss_fn_output_type": "ArrayRecord",
                        "loss_fn_outputs": outputs,
                        "metrics": {k: float(v) for k, v in result.metrics.items()},
                    }
                )

            return job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=_set(body.seq_id),
            request_type=request_type,
            payload=body,
            prepare=prepare,
        )

    async def optim_step(self, request: Request) -> Response:
        body = await self._training_body(request, OptimStepRequest)

        def prepare(model: ModelRow) -> JobFn:
            step = _convert.adam_step(body.adam_params, body.optimizer_params)

            async def job() -> bytes:
                metrics = await self.runner.call(
                    self.runner.engine.optim_step, model.model_id, step
                )
                return _json({"metrics": {k: float(v) for k, v in metrics.items()}})

            return job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=_set(body.seq_id),
            request_type="OptimStep",
            payload=body,
            prepare=prepare,
        )

    def _ttl_expiry(self, ttl: int | None) -> float | None:
        if ttl is None:
            return None
        if ttl <= 0:
            raise HTTPError(400, f"ttl_seconds must be positive, got {ttl}")
        return _now() + ttl

    async def _write_checkpoint(
        self,
        model: ModelRow,
        segment: str,
        name: str,
        *,
        overwrite: bool,
        expires_at: float | None,
        user_metadata: dict[str, str] | None,
    ) -> CheckpointRow:
        """Save the model's adapter as a checkpoint (in the lane, i.e. in seq_id order)."""
        checkpoint_id = f"{segment}/{name}"
        existing = self._live_checkpoint(model.model_id, checkpoint_id)
        if existing is not None and not overwrite:
            raise EngineUserError(
                f"checkpoint {checkpoint_id!r} already exists in {model.model_id!r}; "
                "pass overwrite=True to replace it"
            )
        final = self._checkpoint_dir(model.model_id, checkpoint_id)
        tmp = final.with_name(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            size = await self.runner.call(
                _save_state, self.runner.engine, model.model_id, tmp, segment == "weights"
            )
            if existing is not None:
                self._remove_checkpoint(existing)
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        row = CheckpointRow(
            run_id=model.model_id,
            checkpoint_id=checkpoint_id,
            checkpoint_type="training" if segment == "weights" else "sampler",
            created_at=_now(),
            path=str(final),
            size_bytes=size,
            public=False,
            expires_at=expires_at,
            user_metadata=user_metadata,
        )
        self.store.upsert_checkpoint(row)
        return row

    async def save_weights(self, request: Request) -> Response:
        body = await self._training_body(request, SaveWeightsRequest)

        def prepare(model: ModelRow) -> JobFn:
            name = _check_name(body.path, "path")
            expires_at = self._ttl_expiry(_set(body.ttl_seconds))
            if not body.overwrite and self._live_checkpoint(model.model_id, f"weights/{name}"):
                raise HTTPError(
                    400,
                    f"checkpoint 'weights/{name}' already exists in {model.model_id!r}; "
                    "pass overwrite=True to replace it",
                )

            async def job() -> bytes:
                row = await self._write_checkpoint(
                    model,
                    "weights",
                    name,
                    overwrite=body.overwrite,
                    expires_at=expires_at,
                    user_metadata=_set(body.user_metadata),
                )
                return _json({"path": row.tinker_path, "type": "save_weights"})

            return job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=_set(body.seq_id),
            request_type="SaveWeights",
            payload=body,
            prepare=prepare,
        )

    async def save_weights_for_sampler(self, request: Request) -> Response:
        body = await self._training_body(request, SaveWeightsForSamplerRequest)

        def prepare(model: ModelRow) -> JobFn:
            expires_at = self._ttl_expiry(_set(body.ttl_seconds))
            if body.path is not UNSET:
                name = _check_name(body.path, "path")

                async def named_job() -> bytes:
                    row = await self._write_checkpoint(
                        model,
                        "sampler_weights",
                        name,
                        overwrite=True,
                        expires_at=expires_at,
                        user_metadata=_set(body.user_metadata),
                    )
                    return _json({"path": row.tinker_path, "type": "save_weights_for_sampler"})

                return named_job
            if body.sampling_session_seq_id is UNSET:
                raise HTTPError(
                    400, "save_weights_for_sampler needs path or sampling_session_seq_id"
                )
            sampler_id = f"{model.session_id}:sample:{body.sampling_session_seq_id}"
            if self.store.get_sampling_session(sampler_id) is not None:
                raise HTTPError(
                    400,
                    f"sampling session {sampler_id!r} already exists (sampling_session_seq_id reused)",
                )

            async def unnamed_job() -> bytes:
                target = self.settings.data_dir / "ephemeral" / _run_dir_name(sampler_id)
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                await self.runner.call(
                    _save_state, self.runner.engine, model.model_id, target, False
                )
                self.store.insert_sampling_session(
                    SamplingSessionRow(
                        sampling_session_id=sampler_id,
                        session_id=model.session_id,
                        base_model=model.base_model,
                        model_path=None,
                        adapter_dir=str(target),
                        created_at=_now(),
                    )
                )
                # No `path` here: the client asserts it is absent (PROTOCOL.md A.3.8).
                return _json(
                    {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
                )

            return unnamed_job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=_set(body.seq_id),
            request_type="SaveWeightsForSampler",
            payload=body,
            prepare=prepare,
        )

    async def load_weights(self, request: Request) -> Response:
        body = await self._training_body(request, LoadWeightsRequest)
        if body.model_id is not UNSET:
            return await self._load_in_place(request, body)
        if body.session_id is UNSET or body.model_seq_id is UNSET:
            raise HTTPError(
                400, "load_weights needs model_id (+ seq_id), or session_id + model_seq_id"
            )
        self._session(body.session_id)
        ck = self._checkpoint_from_path(body.path, "path")
        if body.optimizer and ck.checkpoint_type != "training":
            raise HTTPError(
                400,
                f"{body.path!r} is a sampler checkpoint and has no optimizer state; "
                "load it with optimizer=False",
            )
        source = self._model(ck.run_id)
        base_model = source.base_model
        if body.base_model is not UNSET and body.base_model != base_model:
            raise HTTPError(
                400,
                f"base_model {body.base_model!r} does not match the checkpoint's {base_model!r}",
            )
        self._model_info(base_model)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        payload_hash = _hash(body)
        earlier = self._duplicate(
            model_id=model_id, sampler_id=None, seq_id=0, payload_hash=payload_hash
        )
        if earlier is not None:
            return self._future_response(earlier, model_id)
        if self.store.get_model(model_id) is not None:
            raise HTTPError(400, f"model {model_id!r} already exists (model_seq_id reused)")
        self.store.insert_model(
            model_id=model_id,
            session_id=body.session_id,
            model_seq_id=body.model_seq_id,
            base_model=base_model,
            lora_config=source.lora_config,
            optimizer_config=source.optimizer_config,
            user_metadata=_set(body.user_metadata),
            now=_now(),
        )
        self.lanes.open_lane(model_id, 0)
        request_id = self.registry.create(
            request_type="LoadWeights", payload_hash=payload_hash, model_id=model_id, seq_id=0
        )
        directory = Path(ck.path)
        optimizer = body.optimizer
        path = body.path

        async def job() -> bytes:
            try:
                spec = await self.runner.call(
                    _load_state, self.runner.engine, model_id, base_model, directory, optimizer
                )
            except BaseException:
                self.store.update_model(model_id, corrupted=1)
                raise
            self.store.update_model(model_id, lora_config=_convert.lora_config_dict(spec))
            return _json({"path": path, "model_id": model_id, "type": "load_weights"})

        self.lanes.submit(model_id, 0, request_id, job)
        return self._future_response(request_id, model_id)

    async def _load_in_place(self, request: Request, body: LoadWeightsRequest) -> Response:
        model_id = str(body.model_id)

        def prepare(model: ModelRow) -> JobFn:
            ck = self._checkpoint_from_path(body.path, "path")
            if body.optimizer and ck.checkpoint_type != "training":
                raise HTTPError(400, f"{body.path!r} is a sampler checkpoint; use optimizer=False")
            source = self.store.get_model(ck.run_id)
            if source is not None and source.base_model != model.base_model:
                raise HTTPError(
                    400,
                    f"checkpoint base model {source.base_model!r} differs from the model's "
                    f"{model.base_model!r}",
                )
            directory, optimizer = Path(ck.path), body.optimizer

            async def job() -> bytes:
                spec = await self.runner.call(
                    _load_state,
                    self.runner.engine,
                    model_id,
                    model.base_model,
                    directory,
                    optimizer,
                )
                self.store.update_model(
                    model_id, lora_config=_convert.lora_config_dict(spec), corrupted=0
                )
                return _json({"path": body.path, "model_id": model_id, "type": "load_weights"})

            return job

        return await self._submit_training(
            request,
            model_id=model_id,
            seq_id=_set(body.seq_id),
            request_type="LoadWeights",
            payload=body,
            prepare=prepare,
            allow_corrupted=True,
        )

    async def unload_model(self, request: Request) -> Response:
        body = decode_request(request.body, UnloadModelRequest)
        model_id = body.model_id

        def prepare(model: ModelRow) -> JobFn:
            async def job() -> bytes:
                if not model.corrupted:
                    await self.runner.call(self.runner.engine.drop_adapter, model_id)
                self.store.update_model(model_id, unloaded=1)
                return _json({"model_id": model_id, "type": "unload_model"})

            return job

        return await self._submit_training(
            request,
            model_id=model_id,
            seq_id=None,
            request_type="UnloadModel",
            payload=body,
            prepare=prepare,
            allow_corrupted=True,
        )

    # -------------------------------------------------------------- sampling

    async def create_sampling_session(self, request: Request) -> Response:
        body = decode_request(request.body, CreateSamplingSessionRequest)
        self._session(body.session_id)
        model_path = _set(body.model_path)
        adapter_dir: str | None = None
        if model_path is not None:
            ck = self._checkpoint_from_path(model_path, "model_path")
            base_model = self._model(ck.run_id).base_model
            if body.base_model is not UNSET and body.base_model != base_model:
                raise HTTPError(
                    400,
                    f"base_model {body.base_model!r} does not match {model_path!r}, which was "
                    f"trained on {base_model!r}",
                )
            adapter_dir = ck.path
        elif body.base_model is not UNSET:
            base_model = body.base_model
        else:
            raise HTTPError(400, "create_sampling_session needs base_model or model_path")
        self._model_info(base_model)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        existing = self.store.get_sampling_session(sampler_id)
        if existing is not None:
            if existing.base_model != base_model or existing.model_path != model_path:
                raise HTTPError(
                    400,
                    f"sampling session {sampler_id!r} already exists with other weights "
                    "(sampling_session_seq_id reused)",
                )
        else:
            self.store.insert_sampling_session(
                SamplingSessionRow(
                    sampling_session_id=sampler_id,
                    session_id=body.session_id,
                    base_model=base_model,
                    model_path=model_path,
                    adapter_dir=adapter_dir,
                    created_at=_now(),
                )
            )
        return json_response(CreateSamplingSessionResponse(sampling_session_id=sampler_id))

    def _check_sample_backpressure(self) -> None:
        """429 when the engine's sampling queue is full (PROTOCOL.md 3.3, 9.5, 10.8).

        Called after every check that could answer 4xx and after deduplication (a resubmitted
        seq_id that was accepted before gets its future, full queue or not), and before
        anything is created: a rejected submission leaves no trace, so the SDK's resubmission
        with the same seq_id is a first submission.
        """
        limit = self.settings.max_queued_samples
        queued = self.batcher.queued
        if limit is not None and queued >= limit:
            raise HTTPError(
                429,
                f"the local backend has {queued} sampling requests waiting for the engine "
                f"(limit {limit}); back off and resubmit",
                category="server",
                headers={"retry-after-ms": str(SAMPLE_RETRY_AFTER_MS)},
            )

    async def get_sampler(self, request: Request) -> Response:
        sampler_id = request.params["sampler_id"]
        row = self.store.get_sampling_session(sampler_id)
        if row is None:
            raise HTTPError(404, f"unknown sampler {sampler_id!r}")
        return json_response(
            GetSamplerResponse(
                sampler_id=row.sampling_session_id,
                base_model=row.base_model,
                model_path=row.model_path,
            )
        )

    async def asample(self, request: Request) -> Response:
        body = decode_request(request.body, SampleRequest)
        sampler_id = _set(body.sampling_session_id)
        adapter_dir: Path | None = None
        if sampler_id is not None:
            row = self.store.get_sampling_session(sampler_id)
            if row is None:
                raise HTTPError(404, f"unknown sampling_session_id {sampler_id!r}")
            base_model = row.base_model
            adapter_dir = Path(row.adapter_dir) if row.adapter_dir else None
        elif body.model_path is not UNSET:
            ck = self._checkpoint_from_path(body.model_path, "model_path")
            base_model = self._model(ck.run_id).base_model
            adapter_dir = Path(ck.path)
        elif body.base_model is not UNSET:
            base_model = body.base_model
        else:
            raise HTTPError(400, "asample needs sampling_session_id, model_path or base_model")
        info = self._model_info(base_model)
        payload_hash = _hash(body)
        seq_id = _set(body.seq_id)
        if sampler_id is not None and seq_id is not None:
            earlier = self._duplicate(
                model_id=None, sampler_id=sampler_id, seq_id=seq_id, payload_hash=payload_hash
            )
            if earlier is not None:
                return self._future_response(
                    earlier, sample_ids=_sequence_ids(earlier, body.num_samples)
                )
        engine_request = _convert.sample_request(body, info, adapter_dir)
        self._check_sample_backpressure()
        request_id = self.registry.create(
            request_type="Sample",
            payload_hash=payload_hash,
            sampling_session_id=sampler_id,
            seq_id=seq_id if sampler_id is not None else None,
        )
        sequence_ids = _sequence_ids(request_id, body.num_samples)
        want_prompt_logprobs = body.prompt_logprobs
        topk = body.topk_prompt_logprobs

        def finish(result: SampleResult) -> bytes:
            out: dict[str, Any] = {
                "sequences": [
                    {
                        "stop_reason": s.stop_reason,
                        "tokens": list(s.tokens),
                        "logprobs": list(s.logprobs),
                        "sequence_id": sid,
                    }
                    for s, sid in zip(result.sequences, sequence_ids, strict=True)
                ],
                "type": "sample",
            }
            if want_prompt_logprobs:
                out["prompt_logprobs"] = result.prompt_logprobs
            if topk > 0:
                out["topk_prompt_logprobs"] = result.topk_prompt_logprobs
            return _json(out)

        self.batcher.submit(request_id, engine_request, finish)
        await trio.lowlevel.checkpoint()
        return self._future_response(request_id, sample_ids=sequence_ids)

    # --------------------------------------------------------------- futures

    async def retrieve_future(self, request: Request) -> Response:
        """Long-poll one future (PROTOCOL.md 4.2): its result, error, try_again, 410 if its
        payload was retrieved and deleted (4.8), or once `complete_metadata` if large (4.4)."""
        body = decode_request(request.body, RetrieveFutureRequest)
        row = await self.registry.wait_finished(body.request_id, self.settings.poll_timeout)
        if row is None:
            raise HTTPError(404, f"unknown request_id {body.request_id!r}")
        if row.state == "done" and row.result is None:
            raise HTTPError(
                410,
                f"result already retrieved: request {body.request_id!r} was listed in "
                "retrieved_request_ids and its payload deleted; submit the request again",
            )
        rendered = render_result(row, accept=request.header("accept"))
        threshold = self.settings.metadata_only_threshold
        if (
            body.allow_metadata_only
            and row.state == "done"
            and threshold is not None
            and len(rendered.body) > threshold
            and self.registry.announce_metadata_only(row.request_id)
        ):
            # The exact size of the body the next poll gets (protobuf or JSON), so the client
            # reserves what it will receive; rendering twice is paid once per large result.
            return json_response(_CompleteMetadata(response_payload_size=len(rendered.body)))
        self.registry.delivered(row)
        return Response(
            status=rendered.status, body=rendered.body, content_type=rendered.content_type
        )

    async def retrieve_futures(self, request: Request) -> Response:
        """Session-wide completion polling (PROTOCOL.md 4.8): events after `prev_cursor`.

        Long-polls until at least one completion is newer than `prev_cursor` or the window
        (the request's `timeout`, else the server's poll window, at most 30 s) passes; `timeout:
        0` answers at once (ack-only polls). `retrieved_request_ids` are handled first: each
        payload is deleted once also delivered (`FutureRegistry.acknowledge_retrieved`).
        """
        body = decode_request(request.body, _RetrieveFuturesRequest)
        target = body.target
        if self.store.get_sampling_session(target.sampling_session_id) is None:
            raise HTTPError(404, f"unknown sampling_session_id {target.sampling_session_id!r}")
        self.registry.acknowledge_retrieved(target.sampling_session_id, body.retrieved_request_ids)
        log = self.registry.completion_log(target.sampling_session_id, target.cloned_sampler_id)
        window = self.settings.poll_timeout if body.timeout is None else body.timeout
        window = max(0.0, min(window, MAX_RETRIEVE_FUTURES_TIMEOUT))
        events = log.after(body.prev_cursor)
        if not events and window > 0:
            with trio.move_on_after(window):
                while not events:
                    await log.changed.wait()
                    events = log.after(body.prev_cursor)
        else:
            await trio.lowlevel.checkpoint()
        completions = [
            _Completion(
                state=e.state,
                request_id=e.request_id,
                response_payload_uncompressed_size=e.size if e.state == "finished" else None,
            )
            for e in events
        ]
        cursor = events[-1].cursor if events else max(body.prev_cursor, log.next_cursor - 1)
        return json_response(_RetrieveFuturesResponse(completions=completions, cursor=cursor))

    async def cancel_future(self, request: Request) -> Response:
        """PROTOCOL.md 4.9: an abandoned sample; its future fails as cancelled if still pending."""
        body = decode_request(request.body, _CancelFutureRequest)
        self.registry.cancel(body.request_id)
        return json_response({})

    # ------------------------------------------------------------------ REST

    def _training_run(self, model: ModelRow) -> TrainingRun:
        checkpoints = self.store.checkpoints_of_run(model.model_id)
        last = next((c for c in checkpoints if c.checkpoint_type == "training"), None)
        last_sampler = next((c for c in checkpoints if c.checkpoint_type == "sampler"), None)
        rank = model.lora_config.get("rank")
        return TrainingRun(
            training_run_id=model.model_id,
            base_model=model.base_model,
            model_owner=LOCAL_OWNER,
            is_lora=True,
            last_request_time=_dt(model.last_request_time),
            corrupted=model.corrupted,
            lora_rank=int(rank) if rank is not None else None,
            last_checkpoint=self._checkpoint_wire(last) if last else None,
            last_sampler_checkpoint=self._checkpoint_wire(last_sampler) if last_sampler else None,
            user_metadata=model.user_metadata,
        )

    async def list_training_runs(self, request: Request) -> Response:
        limit = _int_query(request, "limit", DEFAULT_RUNS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = _int_query(request, "offset", 0, 0, 2**31)
        models, total = self.store.list_models(limit=limit, offset=offset)
        return json_response(
            TrainingRunsResponse(
                training_runs=[self._training_run(m) for m in models],
                cursor=Cursor(offset=offset, limit=limit, total_count=total),
            )
        )

    async def get_training_run(self, request: Request) -> Response:
        return json_response(self._training_run(self._model(request.params["run_id"])))

    async def run_checkpoints(self, request: Request) -> Response:
        run_id = request.params["run_id"]
        self._model(run_id)
        rows = [
            c
            for c in self.store.checkpoints_of_run(run_id)
            if self._live_checkpoint(c.run_id, c.checkpoint_id) is not None
        ]
        return json_response(
            CheckpointsListResponse(checkpoints=[self._checkpoint_wire(c) for c in rows])
        )

    async def list_checkpoints(self, request: Request) -> Response:
        limit = _int_query(request, "limit", DEFAULT_CHECKPOINTS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = _int_query(request, "offset", 0, 0, 2**31)
        self._reap_expired()
        rows, total = self.store.list_checkpoints(limit=limit, offset=offset)
        return json_response(
            CheckpointsListResponse(
                checkpoints=[self._checkpoint_wire(c) for c in rows],
                cursor=Cursor(offset=offset, limit=limit, total_count=total),
            )
        )

    async def delete_checkpoint(self, request: Request) -> Response:
        ck = self._checkpoint_or_404(request.params["run_id"], request.params["checkpoint_id"])
        self._remove_checkpoint(ck)
        return json_response({})

    async def publish(self, request: Request) -> Response:
        ck = self._checkpoint_or_404(request.params["run_id"], request.params["checkpoint_id"])
        if ck.public:
            raise HTTPError(409, f"checkpoint {ck.tinker_path!r} is already public")
        self.store.set_checkpoint_public(ck.run_id, ck.checkpoint_id, True)
        return json_response({})

    async def unpublish(self, request: Request) -> Response:
        ck = self._checkpoint_or_404(request.params["run_id"], request.params["checkpoint_id"])
        if not ck.public:
            raise HTTPError(409, f"checkpoint {ck.tinker_path!r} is already private")
        self.store.set_checkpoint_public(ck.run_id, ck.checkpoint_id, False)
        return json_response({})

    async def set_ttl(self, request: Request) -> Response:
        ck = self._checkpoint_or_404(request.params["run_id"], request.params["checkpoint_id"])
        body = decode_request(request.body, SetCheckpointTtlRequest)
        self.store.set_checkpoint_expiry(
            ck.run_id, ck.checkpoint_id, self._ttl_expiry(body.ttl_seconds)
        )
        return json_response({})

    async def archive_url(self, request: Request) -> Response:
        ck = self._checkpoint_or_404(request.params["run_id"], request.params["checkpoint_id"])
        token = archive_token(ck.run_id, ck.checkpoint_id, ck.created_at)
        error = self.archives.error(token)
        if error is not None:
            raise HTTPError(500, error, category="server")
        if not self.archives.ready(token):
            self.archives.start(self._nursery, token, Path(ck.path))
            raise HTTPError(
                503,
                f"the archive of {ck.tinker_path!r} is being built; retry shortly",
                category="server",
                headers={"retry-after": "1"},
            )
        expires = int(_now() + ARCHIVE_URL_TTL)
        path = ARCHIVE_ROUTE_PREFIX + token
        location = f"{request.base_url()}{path}?expires={expires}&signature={sign(self.settings.secret, path, expires)}"
        return Response(
            status=302,
            body=_json({"url": location}),
            headers={
                "location": location,
                "expires": format_datetime(_dt(expires), usegmt=True),
            },
        )

    async def download(self, request: Request) -> StreamResponse:
        token = request.params["token"]
        path = ARCHIVE_ROUTE_PREFIX + token
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            raise HTTPError(403, "archive URL has no valid expires parameter") from None
        if not verify(self.settings.secret, path, expires, request.query.get("signature", "")):
            raise HTTPError(403, "archive URL signature does not match")
        if expires < _now():
            raise HTTPError(410, "archive URL has expired; ask for a new one")
        file_path = self.archives.path_for(token)
        try:
            handle = await trio.open_file(file_path, "rb")
        except FileNotFoundError:
            raise HTTPError(404, "archive no longer exists (checkpoint deleted?)") from None
        size = os.fstat(handle.fileno()).st_size

        async def chunks() -> AsyncIterator[bytes]:
            async with handle:
                while chunk := await handle.read(STREAM_CHUNK):
                    yield chunk

        return StreamResponse(
            status=200,
            chunks=chunks(),
            content_type="application/gzip",
            headers={
                "content-length": str(size),
                "content-disposition": f'attachment; filename="{token}"',
            },
        )

    async def weights_info(self, request: Request) -> Response:
        body = decode_request(request.body, WeightsInfoRequest)
        ck = self._checkpoint_from_path(body.tinker_path, "tinker_path")
        model = self._model(ck.run_id)
        lora = model.lora_config
        return json_response(
            WeightsInfoResponse(
                base_model=model.base_model,
                is_lora=True,
                lora_rank=lora.get("rank"),
                train_unembed=lora.get("train_unembed"),
                train_mlp=lora.get("train_mlp"),
                train_attn=lora.get("train_attn"),
                optimizer_config=model.optimizer_config,
            )
        )

    async def list_sessions(self, request: Request) -> Response:
        limit = _int_query(request, "limit", DEFAULT_RUNS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = _int_query(request, "offset", 0, 0, 2**31)
        ids, _total = self.store.list_sessions(limit=limit, offset=offset)
        return json_response(ListSessionsResponse(sessions=ids))

    async def get_session(self, request: Request) -> Response:
        session_id = request.params["session_id"]
        session = self.store.get_session(session_id)
        if session is None:
            raise HTTPError(404, f"unknown session_id {session_id!r}")
        return json_response(
            GetSessionResponse(
                training_run_ids=self.store.models_of_session(session_id),
                sampler_ids=self.store.samplers_of_session(session_id),
                user_metadata=session.user_metadata,
                display_name=session.display_name,
            )
        )

    # ------------------------------------------------------------ background

    def _reap_expired(self) -> None:
        for ck in self.store.expired_checkpoints(_now()):
            self._remove_checkpoint(ck)

    async def reap_forever(self) -> None:
        while True:
            self._reap_expired()
            await trio.sleep(REAP_INTERVAL)


def _sequence_ids(request_id: str, n: int) -> list[str]:
    """Deterministic per request, so a deduplicated resubmission gets the same ids."""
    return [f"{request_id}:{i}" for i in range(n)]


def _save_state(engine: Engine, adapter_id: str, directory: Path, with_optimizer: bool) -> int:
    return engine.save_state(adapter_id, directory, with_optimizer=with_optimizer)


def _load_state(
    engine: Engine, adapter_id: str, base_model: str, directory: Path, with_optimizer: bool
) -> Any:
    return engine.load_state(adapter_id, base_model, directory, with_optimizer=with_optimizer)


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
) -> AsyncIterator[BackendApp]:
    """Open the store, start the background tasks, yield the ASGI app; stop them on exit.

    `engine_in_thread=False` runs engine calls inline on the trio thread (virtual-time tests
    with a fake engine); the default runs them in one worker thread. `client_flags` are
    merged over `DEFAULT_CLIENT_FLAGS` for `client/config` (e.g. `proto_compress_fwdbwd`,
    `fwdbwd_max_chunk_len`). `max_queued_samples` is the sampling back-pressure limit
    (`DEFAULT_MAX_QUEUED_SAMPLES`; None: unlimited). Results larger than
    `metadata_only_threshold` bytes are announced metadata-only first (PROTOCOL.md 4.4;
    `DEFAULT_METADATA_ONLY_THRESHOLD`; None: never).

    Raises:
        ValueError: `max_queued_samples` is below 1.
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
        client_flags={**DEFAULT_CLIENT_FLAGS, **(client_flags or {})},
        max_queued_samples=max_queued_samples,
        metadata_only_threshold=metadata_only_threshold,
    )
    store = Store.open(data_dir / "state.sqlite3")
    try:
        runner = EngineRunner(engine, in_thread=engine_in_thread)
        models = await runner.call(engine.models)
        async with trio.open_nursery() as nursery:
            app = BackendApp(settings, store, runner, models, nursery)
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
