"""Admin endpoints (PROTOCOL.md 3.6; the official SDK's `AdminClient`): the audit log, billing
usage events and current checkpoint storage, answered from what the store records.

Audit log: every change the store makes to a session, training run or checkpoint is an
event (`_store.py` `audit_events`): `session_create`, `session_finish`,
`project_session_assign`, `training_run_create`, `checkpoint_create`, `checkpoint_delete`
(explicit, overwritten or expired), `checkpoint_publish`, `checkpoint_unpublish`,
`checkpoint_ttl_set`, and `checkpoint_read` (a file or archive fetched through a signed URL,
`purpose: "download"`). `event_type` selects by resource: `checkpoints` (`checkpoint_*`),
`projects` (`project_*`), `teams` and `organizations` (this backend has neither, so nothing),
`all`. `day` (UTC, `YYYY-MM-DD`) defaults to today.

Billing usage: what a local machine really has, priced at zero. Per UTC hour and session, a
`checkpoint` event counts the checkpoints saved; per hour and project, a `storage` event gives
the gigabyte-hours held (from each checkpoint's lifetime: created, then deleted or expired or
still there), marked `free` with a cost and rate of 0. Tokens are not metered by the local
backend, so there are no `training` or `sampling_*` events rather than invented counts.
`cost_data_through` is null (there is no invoice). The window is checked as the hosted API
documents it: RFC 3339, aligned to UTC hours, `starting_on` not in the future, at most 14 days.

Storage now: the live checkpoints grouped by project, with their count and bytes; cost 0.

Every session belongs to a project: the one it was created in or assigned to, else
`DEFAULT_PROJECT_ID` (`_backend.py`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Final

import trio

from tinkex_trio.types import (
    BILLING_MAX_WINDOW_DAYS,
    AuditLogEntry,
    AuditLogResponse,
    BillingUsageEvent,
    BillingUsageResponse,
    BillingUsageSession,
    CheckpointBillingEvent,
    CurrentCheckpointStorageUsageItem,
    CurrentCheckpointStorageUsageResponse,
    StorageBillingEvent,
)

from ._backend import API, LOCAL_OWNER, Backend, now, project_of
from ._checkpoints import utc_datetime
from ._http import Handler, HTTPError, Request, Response, json_response
from ._store import AuditRow

#: `event_type` → the prefix of the event names it selects (None: every event).
AUDIT_EVENT_PREFIXES: Final[dict[str, str | None]] = {
    "all": None,
    "checkpoints": "checkpoint_",
    "projects": "project_",
    "teams": "team_",
    "organizations": "organization_",
}
#: The storage billing unit: decimal gigabytes (10^9 bytes).
BYTES_PER_GIGABYTE: Final = 1e9
#: Display name of the one local user (billing `user_name`, storage `user_name`).
LOCAL_USER_NAME: Final = "local"
_HOUR: Final = 3600.0
_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class AdminRoutes:
    """`GET audit`, `GET billing/usage/events`, `GET billing/usage/checkpoints/current`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", f"{API}/audit", self.audit),
            ("GET", f"{API}/billing/usage/events", self.billing_usage),
            ("GET", f"{API}/billing/usage/checkpoints/current", self.checkpoint_storage),
        ]

    # ------------------------------------------------------------------- audit

    async def audit(self, request: Request) -> Response:
        event_type = request.query.get("event_type") or "all"
        if event_type not in AUDIT_EVENT_PREFIXES:
            raise HTTPError(
                400,
                f"query parameter event_type={event_type!r} must be one of "
                f"{sorted(AUDIT_EVENT_PREFIXES)}",
            )
        day = _day(request.query.get("day"))
        start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        rows = self.backend.store.audit_events(
            start=start, end=start + 24 * _HOUR, prefix=AUDIT_EVENT_PREFIXES[event_type]
        )
        await trio.lowlevel.checkpoint()
        return json_response(AuditLogResponse(entries=[_entry(row) for row in rows]))

    # ----------------------------------------------------------------- billing

    async def billing_usage(self, request: Request) -> Response:
        start = _hour(request, "starting_on")
        end = _hour(request, "ending_before")
        current = now()
        if start.timestamp() > current:
            raise HTTPError(400, f"starting_on={start.isoformat()} is in the future")
        if end <= start:
            raise HTTPError(
                400,
                f"ending_before={end.isoformat()} must be after starting_on={start.isoformat()}",
            )
        if end - start > timedelta(days=BILLING_MAX_WINDOW_DAYS):
            raise HTTPError(
                400,
                f"the window from starting_on={start.isoformat()} to ending_before="
                f"{end.isoformat()} is longer than {BILLING_MAX_WINDOW_DAYS} days; split it",
            )
        usage = _BillingUsage(self.backend, start.timestamp(), min(end.timestamp(), current))
        answer = usage.response()
        await trio.lowlevel.checkpoint()
        return json_response(answer)

    # ----------------------------------------------------------------- storage

    async def checkpoint_storage(self, request: Request) -> Response:
        wanted = request.query.get("project_id")
        if wanted is not None and not wanted.strip():
            raise HTTPError(400, "query parameter project_id must not be empty when given")
        backend = self.backend
        backend.checkpoints.reap_expired()
        spans = backend.store.live_checkpoint_spans()
        projects = _Projects(backend)
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for run_id, _created, _expires, size in spans:
            project = projects.of_run(run_id)
            totals[project][0] += 1
            totals[project][1] += size
        items = [
            CurrentCheckpointStorageUsageItem(
                project_id=project,
                org_user_urn=LOCAL_OWNER,
                user_name=LOCAL_USER_NAME,
                checkpoint_count=count,
                size_bytes=size,
                size_gigabytes=size / BYTES_PER_GIGABYTE,
                estimated_monthly_cost_usd=0.0,
            )
            for project, (count, size) in sorted(totals.items())
            if wanted is None or project == wanted
        ]
        await trio.lowlevel.checkpoint()
        return json_response(
            CurrentCheckpointStorageUsageResponse(
                data=items, effective_rate_usd_per_gigabyte_month=0.0
            )
        )


def _day(raw: str | None) -> date:
    if raw is None or raw == "":
        return datetime.now(UTC).date()
    try:
        if not _DAY_RE.fullmatch(raw):
            raise ValueError
        return date.fromisoformat(raw)
    except ValueError:
        raise HTTPError(
            400, f"query parameter day={raw!r} is not a date; use YYYY-MM-DD (UTC)"
        ) from None


def _hour(request: Request, name: str) -> datetime:
    """An RFC 3339 query parameter aligned to a UTC hour (naive values are taken as UTC)."""
    raw = request.query.get(name)
    if not raw:
        raise HTTPError(
            400, f"query parameter {name} is required (RFC 3339, e.g. 2026-01-05T10:00:00Z)"
        )
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise HTTPError(
            400,
            f"query parameter {name}={raw!r} is not an RFC 3339 time (e.g. 2026-01-05T10:00:00Z)",
        ) from None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if value.minute or value.second or value.microsecond:
        raise HTTPError(
            400,
            f"query parameter {name}={raw!r} must be aligned to a UTC hour "
            f"(e.g. {value.replace(minute=0, second=0, microsecond=0).isoformat()})",
        )
    return value


def _entry(row: AuditRow) -> AuditLogEntry:
    checkpoint = row.event.startswith("checkpoint_")
    return AuditLogEntry(
        timestamp=utc_datetime(row.timestamp),
        event=row.event,
        event_details={"actor": LOCAL_OWNER, **row.details},
        model_id=row.model_id if checkpoint else None,
        tinker_path=row.tinker_path if checkpoint else None,
        purpose=row.purpose,
    )


class _Projects:
    """Training run → session → project, looked up once per run."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._runs: dict[str, tuple[str | None, str | None, str]] = {}

    def of_run(self, run_id: str) -> str:
        return self.run(run_id)[2]

    def run(self, run_id: str) -> tuple[str | None, str | None, str]:
        """(session id, base model, project id) of a training run."""
        if run_id not in self._runs:
            store = self._backend.store
            model = store.get_model(run_id)
            session = None if model is None else store.get_session(model.session_id)
            self._runs[run_id] = (
                None if model is None else model.session_id,
                None if model is None else model.base_model,
                project_of(session),
            )
        return self._runs[run_id]


class _BillingUsage:
    """The usage events of the window [start, end) (end capped at now)."""

    def __init__(self, backend: Backend, start: float, end: float) -> None:
        self.backend = backend
        self.start = start
        self.end = end
        self.projects = _Projects(backend)

    def _bucket(self, ts: float) -> float:
        return self.start + math.floor((ts - self.start) / _HOUR) * _HOUR

    def response(self) -> BillingUsageResponse:
        events = self._checkpoint_events() + self._storage_events()
        # Time order; within an hour, checkpoint counts before storage.
        events.sort(key=lambda e: (e.bucket_start, isinstance(e.event_info, StorageBillingEvent)))
        sessions: dict[str, BillingUsageSession] = {}
        for event in events:
            if event.session_id is not None and event.session_id not in sessions:
                row = self.backend.store.get_session(event.session_id)
                sessions[event.session_id] = BillingUsageSession(
                    user_metadata=None if row is None else row.user_metadata
                )
        return BillingUsageResponse(data=events, sessions=sessions, cost_data_through=None)

    @staticmethod
    def _event(
        bucket: float,
        info: CheckpointBillingEvent | StorageBillingEvent,
        *,
        base_model: str | None,
        project_id: str,
        session_id: str | None = None,
        cost: float | None = None,
        rate_per_gigabyte_month: float | None = None,
    ) -> BillingUsageEvent:
        return BillingUsageEvent(
            bucket_start=utc_datetime(bucket),
            bucket_end=utc_datetime(bucket + _HOUR),
            event_info=info,
            base_model=base_model,
            user_id=LOCAL_OWNER,
            user_name=LOCAL_USER_NAME,
            session_id=session_id,
            project_id=project_id,
            estimated_cost_usd=cost,
            effective_rate_usd_per_gigabyte_month=rate_per_gigabyte_month,
        )

    def _checkpoint_events(self) -> list[BillingUsageEvent]:
        """Checkpoints saved, per hour, session and base model."""
        counts: dict[tuple[float, str | None, str | None, str], int] = defaultdict(int)
        store = self.backend.store
        for row in store.audit_events(start=self.start, end=self.end, prefix="checkpoint_create"):
            session_id, base_model, project = self.projects.run(row.model_id or "")
            counts[(self._bucket(row.timestamp), session_id, base_model, project)] += 1
        return [
            self._event(
                bucket,
                CheckpointBillingEvent(count=count),
                base_model=base_model,
                session_id=session_id,
                project_id=project,
            )
            for (bucket, session_id, base_model, project), count in counts.items()
        ]

    def _lifetimes(self) -> list[tuple[str, float, float, int]]:
        """(run id, from, until, bytes) of every checkpoint stored at some time in the window:
        the live ones (until they expire, or now), and the ones deleted since it began."""
        store = self.backend.store
        spans = [
            (run_id, created, self.end if expires is None else min(expires, self.end), size)
            for run_id, created, expires, size in store.live_checkpoint_spans()
        ]
        for row in store.audit_events(start=self.start, end=math.inf, prefix="checkpoint_delete"):
            created = row.details.get("created_at")
            size = row.details.get("size_bytes") or 0
            if isinstance(created, int | float) and row.model_id is not None:
                spans.append((row.model_id, float(created), row.timestamp, int(size)))
        return spans

    def _storage_events(self) -> list[BillingUsageEvent]:
        """Gigabyte-hours held, per hour, project and base model; free, at no cost."""
        held: dict[tuple[float, str | None, str], float] = defaultdict(float)
        for run_id, since, until, size in self._lifetimes():
            since, until = max(since, self.start), min(until, self.end)
            if until <= since or size <= 0:
                continue
            _session, base_model, project = self.projects.run(run_id)
            bucket = self._bucket(since)
            while bucket < until:
                overlap = min(until, bucket + _HOUR) - max(since, bucket)
                held[(bucket, base_model, project)] += size / BYTES_PER_GIGABYTE * overlap / _HOUR
                bucket += _HOUR
        return [
            self._event(
                bucket,
                StorageBillingEvent(gigabyte_hours=gigabyte_hours, free=True),
                base_model=base_model,
                project_id=project,
                cost=0.0,
                rate_per_gigabyte_month=0.0,
            )
            for (bucket, base_model, project), gigabyte_hours in held.items()
            if gigabyte_hours > 0
        ]
