"""Run the local backend: `serve_local_backend` (a task), `open_local_backend` (a context
manager), and `main` (the `tinkex-trio serve` command).

Default data directory: `./tinkex-data` in the current directory. A project-local directory
keeps checkpoints next to the code that made them and is easy to find and delete; pass
`data_dir=` (or `--data-dir`) to put it elsewhere.

The API key is the one given, else the one stored in `<data_dir>/api_key`, else a new one
(`tml-` + random, so the official SDK accepts it, PROTOCOL.md 1.1) written there on first start.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tinkex_trio.cli import byte_size, positive_int

from ._app import (
    DEFAULT_MAX_QUEUED_SAMPLES,
    DEFAULT_METADATA_ONLY_THRESHOLD,
    load_or_create_api_key,
    open_backend_app,
)
from ._engine_api import Engine, ModelDirectoryError
from ._futures import DEFAULT_POLL_TIMEOUT
from ._jwt import DEFAULT_JWT_LIFETIME
from .model_locator import add_model_arguments, locate_models

logger = logging.getLogger("tinkex_trio.local.server")

DEFAULT_DATA_DIR = Path("tinkex-data")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000  # for the CLI; the library functions default to an ephemeral port (0)


@dataclass(frozen=True)
class LocalBackend:
    """What `open_local_backend` yields: where the server listens and how to authenticate."""

    base_url: str
    api_key: str
    data_dir: Path


def _default_engine(
    models: Sequence[str] | None,
    extra_models: dict[str, str] | None,
    *,
    dtype: str = "float32",
    max_model_memory: int | None = None,
) -> Engine:
    """The PyTorch engine (imported lazily: torch is heavy and optional)."""
    from tinkex_trio.local.engine import TorchEngine  # type: ignore[attr-defined,unused-ignore]

    extra = {name: Path(path) for name, path in (extra_models or {}).items()}
    kwargs: dict[str, Any] = {
        "extra_models": extra or None,
        "dtype": dtype,
        "max_model_memory": max_model_memory,
    }
    if models is not None:
        kwargs["models"] = tuple(models)
    engine: Engine = TorchEngine(**kwargs)
    return engine


def _base_url(binds: list[str]) -> str:
    for bind in binds:
        if bind.startswith("http://"):
            return bind.rstrip("/")
    return binds[0].rstrip("/")


async def serve_local_backend(
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    api_key: str | None = None,
    engine: Engine | None = None,
    models: Sequence[str] | None = None,
    extra_models: dict[str, str] | None = None,
    poll_timeout: float = DEFAULT_POLL_TIMEOUT,
    client_flags: dict[str, Any] | None = None,
    max_queued_samples: int | None = DEFAULT_MAX_QUEUED_SAMPLES,
    metadata_only_threshold: int | None = DEFAULT_METADATA_ONLY_THRESHOLD,
    jwt_auth: bool = False,
    jwt_lifetime: float = DEFAULT_JWT_LIFETIME,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the backend until cancelled; `task_status.started(base_url)` once it listens.

    Usage: `url = await nursery.start(functools.partial(serve_local_backend, data_dir=...))`.
    With `port=0` the OS picks a free port and the started value tells which.
    `client_flags` override the `client/config` flags (PROTOCOL.md 2.1), e.g.
    `{"proto_compress_fwdbwd": True, "fwdbwd_max_chunk_len": 2}`.
    `max_queued_samples` bounds the sampling requests waiting for the engine; beyond it
    `asample` answers 429 and the SDK backs off (PROTOCOL.md 9.5; None: unlimited).
    Results larger than `metadata_only_threshold` bytes are first answered metadata-only
    (PROTOCOL.md 4.4; None: never). `jwt_auth=True`: JWT-exchange auth (PROTOCOL.md 1.3),
    tokens valid for `jwt_lifetime` seconds; the raw API key stays valid too.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    if engine is None:
        engine = _default_engine(models, extra_models)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tinkex_trio.local.hypercorn")
    # Polls are long-held (PROTOCOL.md A.3.7): keep idle keep-alive connections around longer.
    config.keep_alive_timeout = 75
    async with open_backend_app(
        data_dir=Path(data_dir),
        engine=engine,
        api_key=api_key,
        poll_timeout=poll_timeout,
        client_flags=client_flags,
        max_queued_samples=max_queued_samples,
        metadata_only_threshold=metadata_only_threshold,
        jwt_auth=jwt_auth,
        jwt_lifetime=jwt_lifetime,
    ) as app:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serve, app, config)
            task_status.started(_base_url(binds))


@asynccontextmanager
async def open_local_backend(
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    api_key: str | None = None,
    engine: Engine | None = None,
    models: Sequence[str] | None = None,
    extra_models: dict[str, str] | None = None,
    poll_timeout: float = DEFAULT_POLL_TIMEOUT,
    client_flags: dict[str, Any] | None = None,
    max_queued_samples: int | None = DEFAULT_MAX_QUEUED_SAMPLES,
    metadata_only_threshold: int | None = DEFAULT_METADATA_ONLY_THRESHOLD,
    jwt_auth: bool = False,
    jwt_lifetime: float = DEFAULT_JWT_LIFETIME,
) -> AsyncIterator[LocalBackend]:
    """Run the backend as a child task while the block runs; yield its URL and key.

    The server is listening (and the store open) when the block starts; leaving the block
    stops it and leaves nothing running.
    """
    data_dir = Path(data_dir)
    key = api_key if api_key is not None else load_or_create_api_key(data_dir)
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(
            _serve_partial,
            dict(
                host=host,
                port=port,
                data_dir=data_dir,
                api_key=key,
                engine=engine,
                models=models,
                extra_models=extra_models,
                poll_timeout=poll_timeout,
                client_flags=client_flags,
                max_queued_samples=max_queued_samples,
                metadata_only_threshold=metadata_only_threshold,
                jwt_auth=jwt_auth,
                jwt_lifetime=jwt_lifetime,
            ),
        )
        try:
            yield LocalBackend(base_url=url, api_key=key, data_dir=data_dir)
        finally:
            nursery.cancel_scope.cancel(reason="open_local_backend block exited")


async def _serve_partial(
    kwargs: dict[str, Any], *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    await serve_local_backend(**kwargs, task_status=task_status)


def main(argv: Sequence[str] | None = None) -> int:
    """`tinkex-trio serve`: run the local backend in the foreground until Ctrl-C."""
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
    args = parser.parse_args(argv)
    if not args.jwt_lifetime > 0:
        parser.error("--jwt-lifetime must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        located = locate_models(args.model, args.model_name)
    except ValueError as exc:
        if isinstance(exc, ModelDirectoryError):
            print(f"tinkex-trio serve: {exc}", file=sys.stderr, flush=True)
            return 2
        parser.error(str(exc))
    extra = {model.name: str(model.directory) for model in located}
    try:
        # Built before serving so a model it cannot serve faithfully (or that does not fit
        # the memory allowed) stops start-up with one line.
        engine = _default_engine(
            None, extra or None, dtype=args.dtype, max_model_memory=args.max_model_memory
        )
    except ModelDirectoryError as exc:
        print(f"tinkex-trio serve: {exc}", file=sys.stderr, flush=True)
        return 2
    key = args.api_key if args.api_key is not None else load_or_create_api_key(args.data_dir)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(
                _serve_partial,
                dict(
                    host=args.host,
                    port=args.port,
                    data_dir=args.data_dir,
                    api_key=key,
                    engine=engine,
                    max_queued_samples=args.max_queued_samples,
                    jwt_auth=args.jwt,
                    jwt_lifetime=args.jwt_lifetime,
                ),
            )
            print(f"tinkex-trio local backend listening on {url}", flush=True)
            print(f"  export TINKER_BASE_URL={url}", flush=True)
            print(f"  export TINKER_API_KEY={key}", flush=True)
            print(f"  data directory: {args.data_dir.resolve()}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        # Ctrl-C arrives wrapped by the nurseries it crossed; anything else is a real error.
        _interrupts, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            raise
    print("tinkex-trio local backend stopped", flush=True)
    return 0
