"""The future protocol's bodies (PROTOCOL.md 4)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from tinkex_trio.types._base import UNSET, Request, Response, UnsetType
from tinkex_trio.types._bounds import Id, IdList

QueueState = Literal["active", "paused_capacity", "paused_rate_limit", "unknown"]
ErrorCategory = Literal["user", "server", "unknown"]


class UntypedAPIFuture(Response, kw_only=True):
    """Submit response of every long operation (4.1)."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class RetrieveFutureRequest(Request, kw_only=True):
    request_id: Id
    allow_metadata_only: bool = True


class CancelFutureRequest(Request, kw_only=True):
    """Body of `POST /api/v1/cancel_future` for an abandoned sample (PROTOCOL.md 3.4, 4.9)."""

    request_id: Id


class TryAgainResponse(Response, kw_only=True):
    """Still pending (4.6). The server long-polled before answering this.

    A client recognises this body by its `type`; the 0.15 type also requires `queue_state`
    (A.3.3), so it has no default. `queue_state_reason` is left out when there is none.
    """

    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: str
    queue_state_reason: str | UnsetType | None = UNSET


class RequestFailedResponse(Response, kw_only=True):
    """A failed request (4.7). `category` is user, server or unknown."""

    error: str
    category: str = "unknown"


class CompleteMetadataResponse(Response, kw_only=True):
    """Finished but not inlined (4.4): poll again with allow_metadata_only=false."""

    status: Literal["complete_metadata"] = "complete_metadata"
    response_payload_size: int = 0


class RetrieveFuturesTarget(Request, kw_only=True):
    """Whose completions a `retrieve_futures` poll asks for: one clone of a sampling session
    (`cloned_sampler_id` = seq_id // 1e9, PROTOCOL.md 5.3)."""

    sampling_session_id: Id
    cloned_sampler_id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    type: Literal["sampling_session"] = "sampling_session"


class RetrieveFuturesRequest(Request, kw_only=True):
    """Body of `POST /api/v1/retrieve_futures` (4.8): session-wide completion polling.

    `timeout` omitted: the server's default long-poll; `0`: answer at once (an
    acknowledgement-only poll). `retrieved_request_ids` are the requests whose results the
    client has fetched, so the server may drop their payloads.
    """

    target: RetrieveFuturesTarget
    prev_cursor: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    retrieved_request_ids: IdList = []
    timeout: float | UnsetType = UNSET


class FutureCompletion(Response, kw_only=True):
    """One finished (`state: "finished"`) or failed request in a `retrieve_futures` answer.

    `response_payload_uncompressed_size` is sent for finished requests only (4.8).
    """

    state: str = "finished"
    request_id: str
    response_payload_uncompressed_size: int | UnsetType | None = UNSET


class RetrieveFuturesResponse(Response, kw_only=True):
    """Answer of `retrieve_futures` (4.8): completions after `prev_cursor`, and the new cursor."""

    completions: list[FutureCompletion] = []
    cursor: int = 0


class PollEnvelope(Response, kw_only=True):
    """What the SDK reads first from a 2xx poll body to classify it (4.2).

    Decoding into this skips every other key, so classifying a large result costs one parse.
    """

    type: str | None = None
    status: str | None = None
    error: str | None = None
    category: str | None = None
    queue_state: str | None = None
    queue_state_reason: str | None = None
    response_payload_size: int | None = None


class QueueStateBody(Response, kw_only=True):
    """Body of a 408 poll answer that reports the queue state (A.3.3)."""

    queue_state: str | None = None
    queue_state_reason: str | None = None


def normalize_queue_state(value: str | None) -> QueueState:
    if value in ("active", "paused_capacity", "paused_rate_limit"):
        return value  # type: ignore[return-value]
    return "unknown"


def normalize_category(value: str | None) -> ErrorCategory:
    if value in ("user", "server", "unknown"):
        return value  # type: ignore[return-value]
    return "unknown"
