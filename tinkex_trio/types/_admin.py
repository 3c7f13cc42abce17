"""Admin shapes: the audit log, billing usage events and current checkpoint storage
(PROTOCOL.md 3.6; the official SDK's `AdminClient`).

Field names and optionality follow the official 0.38 types. Money fields are estimates in USD
and may be null where a server cannot price a row; the local backend prices everything at 0.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from tinkex_trio.types._base import Response

AuditEventType = Literal["all", "checkpoints", "projects", "teams", "organizations"]
"""Which resource's events `GET audit` returns (`event_type`); `all` by default."""


class AuditLogEntry(Response, kw_only=True):
    """One audited event. `event` is `<resource>_<action>` (e.g. `checkpoint_create`);
    `event_details` says who did it and what it was about. `model_id`, `tinker_path` and
    `purpose` are deprecated copies of details some checkpoint events carry."""

    timestamp: datetime
    event: str
    event_details: dict[str, Any] = {}
    model_id: str | None = None
    tinker_path: str | None = None
    purpose: str | None = None


class AuditLogResponse(Response, kw_only=True):
    """`GET audit`: the day's entries, oldest first."""

    entries: list[AuditLogEntry]


# --- billing usage events (GET billing/usage/events) ------------------------------------------


class TrainingBillingEvent(Response, kw_only=True, tag_field="type", tag="training"):
    token_count: int


class SamplingPrefillBillingEvent(Response, kw_only=True, tag_field="type", tag="sampling_prefill"):
    cached: bool
    token_count: int


class SamplingSampleBillingEvent(Response, kw_only=True, tag_field="type", tag="sampling_sample"):
    token_count: int


class CheckpointBillingEvent(Response, kw_only=True, tag_field="type", tag="checkpoint"):
    count: int


class StorageBillingEvent(Response, kw_only=True, tag_field="type", tag="storage"):
    gigabyte_hours: float
    free: bool = False


BillingEventInfo = (
    TrainingBillingEvent
    | SamplingPrefillBillingEvent
    | SamplingSampleBillingEvent
    | CheckpointBillingEvent
    | StorageBillingEvent
)
"""What one usage bucket counts, discriminated by `type`."""


class BillingUsageEvent(Response, kw_only=True):
    """One hourly bucket of one kind of usage, with its attribution."""

    bucket_start: datetime
    bucket_end: datetime
    event_info: BillingEventInfo
    base_model: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    session_id: str | None = None
    project_id: str | None = None
    estimated_cost_usd: float | None = None
    effective_rate_usd_per_million_tokens: float | None = None
    effective_rate_usd_per_gigabyte_month: float | None = None


class BillingUsageSession(Response, kw_only=True):
    user_metadata: dict[str, str] | None = None


class BillingUsageResponse(Response, kw_only=True):
    """`GET billing/usage/events`: buckets in time order; `sessions` holds the user metadata
    of every session named in `data`."""

    data: list[BillingUsageEvent]
    sessions: dict[str, BillingUsageSession] = msgspec.field(default_factory=dict)
    cost_data_through: datetime | None = None


#: PROTOCOL.md 3.6: a billing window spans at most this many days.
BILLING_MAX_WINDOW_DAYS = 14


# --- current checkpoint storage (GET billing/usage/checkpoints/current) ----------------------


class CurrentCheckpointStorageUsageItem(Response, kw_only=True):
    """Live checkpoints of one project and owner: how many and how large."""

    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    project_id: str | None = None
    org_user_urn: str | None = None
    user_email: str | None = None
    user_name: str | None = None
    estimated_monthly_cost_usd: float | None = None


class CurrentCheckpointStorageUsageResponse(Response, kw_only=True):
    data: list[CurrentCheckpointStorageUsageItem]
    effective_rate_usd_per_gigabyte_month: float | None = None
