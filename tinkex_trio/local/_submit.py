"""The one path of every training request into its model's lane (PROTOCOL.md 5.2, 10.6).

Training requests (forward, forward_backward, optim_step, the saves, loads and unload) run in
their model's lane in `seq_id` order. `TrainingSubmitter` deduplicates them (the same payload
for a seq_id gets the original request id, a different one 409), checks them, and queues the
job; the two requests that create a model (create_model, and load_weights by session) are its
seq_id 0 and go through `submit_creation`. A request refused with a 4xx once its model is known
still consumes its seq_id, so later requests do not wait for it forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import trio

from tinkex_trio import types as t
from tinkex_trio.types import (
    CreateModelRequest,
    ForwardBackwardRequest,
    ForwardRequest,
    LoadWeightsRequest,
    OptimStepRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    UnloadModelRequest,
    UnsetType,
    decode_request,
)
from tinkex_trio.types._bounds import MAX_SEQ_ID

from ._backend import Backend, hash_payload, now
from ._convert import or_none
from ._engine_api import EngineUserError
from ._http import HTTPError, Request, Response
from ._scheduler import JobFn
from ._store import ModelRow

T = TypeVar("T")

#: The requests that run in a model's lane (all but the two that create the model).
TrainingRequest = (
    ForwardRequest
    | ForwardBackwardRequest
    | OptimStepRequest
    | SaveWeightsRequest
    | SaveWeightsForSamplerRequest
    | SaveWeightsExternalRequest
    | LoadWeightsRequest
    | UnloadModelRequest
)


class TrainingSubmitter:
    """Dedup, check and queue training requests (see the module docstring)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def decode(self, request: Request, type_: type[T]) -> T:
        """Decode a seq_id-ordered body; on a 400 consume the seq_id if the ids are readable."""
        try:
            return decode_request(request.body, type_)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self._consume_from_raw(request.body)
            raise

    def consume(self, model_id: str, seq_id: int) -> None:
        """Count a refused request's seq_id as used (PROTOCOL.md 5.2)."""
        model = self._backend.store.get_model(model_id)
        if model is not None and not model.unloaded:  # an unloaded model runs nothing more
            self._backend.ensure_lane(model)
            self._backend.lanes.consume(model_id, seq_id)

    def _consume_from_raw(self, body: bytes) -> None:
        try:
            raw = decode_request(body, Any)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if not isinstance(raw, dict):
            return
        model_id, seq_id = raw.get("model_id"), raw.get("seq_id")
        # Only a seq_id the client could have meant: an out-of-range one consumes nothing.
        if isinstance(model_id, str) and isinstance(seq_id, int) and 1 <= seq_id <= MAX_SEQ_ID:
            self.consume(model_id, seq_id)

    async def submit(
        self,
        body: TrainingRequest,
        request_type: str,
        prepare: Callable[[ModelRow], JobFn],
        *,
        allow_corrupted: bool = False,
    ) -> Response:
        """Queue a request of an existing model; `prepare` checks and converts it (raising
        `HTTPError` or `EngineUserError`, both answered 400) and returns the job to run."""
        if isinstance(body.model_id, UnsetType):
            raise HTTPError(400, "model_id is required")
        model_id = body.model_id
        seq_id = None if isinstance(body, UnloadModelRequest) else or_none(body.seq_id)
        backend = self._backend
        model = backend.model(model_id)
        payload_hash = hash_payload(body)
        if seq_id is not None:
            earlier = backend.duplicate(
                model_id=model_id, sampler_id=None, seq_id=seq_id, payload_hash=payload_hash
            )
            if earlier is not None:
                await trio.lowlevel.checkpoint()
                return backend.future_response(earlier, model_id)
        if model.unloaded:
            # Checked before its lane is (re)opened: a released model keeps no lane.
            raise HTTPError(400, self._unloaded_message(model))
        backend.session_seen(model.session_id)
        backend.ensure_lane(model)
        try:
            if seq_id is not None and (
                seq_id < backend.lanes.next_seq(model_id)
                or backend.lanes.is_queued(model_id, seq_id)
            ):
                raise HTTPError(
                    400,
                    f"seq_id {seq_id} of {model_id!r} was already used; the next expected "
                    f"seq_id is {backend.lanes.next_seq(model_id)}",
                )
            if seq_id is not None and seq_id < 1:
                raise HTTPError(400, f"seq_id must be >= 1 (got {seq_id}); 0 is create_model")
            if model.corrupted and not allow_corrupted:
                raise HTTPError(
                    400,
                    f"model {model_id!r} lost its in-memory state (the backend restarted or its "
                    "creation failed); create a training client from a saved checkpoint",
                )
            job = prepare(model)
        except (HTTPError, EngineUserError) as exc:
            if seq_id is not None:
                backend.lanes.consume(model_id, seq_id)
            if isinstance(exc, EngineUserError):
                raise HTTPError(400, str(exc)) from None
            raise
        request_id = backend.registry.create(
            request_type=request_type, payload_hash=payload_hash, model_id=model_id, seq_id=seq_id
        )
        backend.store.update_model(model_id, last_request_time=now())
        if seq_id is None:
            backend.lanes.submit_unsequenced(model_id, request_id, job)
        else:
            backend.lanes.submit(model_id, seq_id, request_id, job)
        await trio.lowlevel.checkpoint()
        return backend.future_response(request_id, model_id)

    def _unloaded_message(self, model: ModelRow) -> str:
        session = self._backend.store.get_session(model.session_id)
        if session is not None and session.finished_reason is not None:
            return (
                f"model {model.model_id!r} was released when its session finished "
                f"({session.finished_reason}); create a training client from one of its "
                "checkpoints to continue"
            )
        return f"model {model.model_id!r} was unloaded; create a new one"

    def submit_creation(
        self,
        body: CreateModelRequest | LoadWeightsRequest,
        *,
        model_id: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora_config: dict[str, Any],
        optimizer_config: dict[str, Any],
        user_metadata: dict[str, str] | None,
        request_type: str,
        job: JobFn,
    ) -> Response:
        """Create a model and queue `job` as its seq_id 0 (create_model, and load_weights by
        session_id + model_seq_id; PROTOCOL.md 5.2).

        Dedup first (same payload: the original request id), then insert the model row, open
        its lane and queue `job`. If `job` fails the model is marked corrupted: it has no
        adapter in the engine, so later requests must not run against it.
        """
        backend = self._backend
        backend.session_seen(session_id)
        payload_hash = hash_payload(body)
        earlier = backend.duplicate(
            model_id=model_id, sampler_id=None, seq_id=0, payload_hash=payload_hash
        )
        if earlier is not None:
            return backend.future_response(earlier, model_id)
        if backend.store.get_model(model_id) is not None:
            raise HTTPError(400, f"model {model_id!r} already exists (model_seq_id reused)")
        backend.store.insert_model(
            model_id=model_id,
            session_id=session_id,
            model_seq_id=model_seq_id,
            base_model=base_model,
            lora_config=lora_config,
            optimizer_config=optimizer_config,
            user_metadata=user_metadata,
            now=now(),
        )
        backend.lanes.open_lane(model_id, 0)
        request_id = backend.registry.create(
            request_type=request_type, payload_hash=payload_hash, model_id=model_id, seq_id=0
        )

        async def guarded_job() -> t.Response:
            try:
                return await job()
            except BaseException:
                backend.store.update_model(model_id, corrupted=1)
                raise

        backend.lanes.submit(model_id, 0, request_id, guarded_job)
        return backend.future_response(request_id, model_id)
