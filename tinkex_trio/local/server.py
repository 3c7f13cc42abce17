"""Run the local backend: `serve_local_backend` (a task), `open_local_backend` (a context
manager), and `main` (the `tinkex-trio serve` command).

All three build one `LocalBackendSettings` (`_settings.py`): `main` from its flags, the two
functions from `settings=` and/or their keyword arguments (`LocalBackendOptions`); it goes to
the app unchanged. The engine is the PyTorch engine for the settings' models unless `engine=`
gives another (`tinkex_trio.local.testing.FakeEngine`, for tests).

The API key is the one given, else the one stored in `<data_dir>/api_key`, else a new one
(`tml-` + random, so the official SDK accepts it, PROTOCOL.md 1.1) written there on first start.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Unpack

import trio

from tinkex_trio._cli_args import byte_size, non_negative_int, positive_int

from ._app import load_or_create_api_key, open_backend_app
from ._durable import DataDirectoryError, check_data_dir
from ._engine_api import Engine, ModelDirectoryError
from ._jwt import DEFAULT_JWT_LIFETIME
from ._settings import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
    DEFAULT_MAX_QUEUED_SAMPLES,
    DEFAULT_MAX_REQUEST_BODY,
    DEFAULT_MAX_RESIDENT_ADAPTERS,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_SEQ_GAP_TIMEOUT,
    DEFAULT_SESSION_TIMEOUT,
    LocalBackendOptions,
    LocalBackendSettings,
)
from ._store import StoreOpenError
from .model_locator import add_model_arguments, locate_models

logger = logging.getLogger("tinkex_trio.local.server")

DEFAULT_PORT = 8000  # for the CLI; the library functions default to an ephemeral port (0)
#: Seconds an idle keep-alive connection is kept. The SDK's pool reuses a connection within
#: milliseconds while it works and checks a stale one before reuse (STYLE.md 4.8), so a short
#: wait loses nothing, while a long one (hypercorn's old 75 s here) keeps the sockets of
#: clients that went away. Hypercorn runs this timer until a whole request head is parsed, so
#: it is also the time a client has to send a head: a connection that sends nothing, or half
#: a head, is closed after it.
KEEP_ALIVE_TIMEOUT = 5


@dataclass(frozen=True)
class LocalBackend:
    """What `open_local_backend` yields: where the server listens and how to authenticate."""

    base_url: str
    api_key: str
    data_dir: Path


def _default_engine(settings: LocalBackendSettings) -> Engine:
    """The PyTorch engine (imported lazily: torch is heavy and optional)."""
    from tinkex_trio.local.engine import TorchEngine  # type: ignore[attr-defined,unused-ignore]

    kwargs: dict[str, Any] = {
        "extra_models": dict(settings.extra_models) or None,
        "dtype": settings.dtype,
        "max_model_memory": settings.max_model_memory,
    }
    if settings.models is not None:
        kwargs["models"] = settings.models
    engine: Engine = TorchEngine(**kwargs)
    return engine


def _base_url(binds: list[str]) -> str:
    for bind in binds:
        if bind.startswith("http://"):
            return bind.rstrip("/")
    return binds[0].rstrip("/")


async def serve_local_backend(
    settings: LocalBackendSettings | None = None,
    *,
    engine: Engine | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[LocalBackendOptions],
) -> None:
    """Serve the backend until cancelled; `task_status.started(base_url)` once it listens.

    Usage: `url = await nursery.start(functools.partial(serve_local_backend, data_dir=...))`.
    The options are `LocalBackendSettings`' fields, given as `settings=` or as keywords (which
    override `settings`), e.g. `client_flags={"fwdbwd_max_chunk_len": 2}`,
    `max_queued_samples=64`, `jwt_auth=True`. With `port=0` (the default here) the OS picks a
    free port and the started value tells which.

    Raises:
        ValueError: an option is out of range (`LocalBackendSettings`).
        TypeError: an unknown keyword.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    settings = LocalBackendSettings.build(settings, **options)
    if engine is None:
        engine = _default_engine(settings)
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tinkex_trio.local.hypercorn")
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    # Every socket read gives up after this (the app's own 408 for a stalled body comes at the
    # same time). Long polls are unaffected: hypercorn does not read while a response is
    # pending, which also means a client closing during a long poll is noticed when it answers.
    config.read_timeout = settings.read_timeout  # type: ignore[assignment]
    async with open_backend_app(settings, engine) as app:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serve, app, config)
            task_status.started(_base_url(binds))


@asynccontextmanager
async def open_local_backend(
    settings: LocalBackendSettings | None = None,
    *,
    engine: Engine | None = None,
    **options: Unpack[LocalBackendOptions],
) -> AsyncIterator[LocalBackend]:
    """Run the backend as a child task while the block runs; yield its URL and key.

    Takes the options of `serve_local_backend`. The server is listening (and the store open)
    when the block starts; leaving the block stops it and leaves nothing running.

    Raises:
        DataDirectoryError: the data directory is not a directory or not writable.
    """
    settings = LocalBackendSettings.build(settings, **options)
    check_data_dir(settings.data_dir)  # raised here, unwrapped, before any task starts
    if settings.api_key is None:
        settings = replace(settings, api_key=load_or_create_api_key(settings.data_dir))
    key = settings.api_key
    assert key is not None
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(_serve, settings, engine)
        try:
            yield LocalBackend(base_url=url, api_key=key, data_dir=settings.data_dir)
        finally:
            nursery.cancel_scope.cancel(reason="open_local_backend block exited")


async def _serve(
    settings: LocalBackendSettings,
    engine: Engine | None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_local_backend(settings, engine=engine, task_status=task_status)


def _settings_from_argv(argv: Sequence[str] | None) -> LocalBackendSettings:
    """The settings `tinkex-trio serve` runs with; exits with usage (2) on a bad flag."""
    parser = argparse.ArgumentParser(prog="tinkex-trio serve", description=main.__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--api-key", default=None)
    add_model_arguments(parser)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="how base weights are kept in memory; computation is float32 either way "
        "(bfloat16: half the memory, log-probs of the bf16-rounded weights; default float32)",
    )
    parser.add_argument(
        "--max-model-memory",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="refuse to start if the served models' weights need more than SIZE (e.g. 8G; "
        "default: the memory available at start-up)",
    )
    parser.add_argument(
        "--max-queued-samples",
        type=positive_int,
        default=DEFAULT_MAX_QUEUED_SAMPLES,
        metavar="N",
        help="answer asample with 429 (back off) once N sampling requests wait for the engine "
        f"(default {DEFAULT_MAX_QUEUED_SAMPLES})",
    )
    parser.add_argument(
        "--jwt",
        action="store_true",
        help="JWT-exchange auth (PROTOCOL.md 1.3): clients trade the API key for short-lived "
        "tokens at /api/v1/auth/token",
    )
    parser.add_argument(
        "--jwt-lifetime",
        type=float,
        default=DEFAULT_JWT_LIFETIME,
        metavar="SECONDS",
        help=f"lifetime of the tokens issued with --jwt (default {DEFAULT_JWT_LIFETIME:g})",
    )
    _add_service_arguments(parser)
    args = parser.parse_args(argv)
    if not args.jwt_lifetime > 0:
        parser.error("--jwt-lifetime must be positive")
    try:
        located = locate_models(args.model, args.model_name)
    except ModelDirectoryError:
        raise  # one line and exit 2 (`main`), not a usage message
    except ValueError as exc:
        parser.error(str(exc))
    check_data_dir(args.data_dir)  # one line and exit 2 (`main`), before anything is written
    api_key = args.api_key if args.api_key is not None else load_or_create_api_key(args.data_dir)
    try:
        return LocalBackendSettings(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            api_key=api_key,
            extra_models={model.name: model.directory for model in located},
            dtype=args.dtype,
            max_model_memory=args.max_model_memory,
            max_queued_samples=args.max_queued_samples,
            jwt_auth=args.jwt,
            jwt_lifetime=args.jwt_lifetime,
            session_timeout=args.session_timeout or None,
            seq_gap_timeout=args.seq_gap_timeout,
            max_resident_adapters=args.max_resident_adapters or None,
            max_request_body=args.max_request_body,
            max_body_bytes_in_flight=args.max_body_bytes_in_flight,
            read_timeout=args.read_timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))


def _add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a long-running, shared server: expiry, memory and input bounds."""
    group = parser.add_argument_group("long-running service")
    group.add_argument(
        "--session-timeout",
        type=float,
        default=DEFAULT_SESSION_TIMEOUT,
        metavar="SECONDS",
        help="finish a session as expired after this long without a heartbeat, releasing its "
        f"adapters (its runs stay and revive from checkpoints; 0: never; default "
        f"{DEFAULT_SESSION_TIMEOUT:g})",
    )
    group.add_argument(
        "--seq-gap-timeout",
        type=float,
        default=DEFAULT_SEQ_GAP_TIMEOUT,
        metavar="SECONDS",
        help="fail training requests that waited this long for a missing earlier seq_id "
        f"(default {DEFAULT_SEQ_GAP_TIMEOUT:g})",
    )
    group.add_argument(
        "--max-resident-adapters",
        type=non_negative_int,
        default=DEFAULT_MAX_RESIDENT_ADAPTERS,
        metavar="N",
        help="keep at most N live training adapters in memory; idle ones beyond it are "
        f"offloaded to disk and reloaded on next use (0: no limit; default "
        f"{DEFAULT_MAX_RESIDENT_ADAPTERS})",
    )
    group.add_argument(
        "--max-request-body",
        type=byte_size,
        default=DEFAULT_MAX_REQUEST_BODY,
        metavar="SIZE",
        help=f"answer 413 to larger request bodies (default {DEFAULT_MAX_REQUEST_BODY >> 20}M)",
    )
    group.add_argument(
        "--max-body-bytes-in-flight",
        type=byte_size,
        default=DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
        metavar="SIZE",
        help="answer 503 (retry later) while request bodies being read together would exceed "
        f"SIZE (default {DEFAULT_MAX_BODY_BYTES_IN_FLIGHT >> 20}M)",
    )
    group.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        metavar="SECONDS",
        help="answer 408 and drop a request whose body stalls this long (a request head must "
        f"arrive within {KEEP_ALIVE_TIMEOUT} s in any case; default {DEFAULT_READ_TIMEOUT:g})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`tinkex-trio serve`: run the local backend in the foreground until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = _settings_from_argv(argv)
        # Built before serving so a model it cannot serve faithfully (or that does not fit the
        # memory allowed) stops start-up with one line.
        engine = _default_engine(settings)
    except (ModelDirectoryError, DataDirectoryError) as exc:
        print(f"tinkex-trio serve: {exc}", file=sys.stderr, flush=True)
        return 2

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(_serve, settings, engine)
            print(f"tinkex-trio local backend listening on {url}", flush=True)
            print(f"  export TINKER_BASE_URL={url}", flush=True)
            print(f"  export TINKER_API_KEY={settings.api_key}", flush=True)
            print(f"  data directory: {settings.data_dir.resolve()}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    except (DataDirectoryError, StoreOpenError) as exc:
        print(f"tinkex-trio serve: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseExceptionGroup as group:
        # Ctrl-C arrives wrapped by the nurseries it crossed; anything else is a real error.
        _interrupts, rest = group.split(KeyboardInterrupt)
        unusable = rest.subgroup((DataDirectoryError, StoreOpenError)) if rest else None
        if unusable is not None and unusable.exceptions and rest is not None:
            first = _first_leaf(unusable)
            print(f"tinkex-trio serve: {first}", file=sys.stderr, flush=True)
            return 2
        if rest is not None:
            raise
    print("tinkex-trio local backend stopped", flush=True)
    return 0


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
