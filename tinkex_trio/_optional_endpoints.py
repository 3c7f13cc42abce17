"""Optional endpoints a Tinker-compatible server may not have.

The hosted service has every endpoint of PROTOCOL.md; other Tinker-compatible servers (SkyRL
tx, hatchery-core) leave out the ones a client can do without: `client/config`,
`client/dynamic_config`, `sessions/{id}/finish`. For those, a 404 or a 405 means "this server
has no such endpoint", which is how that server is, not a failure: the SDK goes on with the
defaults and says so once per process, at debug, on `tinkex_trio.service`.
"""

from __future__ import annotations

import logging
from typing import Final

from tinkex_trio.errors import APIStatusError

#: Statuses that say "this server has no such endpoint" (not "this call failed").
MISSING_ENDPOINT_STATUSES: Final = frozenset({404, 405})

_logger = logging.getLogger("tinkex_trio.service")
#: Optional endpoints found missing in this process; each is logged once.
_missing: set[str] = set()


def is_missing_endpoint(exc: APIStatusError) -> bool:
    """Whether `exc` says the server has no such endpoint (404 or 405)."""
    return exc.status_code in MISSING_ENDPOINT_STATUSES


def note_missing_endpoint(endpoint: str, status: int) -> None:
    """Log, once per process and at debug, that the server lacks the optional `endpoint`."""
    if endpoint in _missing:
        return
    _missing.add(endpoint)
    _logger.debug(
        "the server has no %s endpoint (HTTP %d); it is optional, so it is skipped "
        "(logged once per process)",
        endpoint,
        status,
    )


__all__ = ["MISSING_ENDPOINT_STATUSES", "is_missing_endpoint", "note_missing_endpoint"]
