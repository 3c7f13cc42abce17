"""Client configuration: explicit arguments > environment > defaults (PROTOCOL.md 1.1, 1.2, 1.5).

Synopsis::

    config = Config.resolve()                       # from os.environ, with defaults
    config = Config.resolve(base_url="http://127.0.0.1:8000", api_key="tml-...")
    config = Config.from_env({"TINKER_API_KEY": "tml-..."}, timeout=30)

A :class:`Config` is immutable and validated once, when it is built: a bad value raises
``ValueError`` naming the setting and how to fix it, so a typo fails at start-up rather than on the
first request. ``dataclasses.replace(config, ...)`` gives a modified, re-validated copy.

Secrets: the API key (and the Cloudflare secret, and the values of ``extra_headers``) are masked in
``repr``/``str``; only the last four characters of a long key are shown, so a config can be logged.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping
from typing import Any, Final, Literal, final
from urllib.parse import urlsplit

from tinkex_trio.errors import MissingAPIKeyError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_CF_CLIENT_ID",
    "ENV_CF_CLIENT_SECRET",
    "ENV_CREDENTIAL_CMD",
    "ENV_LOG",
    "ENV_PROJECT_ID",
    "ENV_TAGS",
    "ENV_TELEMETRY",
    "Config",
]

DEFAULT_BASE_URL: Final = "https://tinker.thinkingmachines.dev/services/tinker-prod"
"""The hosted service (PROTOCOL.md 1.2)."""

DEFAULT_TIMEOUT: Final = 60.0
"""Seconds per request, read and total (PROTOCOL.md 1.5)."""

DEFAULT_CONNECT_TIMEOUT: Final = 5.0
"""Seconds to open a connection (PROTOCOL.md 1.5)."""

DEFAULT_MAX_RETRIES: Final = 10
"""Layer-A retries per call (PROTOCOL.md 9.3)."""

# Environment variables (PROTOCOL.md 1.1).
ENV_API_KEY: Final = "TINKER_API_KEY"
ENV_BASE_URL: Final = "TINKER_BASE_URL"
ENV_PROJECT_ID: Final = "TINKER_PROJECT_ID"
ENV_TAGS: Final = "TINKER_TAGS"
ENV_TELEMETRY: Final = "TINKER_TELEMETRY"
ENV_LOG: Final = "TINKER_LOG"
ENV_CF_CLIENT_ID: Final = "CLOUDFLARE_ACCESS_CLIENT_ID"
ENV_CF_CLIENT_SECRET: Final = "CLOUDFLARE_ACCESS_CLIENT_SECRET"
ENV_CREDENTIAL_CMD: Final = "TINKER_CREDENTIAL_CMD"

# PROTOCOL.md 1.1: telemetry stays on unless TINKER_TELEMETRY is something other than these.
_TRUTHY: Final = frozenset({"1", "true", "yes", "on"})
_LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error"})

_MISSING_KEY_HELP: Final = (
    "No Tinker API key is configured. Set the TINKER_API_KEY environment variable or pass "
    "api_key=... (for example Config.resolve(api_key='tml-...')). "
    "To work without an account, run the local backend: start `tinkex-trio serve` and point "
    "base_url (or TINKER_BASE_URL) at the URL and key it prints, or use "
    "`async with open_local_backend() as backend:` in your program."
)


def _mask(secret: str | None) -> str:
    """Never show a secret: ``None``, ``'…abcd'`` for long values, ``'<set>'`` for short ones."""
    if secret is None:
        return "None"
    if len(secret) >= 16:
        return f"'…{secret[-4:]}'"
    return "'<set>'"


def _frozen_mapping(value: Mapping[str, str], name: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(
            f"Config.{name} must be a mapping of str to str, got {type(value).__name__}"
        )
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(
                f"Config.{name} must map str to str; entry {k!r} has a {type(v).__name__} value. "
                "Convert values with str() first."
            )
    return types.MappingProxyType(dict(value))


def _check_header_value(value: str, name: str) -> None:
    # A CR or LF in a header value would let a setting inject extra header lines.
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(
            f"Config.{name} contains a line break or NUL; remove it (check for a trailing newline)"
        )


@final
@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Config:
    """Everything the SDK needs to reach a Tinker server.

    Build one with :meth:`resolve` (environment from ``os.environ``) or :meth:`from_env`; the
    constructor itself applies no environment. Fields:

    - ``api_key``: the credential sent as ``X-API-Key`` (PROTOCOL.md 1.3). May be None until a
      request needs it; :meth:`require_api_key` raises :class:`MissingAPIKeyError` then.
    - ``base_url``: scheme, host and optional path prefix; a trailing ``/`` is stripped and request
      paths (``/api/v1/...``) are appended after the prefix (PROTOCOL.md 1.2).
    - ``timeout`` / ``connect_timeout``: seconds per request / per connection attempt (1.5).
    - ``max_retries``: layer-A retries per call; 0 turns them off (9.3).
    - ``project_id``, ``tags``, ``user_metadata``: sent in ``create_session`` (3.1).
    - ``telemetry``: whether the SDK reports session start and a failing block's exception to
      the server's telemetry endpoint (3.1; `tinkex_trio._server_telemetry`).
    - ``log_level``: ``"debug"``/``"info"``/... from ``TINKER_LOG``, or None (logging untouched).
    - ``extra_headers``: added to every request (after the SDK's own headers).
    - ``cf_access_client_id`` / ``cf_access_client_secret``: Cloudflare Access headers (1.1).
    - ``wire_format``: ``"json"`` (default) or ``"protobuf"`` for the payloads of PROTOCOL.md 6.
    - ``credential_cmd``: a shell command whose stripped output is the credential, used when no
      ``api_key`` is set or when the server asks for it (``TINKER_CREDENTIAL_CMD``, PROTOCOL.md
      1.1, 1.3). Alone it works only with a server in JWT-exchange mode.

    Raises:
        ValueError: at construction, naming the bad setting and the fix.
    """

    api_key: str | None = None
    base_url: str = DEFAULT_BASE_URL
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    project_id: str | None = None
    tags: tuple[str, ...] = ()
    user_metadata: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), hash=False
    )
    telemetry: bool = True
    log_level: str | None = None
    extra_headers: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), hash=False
    )
    cf_access_client_id: str | None = None
    cf_access_client_secret: str | None = None
    wire_format: Literal["json", "protobuf"] = "json"
    credential_cmd: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through object.__setattr__, once

        if self.api_key is not None:
            if not isinstance(self.api_key, str) or not self.api_key.strip():
                raise ValueError(
                    "Config.api_key is empty; pass api_key='tml-...' or set TINKER_API_KEY "
                    "(or leave both unset and call require_api_key() only when needed)"
                )
            set_(self, "api_key", self.api_key.strip())
            _check_header_value(self.api_key, "api_key")

        base = self.base_url
        if not isinstance(base, str):
            raise ValueError(f"Config.base_url must be a str, got {type(base).__name__}")
        base = base.strip().rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"Config.base_url {self.base_url!r} is not an http(s) URL with a host; use e.g. "
                f"{DEFAULT_BASE_URL!r} or 'http://127.0.0.1:8000' (set via base_url= or TINKER_BASE_URL)"
            )
        if parts.query or parts.fragment:
            raise ValueError(
                f"Config.base_url {self.base_url!r} must not have a query or fragment; "
                "keep only scheme://host[:port][/prefix]"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"Config.base_url {self.base_url!r} has an invalid port") from None
        set_(self, "base_url", base)

        for name in ("timeout", "connect_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"Config.{name} must be a positive number of seconds, got {value!r}"
                )
            set_(self, name, float(value))

        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ValueError(
                f"Config.max_retries must be an int >= 0 (0 turns retries off), got {self.max_retries!r}"
            )

        if self.project_id is not None and (
            not isinstance(self.project_id, str) or not self.project_id
        ):
            raise ValueError("Config.project_id must be a non-empty str or None")

        if isinstance(self.tags, str):
            raise ValueError(
                "Config.tags must be a sequence of str, not one str; use tags=('a', 'b') "
                "(TINKER_TAGS is comma-separated)"
            )
        tags = tuple(self.tags)
        for tag in tags:
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"Config.tags must hold non-empty strs, got {tag!r}")
        set_(self, "tags", tuple(dict.fromkeys(tags)))

        set_(self, "user_metadata", _frozen_mapping(self.user_metadata, "user_metadata"))
        headers = _frozen_mapping(self.extra_headers, "extra_headers")
        for key, value in headers.items():
            _check_header_value(key, f"extra_headers[{key!r}]")
            _check_header_value(value, f"extra_headers[{key!r}]")
        set_(self, "extra_headers", headers)

        if not isinstance(self.telemetry, bool):
            raise ValueError(f"Config.telemetry must be a bool, got {self.telemetry!r}")

        if self.log_level is not None:
            level = str(self.log_level).strip().lower()
            if level not in _LOG_LEVELS:
                raise ValueError(
                    f"Config.log_level {self.log_level!r} is not one of {sorted(_LOG_LEVELS)} "
                    "(set via log_level= or TINKER_LOG)"
                )
            set_(self, "log_level", level)

        for name in ("cf_access_client_id", "cf_access_client_secret"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise ValueError(f"Config.{name} must be a non-empty str or None")
                _check_header_value(value, name)

        if self.credential_cmd is not None and (
            not isinstance(self.credential_cmd, str) or not self.credential_cmd.strip()
        ):
            raise ValueError("Config.credential_cmd must be a non-empty shell command or None")

        if self.wire_format not in ("json", "protobuf"):
            raise ValueError(
                f"Config.wire_format must be 'json' or 'protobuf', got {self.wire_format!r}"
            )

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def resolve(cls, **overrides: Any) -> Config:
        """Build from explicit arguments, then ``os.environ``, then defaults.

        An argument given as None counts as not given (falls back to the environment).
        """
        return cls.from_env(os.environ, **overrides)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build from explicit arguments, then ``env`` (default ``os.environ``), then defaults.

        Environment variables (PROTOCOL.md 1.1): ``TINKER_API_KEY``, ``TINKER_BASE_URL`` (empty
        counts as unset), ``TINKER_PROJECT_ID``, ``TINKER_TAGS`` (comma-separated, deduplicated,
        order kept), ``TINKER_TELEMETRY`` (on unless set to something other than
        1/true/yes/on), ``TINKER_LOG``, ``CLOUDFLARE_ACCESS_CLIENT_ID`` / ``_SECRET``,
        ``TINKER_CREDENTIAL_CMD``.

        Raises:
            TypeError: an unknown keyword argument.
            ValueError: a bad value, naming the setting.
        """
        if env is None:
            env = os.environ
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"Config got unknown setting(s) {unknown}; known: {sorted(known)}")

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value else None  # empty counts as unset

        values: dict[str, Any] = {}
        if (v := get(ENV_API_KEY)) is not None:
            values["api_key"] = v
        if (v := get(ENV_BASE_URL)) is not None and v.strip():
            values["base_url"] = v
        if (v := get(ENV_PROJECT_ID)) is not None:
            values["project_id"] = v
        if (v := get(ENV_TAGS)) is not None:
            values["tags"] = tuple(t for t in (s.strip() for s in v.split(",")) if t)
        if (v := get(ENV_TELEMETRY)) is not None:
            values["telemetry"] = v.strip().lower() in _TRUTHY
        if (v := get(ENV_LOG)) is not None:
            values["log_level"] = v
        if (v := get(ENV_CF_CLIENT_ID)) is not None:
            values["cf_access_client_id"] = v
        if (v := get(ENV_CF_CLIENT_SECRET)) is not None:
            values["cf_access_client_secret"] = v
        if (v := get(ENV_CREDENTIAL_CMD)) is not None and v.strip():
            values["credential_cmd"] = v
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    # -- use -----------------------------------------------------------------------------------

    def require_api_key(self) -> str:
        """The API key, or :class:`MissingAPIKeyError` explaining how to configure one."""
        if self.api_key is None:
            raise MissingAPIKeyError(_MISSING_KEY_HELP)
        return self.api_key

    def __repr__(self) -> str:
        return (
            f"Config(api_key={_mask(self.api_key)}, base_url={self.base_url!r}, "
            f"timeout={self.timeout!r}, connect_timeout={self.connect_timeout!r}, "
            f"max_retries={self.max_retries!r}, project_id={self.project_id!r}, "
            f"tags={self.tags!r}, user_metadata={dict(self.user_metadata)!r}, "
            f"telemetry={self.telemetry!r}, log_level={self.log_level!r}, "
            f"extra_headers={sorted(self.extra_headers)!r}, "
            f"cf_access_client_id={self.cf_access_client_id!r}, "
            f"cf_access_client_secret={_mask(self.cf_access_client_secret)}, "
            f"wire_format={self.wire_format!r}, "
            f"credential_cmd={'None' if self.credential_cmd is None else repr('<set>')})"
        )

    __str__ = __repr__
