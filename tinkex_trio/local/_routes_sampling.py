"""Sampling endpoints (PROTOCOL.md 3.3, Appendix A.2): sampling sessions and `asample`, with its
back-pressure (9.5, 10.8): a 429 when too many requests wait for the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import trio

from tinkex_trio.types import (
    UNSET,
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    GetSamplerResponse,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    decode_request,
)

from . import _convert
from ._backend import API, Backend, hash_payload, now
from ._convert import or_none
from ._engine_api import SampleResult
from ._http import (
    Handler,
    HTTPError,
    Request,
    Response,
    json_response,
)
from ._store import SamplingSessionRow

#: The `retry-after-ms` of the asample 429 (back-pressure, `DEFAULT_MAX_QUEUED_SAMPLES`): the
#: SDK's own back-off window (PROTOCOL.md 9.5, 1 s);
#: clients that honour the header (layer A, 9.3) wait as long as the SDK does.
SAMPLE_RETRY_AFTER_MS: Final = 1000


def _sequence_ids(request_id: str, n: int) -> list[str]:
    """Deterministic per request, so a deduplicated resubmission gets the same ids."""
    return [f"{request_id}:{i}" for i in range(n)]


class SamplingRoutes:
    """The sampling endpoints; state and shared helpers live in `Backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{API}/create_sampling_session", self.create_sampling_session),
            ("GET", f"{API}/samplers/(?P<sampler_id>[^/]+)", self.get_sampler),
            ("POST", f"{API}/asample", self.asample),
        ]

    async def create_sampling_session(self, request: Request) -> Response:
        body = decode_request(request.body, CreateSamplingSessionRequest)
        self.backend.session(body.session_id)
        self.backend.session_seen(body.session_id)
        model_path = or_none(body.model_path)
        adapter_dir: str | None = None
        if model_path is not None:
            ck = self.backend.checkpoints.from_path(model_path, "model_path")
            base_model = self.backend.model(ck.run_id).base_model
            if body.base_model is not UNSET and body.base_model != base_model:
                raise HTTPError(
                    400,
                    f"base_model {body.base_model!r} does not match {model_path!r}, which was "
                    f"trained on {base_model!r}",
                )
            adapter_dir = ck.path
        elif body.base_model is not UNSET:
            base_model = body.base_model
        else:
            raise HTTPError(400, "create_sampling_session needs base_model or model_path")
        self.backend.model_info(base_model)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        existing = self.backend.store.get_sampling_session(sampler_id)
        if existing is not None:
            if existing.base_model != base_model or existing.model_path != model_path:
                raise HTTPError(
                    400,
                    f"sampling session {sampler_id!r} already exists with other weights "
                    "(sampling_session_seq_id reused)",
                )
        else:
            self.backend.store.insert_sampling_session(
                SamplingSessionRow(
                    sampling_session_id=sampler_id,
                    session_id=body.session_id,
                    base_model=base_model,
                    model_path=model_path,
                    adapter_dir=adapter_dir,
                    created_at=now(),
                )
            )
        return json_response(CreateSamplingSessionResponse(sampling_session_id=sampler_id))

    def _check_sample_backpressure(self) -> None:
        """429 when the engine's sampling queue is full (PROTOCOL.md 3.3, 9.5, 10.8).

        Called after every check that could answer 4xx and after deduplication (a resubmitted
        seq_id that was accepted before gets its future, full queue or not), and before
        anything is created: a rejected submission leaves no trace, so the SDK's resubmission
        with the same seq_id is a first submission.
        """
        limit = self.backend.settings.max_queued_samples
        queued = self.backend.batcher.queued
        if limit is not None and queued >= limit:
            raise HTTPError(
                429,
                f"the local backend has {queued} sampling requests waiting for the engine "
                f"(limit {limit}); back off and resubmit",
                category="server",
                headers={"retry-after-ms": str(SAMPLE_RETRY_AFTER_MS)},
            )

    async def get_sampler(self, request: Request) -> Response:
        sampler_id = request.params["sampler_id"]
        row = self.backend.store.get_sampling_session(sampler_id)
        if row is None:
            raise HTTPError(404, f"unknown sampler {sampler_id!r}")
        return json_response(
            GetSamplerResponse(
                sampler_id=row.sampling_session_id,
                base_model=row.base_model,
                model_path=row.model_path,
            )
        )

    async def asample(self, request: Request) -> Response:
        body = decode_request(request.body, SampleRequest)
        sampler_id = or_none(body.sampling_session_id)
        adapter_dir: Path | None = None
        owner: str | None = None  # the session that owns this request's stability recordings
        if sampler_id is not None:
            row = self.backend.store.get_sampling_session(sampler_id)
            if row is None:
                raise HTTPError(404, f"unknown sampling_session_id {sampler_id!r}")
            owner = row.session_id
            base_model = row.base_model
            adapter_dir = Path(row.adapter_dir) if row.adapter_dir else None
            self.backend.session_seen(row.session_id)
        elif body.model_path is not UNSET:
            ck = self.backend.checkpoints.from_path(body.model_path, "model_path")
            base_model = self.backend.model(ck.run_id).base_model
            adapter_dir = Path(ck.path)
        elif body.base_model is not UNSET:
            base_model = body.base_model
        else:
            raise HTTPError(400, "asample needs sampling_session_id, model_path or base_model")
        if body.record_stability_info and owner is None:
            raise HTTPError(
                400,
                "record_stability_info needs a sampling_session_id: recordings belong to the "
                "session of a sampling session (create one with create_sampling_session)",
            )
        info = self.backend.model_info(base_model)
        payload_hash = hash_payload(body)
        seq_id = or_none(body.seq_id)
        if sampler_id is not None and seq_id is not None:
            earlier = self.backend.duplicate(
                model_id=None, sampler_id=sampler_id, seq_id=seq_id, payload_hash=payload_hash
            )
            if earlier is not None:
                return self.backend.future_response(
                    earlier, sample_ids=_sequence_ids(earlier, body.num_samples)
                )
        engine_request = _convert.sample_request(body, info, adapter_dir)
        self._check_sample_backpressure()
        request_id = self.backend.registry.create(
            request_type="Sample",
            payload_hash=payload_hash,
            sampling_session_id=sampler_id,
            seq_id=seq_id if sampler_id is not None else None,
        )
        sequence_ids = _sequence_ids(request_id, body.num_samples)
        want_prompt_logprobs = body.prompt_logprobs
        topk = body.topk_prompt_logprobs
        recordings = self.backend.stability
        record_for = owner if body.record_stability_info else None

        def finish(result: SampleResult) -> SampleResponse:
            if record_for is not None:
                recordings.record(
                    record_for,
                    engine_request.prompt,
                    [
                        (sid, s.tokens, s.logprobs)
                        for s, sid in zip(result.sequences, sequence_ids, strict=True)
                    ],
                )
            return SampleResponse(
                sequences=[
                    SampledSequence(
                        stop_reason=s.stop_reason,
                        tokens=list(s.tokens),
                        logprobs=list(s.logprobs),
                        sequence_id=sid,
                    )
                    for s, sid in zip(result.sequences, sequence_ids, strict=True)
                ],
                prompt_logprobs=result.prompt_logprobs if want_prompt_logprobs else None,
                topk_prompt_logprobs=result.topk_prompt_logprobs if topk > 0 else None,
            )

        self.backend.batcher.submit(request_id, engine_request, finish)
        await trio.lowlevel.checkpoint()
        return self.backend.future_response(request_id, sample_ids=sequence_ids)
