"""Start-up, sessions, telemetry and capabilities (PROTOCOL.md 2 and 3.1)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from tinkex_trio.types._base import UNSET, Request, Response, UnsetType
from tinkex_trio.types._bounds import Id, Metadata, Tags, Text


class ClientConfigRequest(Request, kw_only=True):
    sdk_version: Text


class ClientConfigResponse(Response, kw_only=True):
    """Server feature flags (PROTOCOL.md 2.1); unknown flags are ignored."""

    pjwt_auth_enabled: bool = False
    # "credential_cmd": the JWT exchange uses TINKER_CREDENTIAL_CMD's output (PROTOCOL.md 1.3).
    credential_default_source: str = "api_key"
    # The official SDK's pyqwest transport; this SDK always uses its own (DESIGN.md "HTTP").
    use_pyqwest_transport: bool = True
    proto_compress_fwdbwd: bool = False
    # tinkex extension: the server prefers protobuf forward_backward bodies (PROTOCOL.md 6).
    proto_fwdbwd: bool = False
    parallel_fwdbwd_chunks: bool = True
    fwdbwd_max_chunk_len: int = 1024
    fwdbwd_max_chunk_bytes_count: int = 5_000_000
    fwdbwd_dispatch_bytes_semaphore_size: int = 50_000_000
    sample_dispatch_bytes_semaphore_size: int = 10_485_760
    inflight_response_bytes_semaphore_size: int = 52_428_800
    billing_exception_max_pause_duration_sec: float = 3600.0
    sample_no_retries: bool = False
    sample_enable_stuck_detection: bool = True
    sample_max_concurrent_requests: int = 2000
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    sample_join_sampling_session: bool = False


class DynamicConfigRequest(Request, kw_only=True):
    """Body of `POST /api/v1/client/dynamic_config` (PROTOCOL.md 2.1 step 3, 3.1)."""

    sdk_version: Text


class DynamicConfigResponse(Response, kw_only=True):
    """Flags the server may change during a session (PROTOCOL.md 2.1 step 3).

    Refreshed every `max(refresh_interval_sec, 10)` s; `sample_cancel_enabled` turns on
    `cancel_future` for abandoned samples (4.9), sent in parallel batches of up to
    `sample_cancel_max_batch_size`. Unknown flags are ignored.
    """

    refresh_interval_sec: float = 300.0
    sample_cancel_enabled: bool = False
    sample_cancel_max_batch_size: int = 64


class AuthTokenResponse(Response, kw_only=True):
    """Answer of `POST /api/v1/auth/token` (PROTOCOL.md 1.3, 3.1): a short-lived JWT."""

    jwt: str


class CreateSessionRequest(Request, kw_only=True):
    tags: Tags = []
    user_metadata: Metadata = {}
    sdk_version: Text
    project_id: Text | UnsetType = UNSET
    display_name: Text | UnsetType = UNSET
    type: Literal["create_session"] = "create_session"


class CreateSessionResponse(Response, kw_only=True):
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None
    type: Literal["create_session"] = "create_session"


class SessionHeartbeatRequest(Request, kw_only=True):
    session_id: Id
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionHeartbeatResponse(Response, kw_only=True):
    type: Literal["session_heartbeat"] = "session_heartbeat"


FinishReasonType = Literal["success", "errored", "interrupted"]


class FinishReason(msgspec.Struct, kw_only=True):
    type: FinishReasonType


class FinishSessionRequest(Request, kw_only=True):
    """`detail` is sent as an explicit null when absent (PROTOCOL.md 2.2)."""

    reason: FinishReason
    detail: str | None = None


class TelemetryEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    event: str
    event_id: str
    event_session_index: int
    severity: str
    timestamp: str
    event_name: str | None = None
    event_data: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    duration: str | None = None


class TelemetryBatch(Request, kw_only=True):
    events: list[TelemetryEvent]
    platform: str
    sdk_version: str
    session_id: str
    process_uuid: str | UnsetType = UNSET


class TelemetryResponse(Response, kw_only=True):
    status: Literal["accepted"]


class HealthResponse(Response, kw_only=True):
    status: str


class SupportedModel(Response, kw_only=True):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class ServerCapabilities(Response, kw_only=True):
    supported_models: list[SupportedModel] = []
