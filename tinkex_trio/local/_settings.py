"""Every option of the local backend in one frozen value: `LocalBackendSettings`.

It is built once, by `tinkex-trio serve` from its flags or by `open_local_backend(...)` /
`serve_local_backend(...)` from their keyword arguments (or given to them as `settings=`), and
flows unchanged to the app (`_app.py`) and the routes. An option is declared here, in the
dataclass and in `LocalBackendOptions` (the keyword form, checked against each other by the
tests), and nowhere else on the way down; its check is in `__post_init__`, so a bad value is
refused with a `ValueError` naming the option before anything starts.

The defaults and why they were chosen sit next to each other below.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypedDict

import msgspec

from tinkex_trio.types import ClientConfigResponse

from ._jwt import DEFAULT_JWT_LIFETIME

__all__ = [
    "DEFAULT_CLIENT_FLAGS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES_IN_FLIGHT",
    "DEFAULT_MAX_QUEUED_SAMPLES",
    "DEFAULT_MAX_REQUEST_BODY",
    "DEFAULT_MAX_RESIDENT_ADAPTERS",
    "DEFAULT_METADATA_ONLY_THRESHOLD",
    "DEFAULT_POLL_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_SEQ_GAP_TIMEOUT",
    "DEFAULT_SESSION_TIMEOUT",
    "LocalBackendOptions",
    "LocalBackendSettings",
]

#: A project-local directory keeps checkpoints next to the code that made them and is easy to
#: find and delete; `data_dir=` / `--data-dir` puts it elsewhere.
DEFAULT_DATA_DIR: Final = Path("tinkex-data")
#: Loopback only: the backend is a development server (DESIGN.md "The local backend").
DEFAULT_HOST: Final = "127.0.0.1"
#: How long a `retrieve_future` poll is held before answering `try_again`. PROTOCOL.md A.3.7
#: recommends well under the client's 45 s poll timeout (<= 30 s); 20 s leaves room for slow
#: networks while keeping the number of polls (and client WARNING lines) low.
DEFAULT_POLL_TIMEOUT: Final = 20.0
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
#: The `client/config` flags (PROTOCOL.md 2.1) where the local backend differs from an official
#: server's defaults, unless `client_flags` overrides them: the official SDK's httpx transport
#: (pyqwest buys nothing on loopback), session-wide completion polling (4.8), and server-side
#: custom losses (8.8), both of which this backend serves. `pjwt_auth_enabled` follows
#: `jwt_auth`.
DEFAULT_CLIENT_FLAGS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "use_pyqwest_transport": False,
        "sample_use_retrieve_futures": True,
        "custom_loss_server_side": True,
    }
)

#: PROTOCOL.md 9.7: the SDK heartbeats every 10 s and warns after 120 s without success. Five
#: minutes is many missed heartbeats (a laptop lid closed, a network blip) yet frees what a
#: vanished client held well before it matters on a shared machine.
DEFAULT_SESSION_TIMEOUT: Final = 300.0
#: How long a training request waits for a missing earlier seq_id (PROTOCOL.md 5.2). The SDK
#: sends in order over concurrent connections, so a normal gap closes in milliseconds; a lost
#: submit is retried (9.3) well within two minutes, after which the gap is "permanent".
DEFAULT_SEQ_GAP_TIMEOUT: Final = 120.0
#: Live training adapters (LoRA tensors + AdamW moments) kept in memory; idle ones beyond this
#: are written to `<data_dir>/offload/` and read back on next use. Each costs ~60 MB at rank 32
#: on SmolLM2-135M (weights + two moments), so 8 bound them to about half a GB.
DEFAULT_MAX_RESIDENT_ADAPTERS: Final = 8
#: Largest request body. The SDK's forward_backward chunks are at most ~5 MB by its own estimate
#: (`fwdbwd_max_chunk_bytes_count`, PROTOCOL.md 2.1), a few times that as JSON numbers; 64 MiB
#: leaves ample room while one request cannot make the server hold hundreds of MB.
DEFAULT_MAX_REQUEST_BODY: Final = 64 * 1024 * 1024
#: Request-body bytes all requests together may hold while being read: beyond it a request is
#: answered 503 with `retry-after` (and retried by clients, PROTOCOL.md 9.3) rather than read.
#: Four maximal bodies at once, as four clients' forward_backward chunks.
DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: Final = 4 * DEFAULT_MAX_REQUEST_BODY
#: Seconds a connection may take to send a request's head, and may stall between pieces of its
#: body, before it is dropped (a client that sends headers and then nothing holds a connection
#: and a task otherwise).
DEFAULT_READ_TIMEOUT: Final = 30.0

_FLAG_NAMES: Final = frozenset(ClientConfigResponse.__struct_fields__)
_DTYPES: Final = frozenset({"float32", "bfloat16"})


class LocalBackendOptions(TypedDict, total=False):
    """The keyword form of `LocalBackendSettings`, for `open_local_backend(**options)`."""

    host: str
    port: int
    data_dir: str | Path
    api_key: str | None
    models: Sequence[str] | None
    extra_models: Mapping[str, str | Path] | None
    poll_timeout: float
    client_flags: Mapping[str, Any] | None
    max_queued_samples: int | None
    metadata_only_threshold: int | None
    jwt_auth: bool
    jwt_lifetime: float
    dtype: str
    max_model_memory: int | None
    session_timeout: float | None
    seq_gap_timeout: float
    max_resident_adapters: int | None
    max_request_body: int
    max_body_bytes_in_flight: int
    read_timeout: float


@dataclass(frozen=True, kw_only=True)
class LocalBackendSettings:
    """How to run the local backend; every field is a `tinkex-trio serve` option.

    * `host`, `port`: where to listen (port 0: any free port; the URL says which).
    * `data_dir`: SQLite state, checkpoints, the API key and the signing secret.
    * `api_key`: the key clients must send; None: `<data_dir>/api_key`, created on first start.
    * `models`: which built-in models to serve (None: all); `extra_models`: more models by
      name, from Hugging Face-layout directories (checked at start-up).
    * `poll_timeout`: seconds a `retrieve_future` poll is held before `try_again`.
    * `client_flags`: `client/config` flags over `DEFAULT_CLIENT_FLAGS` (PROTOCOL.md 2.1),
      e.g. `{"proto_compress_fwdbwd": True, "fwdbwd_max_chunk_len": 2}`.
    * `max_queued_samples`: `asample` answers 429 beyond this many requests waiting for the
      engine (PROTOCOL.md 9.5; None: unlimited).
    * `metadata_only_threshold`: larger results are announced metadata-only first
      (PROTOCOL.md 4.4; None: never).
    * `jwt_auth`: JWT-exchange auth (PROTOCOL.md 1.3), tokens valid for `jwt_lifetime` s;
      the raw API key stays valid too.
    * `dtype`: how base weights are held, `"float32"` or `"bfloat16"` (computation stays
      float32); `max_model_memory`: refuse to start if the weights need more bytes than this
      (None: the memory available at start-up).
    * `session_timeout`: a session with no heartbeat for this many seconds is finished as
      expired and what it holds in the engine is released (None: never).
    * `seq_gap_timeout`: seconds a training request waits for a missing earlier `seq_id`
      before it (and whatever waits behind the gap) fails, naming the gap.
    * `max_resident_adapters`: live training adapters kept in memory; the least recently used
      idle ones beyond this are offloaded to disk and reloaded on next use (None: no limit).
    * `max_request_body`: largest request body in bytes (413 beyond it);
      `max_body_bytes_in_flight`: body bytes all requests together may hold while being read
      (503 with `retry-after` beyond it).
    * `read_timeout`: seconds a client may stall inside a request body (or between socket
      reads) before the request is answered 408 and dropped; a request head must arrive
      within the server's keep-alive timeout (5 s) in any case.

    Raises:
        ValueError: an option is out of range, or `client_flags` names a flag that
            `client/config` does not have or gives it a value of the wrong type.
    """

    host: str = DEFAULT_HOST
    port: int = 0
    data_dir: Path = DEFAULT_DATA_DIR
    api_key: str | None = None
    models: tuple[str, ...] | None = None
    extra_models: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    poll_timeout: float = DEFAULT_POLL_TIMEOUT
    client_flags: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    max_queued_samples: int | None = DEFAULT_MAX_QUEUED_SAMPLES
    metadata_only_threshold: int | None = DEFAULT_METADATA_ONLY_THRESHOLD
    jwt_auth: bool = False
    jwt_lifetime: float = DEFAULT_JWT_LIFETIME
    dtype: str = "float32"
    max_model_memory: int | None = None
    session_timeout: float | None = DEFAULT_SESSION_TIMEOUT
    seq_gap_timeout: float = DEFAULT_SEQ_GAP_TIMEOUT
    max_resident_adapters: int | None = DEFAULT_MAX_RESIDENT_ADAPTERS
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY
    max_body_bytes_in_flight: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT
    read_timeout: float = DEFAULT_READ_TIMEOUT

    def __post_init__(self) -> None:
        # Normalise what the keyword form accepts loosely (str paths, lists, dicts, None),
        # and freeze the containers, so the value cannot change under the running server.
        freeze = object.__setattr__
        freeze(self, "data_dir", Path(self.data_dir))
        if self.models is not None:
            freeze(self, "models", tuple(self.models))
        extra = {str(k): Path(v) for k, v in (self.extra_models or {}).items()}
        freeze(self, "extra_models", MappingProxyType(extra))
        freeze(self, "client_flags", MappingProxyType(dict(self.client_flags or {})))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if not (math.isfinite(self.poll_timeout) and self.poll_timeout >= 0):
            raise ValueError(f"poll_timeout must be >= 0 seconds, got {self.poll_timeout!r}")
        if self.max_queued_samples is not None and self.max_queued_samples < 1:
            raise ValueError(
                f"max_queued_samples must be >= 1 or None, got {self.max_queued_samples!r}"
            )
        if self.metadata_only_threshold is not None and self.metadata_only_threshold < 0:
            raise ValueError(
                "metadata_only_threshold must be >= 0 or None, got "
                f"{self.metadata_only_threshold!r}"
            )
        if not (math.isfinite(self.jwt_lifetime) and self.jwt_lifetime > 0):
            raise ValueError(f"jwt_lifetime must be positive, got {self.jwt_lifetime!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_model_memory is not None and self.max_model_memory < 1:
            raise ValueError(
                f"max_model_memory must be >= 1 byte or None, got {self.max_model_memory!r}"
            )
        for name in ("session_timeout", "seq_gap_timeout", "read_timeout"):
            value = getattr(self, name)
            if name == "session_timeout" and value is None:
                continue
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_resident_adapters is not None and self.max_resident_adapters < 1:
            raise ValueError(
                f"max_resident_adapters must be >= 1 or None, got {self.max_resident_adapters!r}"
            )
        if self.max_request_body < 1:
            raise ValueError(f"max_request_body must be >= 1 byte, got {self.max_request_body!r}")
        if self.max_body_bytes_in_flight < self.max_request_body:
            raise ValueError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be at least "
                f"max_request_body ({self.max_request_body}), or no maximal request could be read"
            )
        unknown = sorted(set(self.client_flags) - _FLAG_NAMES)
        if unknown:
            raise ValueError(
                f"client_flags has unknown flags {unknown}; client/config has {sorted(_FLAG_NAMES)}"
            )
        self.client_config()  # type-checks every flag's value

    @classmethod
    def build(
        cls, settings: LocalBackendSettings | None = None, **options: Any
    ) -> LocalBackendSettings:
        """`settings` (or the defaults) with the keyword options (`LocalBackendOptions`) over it.

        The keyword form accepts what the dataclass normalises (a `str` data_dir, lists,
        dicts); an unknown keyword is a `TypeError` naming it.
        """
        if settings is None:
            return cls(**options)
        return dataclasses.replace(settings, **options) if options else settings

    def client_config(self) -> ClientConfigResponse:
        """The `client/config` answer (PROTOCOL.md 2.1): defaults, then the settings' flags."""
        flags = {
            **DEFAULT_CLIENT_FLAGS,
            "pjwt_auth_enabled": self.jwt_auth,
            **self.client_flags,
        }
        try:
            return msgspec.convert(flags, ClientConfigResponse, strict=True)
        except msgspec.ValidationError as exc:
            raise ValueError(f"client_flags: {exc}") from None
