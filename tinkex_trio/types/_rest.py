"""REST shapes: checkpoints, training runs, sessions (PROTOCOL.md 3.5, 7.8, A.4)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from tinkex_trio.types._base import Request, Response

CheckpointType = Literal["training", "sampler", "external"]


class Checkpoint(Response, kw_only=True):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
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
    tinker_path: str


class WeightsInfoResponse(Response, kw_only=True):
    base_model: str
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    optimizer_config: dict[str, Any] | None = None


class SetCheckpointTtlRequest(Request, kw_only=True):
    """`ttl_seconds: null` removes the expiry, so None is sent explicitly."""

    ttl_seconds: int | None = None


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
