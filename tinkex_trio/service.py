"""`open_service` and `ServiceClient`: one nursery owns everything (DESIGN.md "The shape").

Exception-group policy of `open_service` (written down, as trio-websocket does):

* One failure comes out as itself, never wrapped in an ExceptionGroup.
* If user code and an SDK task both fail, the user's error is raised, with the group of the
  others as its ``__context__``.
* A bug in an SDK task (anything that is not a `TinkexError` stored in a future) crashes the
  service nursery; it is raised from `open_service` like any other single error.

At start the server's feature flags (`client/config`) and dynamic flags
(`client/dynamic_config`, PROTOCOL.md 2.1 step 3) are fetched; the dynamic ones are refreshed
by a background task, and enable cancelling abandoned samples on the server (4.9,
`tinkex_trio._dynamic`). On exit every background task is cancelled, queued sample cancels
are flushed (for at most `CANCEL_FLUSH_TIMEOUT` s), the session is finished as ``success``
(the block completed), ``errored`` (an Exception left it) or ``interrupted`` (cancellation,
KeyboardInterrupt), and the HTTP client closed. Nothing outlives the block.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, Final, final

import httpx
import trio
import trio_util

from tinkex_trio import types as t
from tinkex_trio._context import ServiceContext
from tinkex_trio._dispatch import RateLimiter
from tinkex_trio._dynamic import CANCEL_FLUSH_TIMEOUT, DynamicConfig, SampleCanceller
from tinkex_trio._limits import ByteBudget
from tinkex_trio._optional_endpoints import is_missing_endpoint, note_missing_endpoint
from tinkex_trio._policy import CALL, HEARTBEAT, SESSION_FINISH, SUBMIT
from tinkex_trio._polling import FuturePoller, json_decoder
from tinkex_trio._server_telemetry import FINAL_FLUSH_TIMEOUT, ServerTelemetry
from tinkex_trio._transport import Transport
from tinkex_trio._validate import require_server_path, require_str
from tinkex_trio._version import __version__
from tinkex_trio.admin import AdminClient
from tinkex_trio.config import Config
from tinkex_trio.errors import (
    APIError,
    APIStatusError,
    APITimeoutError,
    GoneError,
    InvalidInputError,
)
from tinkex_trio.rest import RestClient
from tinkex_trio.sampling import SamplingClient
from tinkex_trio.telemetry import SessionEvent, Telemetry
from tinkex_trio.training import TrainingClient

_logger = logging.getLogger("tinkex_trio.service")

# PROTOCOL.md 9.7: heartbeat every 10 s, first one 10 s after creation; warn after 120 s
# without a successful one (each is a single attempt: the ``heartbeat`` policy).
HEARTBEAT_INTERVAL: Final = 10.0
HEARTBEAT_WARN_AFTER: Final = 120.0
# How long entering and leaving the block may take for session creation and finish.
SESSION_OPEN_TIMEOUT: Final = 60.0
SESSION_FINISH_TIMEOUT: Final = 10.0


@final
class ServiceClient:
    """Creates training, sampling and REST clients inside one session.

    Get one from `open_service`; every client it creates is owned by that block. Creating
    several clients concurrently is just starting these coroutines in a nursery::

        async with trio.open_nursery() as nursery:
            for name in ("a", "b"):
                nursery.start_soon(make_client, name)   # each awaits create_lora_training_client
    """

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    @property
    def session_id(self) -> str:
        return self._ctx.session_id

    @property
    def client_config(self) -> t.ClientConfigResponse:
        """The server's feature flags from `client/config` (defaults if it has none)."""
        return self._ctx.client_config

    @property
    def dynamic_config(self) -> t.DynamicConfigResponse:
        """The server's current dynamic flags (PROTOCOL.md 2.1 step 3; defaults if it has none)."""
        return self._ctx.dynamic_config.value

    @property
    def telemetry(self) -> Telemetry:
        return self._ctx.telemetry

    @property
    def rate_limiter(self) -> RateLimiter:
        """The service-wide sampling limiter (429 window, submission slots); see `statistics()`."""
        return self._ctx.rate_limiter

    async def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        *,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """Create a LoRA training run on `base_model` (create_model, then get_info)."""
        self._ctx.check_open("ServiceClient")
        require_str("base_model", base_model)
        try:
            lora = t.LoraConfig(
                rank=rank,
                seed=t.UNSET if seed is None else seed,
                train_mlp=train_mlp,
                train_attn=train_attn,
                train_unembed=train_unembed,
            )
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        request = t.CreateModelRequest(
            session_id=self._ctx.session_id,
            model_seq_id=next(self._ctx.model_seq_ids),
            base_model=base_model,
            lora_config=lora,
            user_metadata=t.UNSET if user_metadata is None else dict(user_metadata),
        )
        # PROTOCOL.md 9.3: create_model relies on layer-A retries only.
        submitted = await self._ctx.transport.request(
            "POST", "/api/v1/create_model", content=t.encode(request), policy=CALL
        )
        future = t.decode(submitted.content, t.UntypedAPIFuture)
        created = await self._ctx.poller.poll(
            future.request_id, "CreateModel", json_decoder(t.CreateModelResponse)
        )
        return await self._training_client(created.model_id, next_request_id=0)

    async def create_training_client_from_state(
        self,
        path: str,
        *,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """A new training run with the weights of checkpoint `path` (fresh optimizer)."""
        return await self._from_state(path, False, base_model, user_metadata)

    async def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        *,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """A new training run with the weights and optimizer state of checkpoint `path`."""
        return await self._from_state(path, True, base_model, user_metadata)

    async def _from_state(
        self,
        path: str,
        optimizer: bool,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
    ) -> TrainingClient:
        self._ctx.check_open("ServiceClient")
        require_server_path("path", path)
        model_seq_id = next(self._ctx.model_seq_ids)
        request = t.LoadWeightsRequest(
            session_id=self._ctx.session_id,
            model_seq_id=model_seq_id,
            path=path,
            optimizer=optimizer,
            base_model=t.UNSET if base_model is None else base_model,
            user_metadata=t.UNSET if user_metadata is None else dict(user_metadata),
        )
        submitted = await self._ctx.transport.request(
            "POST", "/api/v1/load_weights", content=t.encode(request), policy=SUBMIT
        )
        future = t.decode(submitted.content, t.UntypedAPIFuture)
        await self._ctx.poller.poll(
            future.request_id, "LoadWeights", json_decoder(t.LoadWeightsResponse)
        )
        # PROTOCOL.md 3.2: the client names the new model itself; the load was its request 0.
        model_id = f"{self._ctx.session_id}:train:{model_seq_id}"
        return await self._training_client(model_id, next_request_id=0)

    async def _training_client(self, model_id: str, *, next_request_id: int) -> TrainingClient:
        body = t.encode(t.GetInfoRequest(model_id=model_id))
        response = await self._ctx.transport.request(
            "POST", "/api/v1/get_info", content=body, policy=SUBMIT
        )
        info = t.decode(response.content, t.GetInfoResponse)
        return TrainingClient._create(self._ctx, info, next_request_id=next_request_id)

    async def create_sampling_client(
        self,
        *,
        base_model: str | None = None,
        model_path: str | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """A sampling client for a base model or for sampler weights at `model_path`.

        `record_stability_info=True`: the server records every sequence this client samples,
        for `stable_reinforce` (see `SamplingClient`).
        """
        self._ctx.check_open("ServiceClient")
        return await SamplingClient._open(
            self._ctx,
            base_model=base_model,
            model_path=model_path,
            record_stability_info=record_stability_info,
        )

    async def sampling_client_for(
        self,
        sampling_session_id: str,
        *,
        base_model: str | None = None,
        model_path: str | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """A client for an existing sampling session (learns its base model if not given)."""
        self._ctx.check_open("ServiceClient")
        return await SamplingClient._for_session(
            self._ctx,
            sampling_session_id,
            base_model=base_model,
            model_path=model_path,
            record_stability_info=record_stability_info,
        )

    def create_rest_client(self) -> RestClient:
        """REST calls (runs, checkpoints, sessions) over this service's connection pool."""
        self._ctx.check_open("ServiceClient")
        return RestClient(self._ctx.transport)

    def create_admin_client(self) -> AdminClient:
        """Admin calls (audit log, billing usage, checkpoint storage) over this service's
        connection pool."""
        self._ctx.check_open("ServiceClient")
        return AdminClient(self._ctx.transport)

    async def get_server_capabilities(self) -> t.ServerCapabilities:
        self._ctx.check_open("ServiceClient")
        return await RestClient(self._ctx.transport).get_server_capabilities()

    def __repr__(self) -> str:
        state = "closed" if self._ctx.closed else "open"
        return f"<ServiceClient session={self._ctx.session_id} {state} {self._ctx.config.base_url}>"


async def _fetch_client_config(transport: Transport) -> t.ClientConfigResponse:
    body = t.encode(t.ClientConfigRequest(sdk_version=__version__))
    try:
        response = await transport.request(
            "POST", "/api/v1/client/config", content=body, policy=SUBMIT
        )
    except APIStatusError as exc:
        if not is_missing_endpoint(exc):
            raise
        # A server without feature flags: every flag at its default.
        note_missing_endpoint("client/config", exc.status_code)
        return t.ClientConfigResponse()
    return t.decode(response.content, t.ClientConfigResponse)


async def _create_session(config: Config, transport: Transport) -> str:
    request = t.CreateSessionRequest(
        tags=list(config.tags),
        user_metadata=dict(config.user_metadata),
        sdk_version=__version__,
        project_id=t.UNSET if config.project_id is None else config.project_id,
    )
    response = await transport.request(
        "POST", "/api/v1/create_session", content=t.encode(request), policy=CALL
    )
    created = t.decode(response.content, t.CreateSessionResponse)
    for level, message in (
        (logging.INFO, created.info_message),
        (logging.WARNING, created.warning_message),
        (logging.ERROR, created.error_message),
    ):
        if message:
            _logger.log(level, "server: %s", message)
    return created.session_id


async def _heartbeat(
    transport: Transport,
    telemetry: Telemetry,
    session_id: str,
    report: ServerTelemetry | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send a heartbeat every 10 s until cancelled or the server says the session is gone.

    Error handling: a failed heartbeat (any `APIError`) is retried on the next tick; after
    `HEARTBEAT_WARN_AFTER` seconds without success a WARNING is logged on logger
    `tinkex_trio.service` (once per outage). A 410 stops the loop: the session is finished.
    """
    body = t.encode(t.SessionHeartbeatRequest(session_id=session_id))
    last_ok = trio.current_time()
    warned = False
    task_status.started()
    # trio_util.periodic keeps the 10 s cadence whatever a heartbeat takes (after an overrun
    # the next one goes at once, with no catch-up burst). Its first tick is immediate, but
    # PROTOCOL.md 9.7 sends the first heartbeat one interval after the session is created.
    async with aclosing(trio_util.periodic(HEARTBEAT_INTERVAL)) as ticks:
        async for _elapsed, since_last in ticks:
            if since_last is None:
                continue
            try:
                await transport.request(
                    "POST", "/api/v1/session_heartbeat", content=body, policy=HEARTBEAT
                )
            except GoneError:
                _logger.info("session %s is finished on the server; heartbeats stop", session_id)
                return
            except APIError as exc:
                if not warned and trio.current_time() - last_ok >= HEARTBEAT_WARN_AFTER:
                    warned = True
                    _logger.warning(
                        "no successful heartbeat for session %s in %.0f s (last error: %s)",
                        session_id,
                        trio.current_time() - last_ok,
                        type(exc).__name__,
                    )
                    if telemetry.active:
                        telemetry.emit(SessionEvent(kind="heartbeat_failed", session_id=session_id))
                    if report is not None:
                        report.heartbeat_failing(trio.current_time() - last_ok)
            else:
                last_ok = trio.current_time()
                warned = False


async def _finish_session(
    transport: Transport, session_id: str, reason: str, detail: str | None
) -> None:
    """Tell the server the session is over (PROTOCOL.md 2.2).

    Error handling: a 404 or 405 means a server without this optional endpoint and is logged
    once per process at debug (`_optional_endpoints`); any other failure is a WARNING on
    `tinkex_trio.service`. Nothing is raised: the block's own outcome matters more.
    """
    request = t.FinishSessionRequest(reason=t.FinishReason(type=reason), detail=detail)  # type: ignore[arg-type]
    try:
        await transport.request(
            "POST",
            f"/api/v1/sessions/{session_id}/finish",
            content=t.encode(request),
            policy=SESSION_FINISH,
        )
    except APIStatusError as exc:
        if is_missing_endpoint(exc):
            note_missing_endpoint("sessions/{session_id}/finish", exc.status_code)
            return
        _logger.warning("could not finish session %s as %s: %s", session_id, reason, exc)
    except APIError as exc:
        _logger.warning("could not finish session %s as %s: %s", session_id, reason, exc)


def _configure_logging(level_name: str, telemetry: Telemetry) -> None:
    """`TINKER_LOG=debug|info`: SDK logs (and one line per event at debug) on stderr."""
    level = logging.getLevelName(level_name.upper())
    sdk_logger = logging.getLogger("tinkex_trio")
    sdk_logger.setLevel(level)
    if not sdk_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        sdk_logger.addHandler(handler)
    if level <= logging.DEBUG:
        telemetry.attach_logger(logging.DEBUG)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


@asynccontextmanager
async def open_service(
    config: Config | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    telemetry_hub: Telemetry | None = None,
    **overrides: Any,
) -> AsyncIterator[ServiceClient]:
    """Open a session with a Tinker server; everything it starts ends with the block.

    Synopsis::

        async with open_service(base_url="http://127.0.0.1:8000", api_key="tml-...") as svc:
            training = await svc.create_lora_training_client("HuggingFaceTB/SmolLM2-135M-Instruct")

    `config` (or `Config.resolve(**overrides)`: arguments > environment > defaults) says where
    and how; `transport` replaces the default HTTP transport (e.g. `httpx.MockTransport`);
    `telemetry_hub` receives the SDK's events (default: a new hub, `ServiceClient.telemetry`).

    Raises:
        MissingAPIKeyError: no API key was given or found in the environment.
        APITimeoutError: the session could not be created within 60 s.
    """
    if config is None:
        config = Config.resolve(**overrides)
    elif overrides:
        raise TypeError("pass either config= or keyword settings, not both")
    if config.credential_cmd is None:
        config.require_api_key()
    telemetry = telemetry_hub if telemetry_hub is not None else Telemetry()
    if config.log_level is not None:
        _configure_logging(config.log_level, telemetry)
    http = Transport(config, transport=transport, telemetry=telemetry)
    user_error: BaseException | None = None
    to_raise: BaseException | None = None
    try:
        try:
            with trio.fail_after(SESSION_OPEN_TIMEOUT):
                client_config = await _fetch_client_config(http)
                http.billing_pause_max = client_config.billing_exception_max_pause_duration_sec
                if client_config.pjwt_auth_enabled:
                    # PROTOCOL.md 1.3: later requests carry an exchanged JWT.
                    http.auth.enable_jwt(client_config.credential_default_source)
                elif config.api_key is None:
                    # API-key mode: a credential command alone is not enough (1.3).
                    config.require_api_key()
                dynamic_config = DynamicConfig()
                await dynamic_config.load(http)
                session_id = await _create_session(config, http)
        except trio.TooSlowError:
            raise APITimeoutError(
                f"could not open a session with {config.base_url} within {SESSION_OPEN_TIMEOUT} s"
            ) from None
        if telemetry.active:
            telemetry.emit(SessionEvent(kind="created", session_id=session_id))
        try:
            async with trio.open_nursery() as nursery:
                ctx = ServiceContext(
                    config=config,
                    transport=http,
                    telemetry=telemetry,
                    poller=FuturePoller(
                        http,
                        telemetry,
                        response_budget=ByteBudget(
                            client_config.inflight_response_bytes_semaphore_size
                        ),
                    ),
                    nursery=nursery,
                    session_id=session_id,
                    client_config=client_config,
                    rate_limiter=RateLimiter(client_config.sample_dispatch_bytes_semaphore_size),
                    fwdbwd_budget=ByteBudget(client_config.fwdbwd_dispatch_bytes_semaphore_size),
                    dynamic_config=dynamic_config,
                    sample_canceller=SampleCanceller(http, dynamic_config),
                )
                report = ServerTelemetry(http, session_id) if config.telemetry else None
                if report is not None:
                    report.session_start()
                    await nursery.start(report.run)
                await nursery.start(_heartbeat, http, telemetry, session_id, report)
                if http.auth.jwt_enabled:
                    await nursery.start(http.auth.refresh_forever)
                if dynamic_config.supported:
                    await nursery.start(dynamic_config.refresh_forever, http)
                await nursery.start(ctx.sample_canceller.run)
                reason = "success"
                detail: str | None = None
                try:
                    yield ServiceClient(ctx)
                except Exception as exc:
                    user_error = exc
                    reason, detail = "errored", type(exc).__name__
                    raise
                except BaseException as exc:
                    user_error = exc
                    reason, detail = "interrupted", type(exc).__name__
                    raise
                finally:
                    ctx.closed = True
                    nursery.cancel_scope.cancel()
                    # Samples abandoned by the block's end are cancelled on the server before
                    # the session finishes (PROTOCOL.md 4.9), within a short bound.
                    with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_FLUSH_TIMEOUT):
                        await ctx.sample_canceller.flush()
                    with trio.CancelScope(shield=True), trio.move_on_after(SESSION_FINISH_TIMEOUT):
                        await _finish_session(http, session_id, reason, detail)
                    if report is not None:
                        if isinstance(user_error, Exception):
                            report.session_failed(user_error)
                        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_FLUSH_TIMEOUT):
                            await report.flush()
                    if telemetry.active:
                        telemetry.emit(SessionEvent(kind="finished", session_id=session_id))
        except BaseExceptionGroup as group:
            to_raise = _unwrap(group, user_error)
            if to_raise is None:
                raise
        if to_raise is not None:
            raise to_raise
    finally:
        with trio.CancelScope(shield=True):
            await http.aclose()


def _unwrap(
    group: BaseExceptionGroup[BaseException], user_error: BaseException | None
) -> BaseException | None:
    """The one exception `open_service` should raise for `group`, or None to raise the group."""
    leaves = _leaves(group)
    if user_error is not None and any(leaf is user_error for leaf in leaves):
        others = [leaf for leaf in leaves if leaf is not user_error]
        user_error.__context__ = (
            BaseExceptionGroup("other errors in open_service", others) if others else None
        )
        return user_error
    if len(leaves) == 1:
        leaves[0].__context__ = None
        return leaves[0]
    return None


__all__ = [
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_WARN_AFTER",
    "SESSION_FINISH_TIMEOUT",
    "SESSION_OPEN_TIMEOUT",
    "ServiceClient",
    "open_service",
]
