"""AdminClient: the audit log and billing usage of the caller's organization (PROTOCOL.md 3.6).

The official SDK's `AdminClient` calls, typed: `get_audit_log`, `get_billing_usage`,
`get_current_checkpoint_storage_usage`. Each is one `GET` under the transport's ``rest``
policy (layers A and B, redirects followed: the audit log may answer with one). Arguments are
checked before anything is sent, with the rules the hosted API documents: a billing window is
RFC 3339, aligned to UTC hours, and at most 14 days long.

On the local backend every session belongs to a project (`local-default` unless it was created
in or assigned to another), every cost is 0, and the audit log holds the session, training-run
and checkpoint changes its store made (docs/local_backend.md "Admin calls").
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar, final, get_args

from tinkex_trio._policy import REST
from tinkex_trio.errors import InvalidInputError
from tinkex_trio.types import (
    BILLING_MAX_WINDOW_DAYS,
    AuditEventType,
    AuditLogResponse,
    BillingUsageResponse,
    CurrentCheckpointStorageUsageResponse,
    decode,
)

if TYPE_CHECKING:
    from tinkex_trio._transport import Transport

__all__ = ["AdminClient"]

_T = TypeVar("_T")
_API_PREFIX: Final = "/api/v1"
_AUDIT_EVENT_TYPES: Final = get_args(AuditEventType)


@final
class AdminClient:
    """Typed access to the admin endpoints of a Tinker server.

    Get one from `ServiceClient.create_admin_client()`; it shares the service's transport, so
    it lives as long as the service.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def __repr__(self) -> str:
        return f"AdminClient(transport={self._transport!r})"

    async def get_audit_log(
        self, event_type: AuditEventType = "all", day: date | None = None
    ) -> AuditLogResponse:
        """The audit log of one UTC day (`GET audit`), oldest entry first.

        `event_type` picks a resource (`checkpoints`, `projects`, `teams`, `organizations`)
        or `all`; `day` defaults to today (UTC) on the server.

        Raises:
            InvalidInputError: an unknown `event_type`, or a `day` that is not a `date`
                (nothing is sent).
        """
        if event_type not in _AUDIT_EVENT_TYPES:
            raise InvalidInputError(
                f"event_type must be one of {list(_AUDIT_EVENT_TYPES)}, got {event_type!r}"
            )
        params: dict[str, Any] = {"event_type": event_type}
        if day is not None:
            if isinstance(day, datetime) or not isinstance(day, date):
                raise InvalidInputError(
                    f"day must be a datetime.date (a UTC calendar day), got {day!r}"
                )
            params["day"] = day.isoformat()
        return await self._get("/audit", AuditLogResponse, params)

    async def get_billing_usage(
        self, starting_on: datetime | str, ending_before: datetime | str
    ) -> BillingUsageResponse:
        """Hourly usage buckets of the window [starting_on, ending_before)
        (`GET billing/usage/events`).

        Both ends are timezone-aware datetimes or RFC 3339 strings (`2026-01-05T10:00:00Z`),
        aligned to a UTC hour; the window is at most 14 days (the server also refuses a start
        in the future).

        Raises:
            InvalidInputError: a bound that is not an aware time aligned to a UTC hour, or a
                window that is empty or too long (nothing is sent).
        """
        start = _utc_hour(starting_on, "starting_on")
        end = _utc_hour(ending_before, "ending_before")
        if end <= start:
            raise InvalidInputError(
                f"ending_before ({_rfc3339(end)}) must be after starting_on ({_rfc3339(start)})"
            )
        if end - start > timedelta(days=BILLING_MAX_WINDOW_DAYS):
            raise InvalidInputError(
                f"the billing window {_rfc3339(start)} .. {_rfc3339(end)} is longer than "
                f"{BILLING_MAX_WINDOW_DAYS} days; ask for it in pieces"
            )
        params = {"starting_on": _rfc3339(start), "ending_before": _rfc3339(end)}
        return await self._get("/billing/usage/events", BillingUsageResponse, params)

    async def get_current_checkpoint_storage_usage(
        self, project_id: str | None = None
    ) -> CurrentCheckpointStorageUsageResponse:
        """Live checkpoints' count, bytes and projected cost, grouped by project and owner
        (`GET billing/usage/checkpoints/current`); only `project_id`'s when given.

        Raises:
            InvalidInputError: an empty `project_id` (nothing is sent).
        """
        params: dict[str, Any] = {}
        if project_id is not None:
            if not isinstance(project_id, str) or not project_id.strip():
                raise InvalidInputError(
                    f"project_id must be a non-empty string or None, got {project_id!r}"
                )
            params["project_id"] = project_id
        return await self._get(
            "/billing/usage/checkpoints/current", CurrentCheckpointStorageUsageResponse, params
        )

    async def _get(self, path: str, type_: type[_T], params: dict[str, Any]) -> _T:
        response = await self._transport.request(
            "GET", _API_PREFIX + path, policy=REST, params=params, follow_redirects=True
        )
        return decode(response.content, type_)


def _utc_hour(value: datetime | str, argument: str) -> datetime:
    """`value` as an aware UTC datetime on an hour boundary, else InvalidInputError."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInputError(
                f"{argument} must be an RFC 3339 time such as 2026-01-05T10:00:00Z, got {value!r}"
            ) from None
    elif isinstance(value, datetime):
        parsed = value
    else:
        raise InvalidInputError(
            f"{argument} must be a datetime or an RFC 3339 string, got {type(value).__name__}"
        )
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidInputError(
            f"{argument} ({value!r}) has no time zone; give it in UTC (e.g. "
            "datetime(..., tzinfo=UTC) or a string ending in 'Z')"
        )
    utc = parsed.astimezone(UTC)
    if utc.minute or utc.second or utc.microsecond:
        aligned = utc.replace(minute=0, second=0, microsecond=0)
        raise InvalidInputError(
            f"{argument} ({value!r}) must be aligned to a UTC hour, e.g. {_rfc3339(aligned)}"
        )
    return utc


def _rfc3339(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")
