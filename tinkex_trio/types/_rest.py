"""REST shapes: checkpoints, runs, sessions, session search (PROTOCOL.md 3.5, 7.8, 7.9, A.4)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from tinkex_trio.types._base import UNSET, Request, Response, UnsetType
from tinkex_trio.types._bounds import Id, Metadata, SeqId, Text, TtlSeconds

CheckpointType = Literal["training", "sampler", "external"]


class Checkpoint(Response, kw_only=True):
    """One checkpoint. `time` (when it was saved) is None when a server does not say: the
    official types require it, but SkyRL tx and hatchery-core answer `"time": null`."""

    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime | None = None
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class Cursor(Response, kw_only=True):
    offset: int
    limit: int
    total_count: int

    @property
    def next_offset(self) -> int | None:
        """Offset of the next page, or None on the last page."""
        following = self.offset + self.limit
        return following if following < self.total_count else None


class CheckpointsListResponse(Response, kw_only=True):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(Response, kw_only=True):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: datetime
    corrupted: bool = False
    lora_rank: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(Response, kw_only=True):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoRequest(Request, kw_only=True):
    tinker_path: Text


class WeightsInfoResponse(Response, kw_only=True):
    base_model: str
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    # PROTOCOL.md 7.8: defaults to AdamW, like create_model's (0.15 servers do not send it).
    optimizer_config: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "adamw"})


class SetCheckpointTtlRequest(Request, kw_only=True):
    """`ttl_seconds: null` removes the expiry, so None is sent explicitly."""

    ttl_seconds: TtlSeconds | None = None


class GetSessionResponse(Response, kw_only=True):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class ListSessionsResponse(Response, kw_only=True):
    sessions: list[str]


class CheckpointArchiveUrlResponse(Response, kw_only=True):
    """A signed, expiring download URL of a checkpoint archive (A.4)."""

    url: str
    expires: datetime


# --- external weights and copies (PROTOCOL.md 3.5, 7.8) --------------------------------------


class ExternalWeightsUrlsResponse(Response, kw_only=True):
    """Signed, expiring download URLs of an `external_weights/<name>` checkpoint's files.

    `urls` maps each file's path relative to the checkpoint (`adapter_config.json`, ...) to a
    plain HTTPS(S) URL that needs no Tinker headers; `expires` is timezone-aware.
    """

    urls: dict[str, str]
    expires: datetime


class CopyWeightsRequest(Request, kw_only=True):
    """Body of `POST copy_weights`.

    Deliberately has no `weights_access_token` field (the official type does): the token
    travels only in the `X-Tinker-Weights-Access-Token` header, so it cannot leak into a body.
    The SDK sends `destination_project_id`; `session_id` + `model_seq_id` exist for servers.
    """

    source_path: Text
    destination_project_id: Text | UnsetType = UNSET
    ttl_seconds: TtlSeconds | UnsetType = UNSET
    session_id: Id | UnsetType = UNSET
    model_seq_id: SeqId | UnsetType = UNSET


class CopyWeightsResponse(Response, kw_only=True):
    tinker_path: str


class AssignSessionProjectRequest(Request, kw_only=True):
    project_id: Text


TraceExportStatus = Literal["pending", "ready", "failed"]


class SessionTraceExportResponse(Response, kw_only=True):
    """`GET sessions/{id}/trace_export`: `url` is set when ready, `error` when failed."""

    status: TraceExportStatus
    url: str | None = None
    error: str | None = None


# --- session search (PROTOCOL.md 7.9, experimental) -------------------------------------------


class SearchOwnerOwn(Request, kw_only=True, tag_field="type", tag="own"):
    """Sessions the caller created (the default)."""


class SearchOwnerAccessible(Request, kw_only=True, tag_field="type", tag="accessible"):
    """Sessions the caller can see, shared ones included."""


class SearchOwnerUsers(Request, kw_only=True, tag_field="type", tag="user"):
    """Sessions of the given owners (1 to 10 owner URNs)."""

    owner_urns: list[Text]


SearchOwner = SearchOwnerOwn | SearchOwnerAccessible | SearchOwnerUsers

ClientFinishedReasonType = Literal["success", "errored", "interrupted"]


class SearchStatusActive(Request, kw_only=True, tag_field="type", tag="active"):
    pass


class SearchStatusCancelled(Request, kw_only=True, tag_field="type", tag="cancelled"):
    pass


class SearchStatusFailed(Request, kw_only=True, tag_field="type", tag="failed"):
    pass


class SearchStatusClientFinished(Request, kw_only=True, tag_field="type", tag="client_finished"):
    """Finished by the client; `reasons` (non-empty when given) narrows it."""

    reasons: list[ClientFinishedReasonType] | UnsetType = UNSET


SearchStatus = (
    SearchStatusActive | SearchStatusCancelled | SearchStatusFailed | SearchStatusClientFinished
)


class SessionSearchCursor(Response, kw_only=True):
    """Where the next page starts: after this session in newest-first order."""

    last_created_at: datetime
    last_session_id: str


#: PROTOCOL.md 7.9: `limit` is 1..200, 50 by default.
SESSION_SEARCH_DEFAULT_LIMIT = 50
SESSION_SEARCH_MAX_LIMIT = 200


class SessionSearchRequest(Request, kw_only=True):
    """Body of `POST sessions/search`: unset filters are omitted, defaults always sent.

    `session_id` (exact) and `display_name` (case-insensitive, word-wise substring) are OR-ed;
    every `user_metadata` pair must match; `statuses` entries are OR-ed.
    """

    project_ids: list[Text] | UnsetType = UNSET
    user_metadata: Metadata | UnsetType = UNSET
    display_name: Text | UnsetType = UNSET
    session_id: Id | UnsetType = UNSET
    owner: SearchOwner = msgspec.field(default_factory=SearchOwnerOwn)
    statuses: list[SearchStatus] | UnsetType = UNSET
    limit: int = SESSION_SEARCH_DEFAULT_LIMIT
    cursor: SessionSearchCursor | UnsetType = UNSET


class SessionStatusActive(Response, kw_only=True, tag_field="type", tag="active"):
    pass


class SessionStatusCancelled(Response, kw_only=True, tag_field="type", tag="cancelled"):
    detail: str | None = None


class ClientFinishedReason(Response, kw_only=True):
    type: ClientFinishedReasonType


class SessionStatusClientFinished(Response, kw_only=True, tag_field="type", tag="client_finished"):
    reason: ClientFinishedReason
    detail: str | None = None


class FailureReasonRequest(Response, kw_only=True, tag_field="type", tag="request"):
    request_id: str
    request_type: str


class FailureReasonTrainingRun(Response, kw_only=True, tag_field="type", tag="training_run"):
    training_run_id: str


class FailureReasonSamplingSession(
    Response, kw_only=True, tag_field="type", tag="sampling_session"
):
    sampling_session_id: str


FailureReason = FailureReasonRequest | FailureReasonTrainingRun | FailureReasonSamplingSession


class SessionStatusFailed(Response, kw_only=True, tag_field="type", tag="failed"):
    category: Literal["user", "internal"]
    message: str
    reason: FailureReason


SessionStatus = (
    SessionStatusActive | SessionStatusCancelled | SessionStatusClientFinished | SessionStatusFailed
)


class SessionSummary(Response, kw_only=True):
    session_id: str
    created_at: datetime
    owner: str
    project_id: str | None
    checkpoints_count: int
    status: SessionStatus | None = None
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


class SessionSearchResponse(Response, kw_only=True):
    """One page, newest first; `next_cursor` is None on the last page."""

    sessions: list[SessionSummary]
    next_cursor: SessionSearchCursor | None = None


class WhoAmIResponse(Response, kw_only=True):
    """Who the credential belongs to, from the exchanged JWT's claims (PROTOCOL.md 3.7)."""

    user_urn: str
    org_urn: str | None = None
    email: str | None = None
