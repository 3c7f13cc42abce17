"""stable_reinforce on the wire (PROTOCOL.md 3.3, 7.3, 8.7): a `record_stability_info` sample is
recorded per sequence id, a datum's provenance spans are checked against the recording and its
log-probs reach the engine (never the request's), and every bad span is a 400 `user` error
naming the datum and the sequence id, over JSON and over protobuf.

In-process app with a FakeEngine and the autojump clock: expiry after a day is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import trio
from server_testing import Harness, open_harness

from tinkex_trio import _protobuf, types as t
from tinkex_trio.local._engine_api import DatumArrays, ForwardBackwardResult, LossName
from tinkex_trio.local._stability import RECORDING_TTL
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

PROMPT = [5, 6]


class CapturingEngine(FakeEngine):
    """A FakeEngine that keeps the data of every forward_backward it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.trained: list[tuple[LossName, list[DatumArrays]]] = []

    def forward_backward(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss_fn: LossName,
        loss_fn_config: dict[str, float],
        forward_only: bool,
    ) -> ForwardBackwardResult:
        self.trained.append((loss_fn, list(data)))
        return super().forward_backward(adapter_id, data, loss_fn, loss_fn_config, forward_only)


async def _sampler(h: Harness, session_id: str, seq: int = 0) -> str:
    body = await h.ok(
        "create_sampling_session",
        {"session_id": session_id, "sampling_session_seq_id": seq, "base_model": FAKE_MODEL_NAME},
    )
    return str(body["sampling_session_id"])


async def _sample(h: Harness, sampler: str, seq_id: int, *, record: bool = True) -> Any:
    """Sample 2 tokens after PROMPT; returns (sequence id, sampled tokens)."""
    sub = await h.ok(
        "asample",
        {
            "num_samples": 1,
            "prompt": {"chunks": [{"tokens": PROMPT}]},
            "sampling_params": {"max_tokens": 2},
            "sampling_session_id": sampler,
            "seq_id": seq_id,
            "record_stability_info": record,
        },
    )
    result = await h.result(sub["request_id"])
    (sequence,) = result["sequences"]
    assert sequence["sequence_id"] == sub["sample_sequence_ids"][0]
    return sequence["sequence_id"], sequence["tokens"]


def _datum(
    sid: str,
    sampled: list[int],
    *,
    model_spans: list[t.ProvenanceSpan] | None = None,
    target_spans: list[t.ProvenanceSpan] | None = None,
) -> t.Datum:
    """PROMPT + sampled as one datum: input = full[:-1], targets = full[1:], spans default to
    the true provenance. Built without with_provenance so bad tilings reach the server."""
    full = PROMPT + sampled
    n = len(full) - 1
    return t.Datum(
        model_input=t.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": t.TensorData.from_list(full[1:], "int64"),
            "advantages": t.TensorData.from_list([0.0] + [1.0] * (n - 1), "float32"),
            # A lie the server must not read: it uses the recording.
            "logprobs": t.TensorData.from_list([-9.0] * n, "float32"),
        },
        model_input_spans=model_spans
        if model_spans is not None
        else [
            t.PromptProvenanceSpan(sequence_id=sid, length=len(PROMPT)),
            t.SampledProvenanceSpan(sequence_id=sid, length=len(sampled) - 1),
        ],
        loss_fn_input_spans=target_spans
        if target_spans is not None
        else [
            t.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(PROMPT) - 1),
            t.SampledProvenanceSpan(sequence_id=sid, length=len(sampled)),
        ],
    )


async def _forward_backward(
    h: Harness, wire: str, model_id: str, seq_id: int, data: list[t.Datum]
) -> httpx.Response:
    if wire == "json":
        body = t.ForwardBackwardRequest(
            forward_backward_input=t.ForwardBackwardInput(data=data, loss_fn="stable_reinforce"),
            model_id=model_id,
            seq_id=seq_id,
        )
        return await h.client.post(
            "/api/v1/forward_backward",
            content=t.encode(body),
            headers={"content-type": "application/json"},
        )
    content = _protobuf.encode_forward_backward_request(
        model_id=model_id,
        seq_id=seq_id,
        data=data,
        loss_fn="stable_reinforce",
        loss_fn_config={"kl_coeff": 0.1},
        forward_only=False,
    )
    return await h.client.post(
        "/api/v1/forward_backward",
        content=content,
        headers={"content-type": _protobuf.PROTOBUF_CONTENT_TYPE},
    )


def _user_error(response: httpx.Response, *needles: str) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["category"] == "user"
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
    return str(body["detail"])


WIRES = ["json", "protobuf"]


@pytest.mark.parametrize("wire", WIRES)
async def test_recorded_logprobs_reach_the_engine(
    tmp_path: Path, autojump_clock: object, wire: str
) -> None:
    engine = CapturingEngine()
    async with open_harness(tmp_path, engine=engine) as h:
        session = await h.session()
        model = await h.model(session)
        sid, sampled = await _sample(h, await _sampler(h, session), 0)
        response = await _forward_backward(h, wire, model, 1, [_datum(sid, sampled)])
        assert response.status_code == 200, response.text
        result = await h.result(response.json()["request_id"])
        assert "loss_fn_outputs" in result, result
    ((loss_fn, (arrays,)),) = engine.trained
    assert loss_fn == "stable_reinforce"
    assert arrays.recorded_logprobs is not None
    # Target 0 is a prompt token (no sampler log-prob); targets 1-2 are the sampled tokens,
    # whose log-probs the FakeEngine's sampler reported as -0.5 each.
    assert math.isnan(arrays.recorded_logprobs[0])
    assert arrays.recorded_logprobs[1:].tolist() == [-0.5, -0.5]


async def test_sequences_are_recorded_only_when_asked(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        session = await h.session()
        model = await h.model(session)
        sid, sampled = await _sample(h, await _sampler(h, session), 0, record=False)
        response = await _forward_backward(h, "json", model, 1, [_datum(sid, sampled)])
        _user_error(response, "data[0].model_input_spans[0]", repr(sid), "no stability recording")
        refused = await h.post(
            "asample",
            {
                "prompt": {"chunks": [{"tokens": PROMPT}]},
                "base_model": FAKE_MODEL_NAME,
                "record_stability_info": True,
            },
        )
        _user_error(refused, "record_stability_info needs a sampling_session_id")


@pytest.mark.parametrize("wire", WIRES)
async def test_bad_spans_are_user_errors_naming_datum_and_sequence(
    tmp_path: Path, autojump_clock: object, wire: str
) -> None:
    async with open_harness(tmp_path) as h:
        session = await h.session()
        model = await h.model(session)
        sampler = await _sampler(h, session)
        sid, sampled = await _sample(h, sampler, 0)
        good = _datum(sid, sampled)
        seq = iter(range(1, 100))

        async def refused(data: list[t.Datum], *needles: str) -> str:
            return _user_error(await _forward_backward(h, wire, model, next(seq), data), *needles)

        # Unknown sequence id, in the second datum.
        unknown = _datum("nope", sampled)
        await refused([good, unknown], "data[1].model_input_spans[0]", "'nope'", "no stability")
        # Tokens that are not the recorded ones: claim the sampled run starts one later.
        shifted = _datum(
            sid,
            sampled,
            target_spans=[
                t.PromptProvenanceSpan(sequence_id=sid, offset=1, length=1),
                t.SampledProvenanceSpan(sequence_id=sid, offset=1, length=1),
                t.SampledProvenanceSpan(sequence_id=sid, offset=0, length=1),
            ],
        )
        await refused([shifted], "data[0].loss_fn_input_spans[1]", repr(sid), "does not line up")
        # A run past the end of what was sampled.
        beyond = _datum(
            sid,
            sampled,
            target_spans=[
                t.PromptProvenanceSpan(sequence_id=sid, offset=1, length=1),
                t.SampledProvenanceSpan(sequence_id=sid, offset=1, length=2),
            ],
        )
        await refused([beyond], "data[0].loss_fn_input_spans[1]", repr(sid), "which has 2 tokens")
        # A prompt run past the prompt's end.
        prompt_beyond = _datum(
            sid,
            sampled,
            model_spans=[
                t.PromptProvenanceSpan(sequence_id=sid, offset=1, length=2),
                t.SampledProvenanceSpan(sequence_id=sid, length=1),
            ],
        )
        await refused([prompt_beyond], "data[0].model_input_spans[0]", repr(sid), "prompt")
        # Lengths that do not sum to the field's length.
        short = _datum(
            sid, sampled, target_spans=[t.SampledProvenanceSpan(sequence_id=sid, length=2)]
        )
        await refused([short], "data[0].loss_fn_input_spans", "cover 2 positions", "3 tokens")
        # No spans at all.
        bare = t.Datum(model_input=good.model_input, loss_fn_inputs=good.loss_fn_inputs)
        await refused([good, bare], "data[1] has no provenance spans")
        # Raw JSON the SDK would not send: one span list only, a negative offset.
        raw = msgspec.json.decode(
            t.encode(
                t.ForwardBackwardRequest(
                    forward_backward_input=t.ForwardBackwardInput(
                        data=[good], loss_fn="stable_reinforce"
                    ),
                    model_id=model,
                    seq_id=next(seq),
                )
            )
        )
        raw_datum = raw["forward_backward_input"]["data"][0]
        del raw_datum["loss_fn_input_spans"]
        _user_error(await h.post("forward_backward", raw), "provenance comes as a pair")
        raw["seq_id"] = next(seq)
        raw_datum["loss_fn_input_spans"] = [
            {"type": "sampled_tokens", "sequence_id": sid, "offset": -1, "length": 3}
        ]
        _user_error(await h.post("forward_backward", raw), "offset must be an int >= 0")
        # Another session's model cannot use this session's recordings.
        other_session = await h.session()
        other_model = await h.model(other_session)
        response = await _forward_backward(h, wire, other_model, 1, [good])
        _user_error(response, "data[0].model_input_spans[0]", repr(sid), "another session")
        # The good datum still trains: nothing above consumed or broke the recording.
        response = await _forward_backward(h, wire, model, next(seq), [good])
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("wire", WIRES)
async def test_recordings_expire_a_day_after_last_use(
    tmp_path: Path, autojump_clock: object, wire: str
) -> None:
    async with open_harness(tmp_path) as h:
        session = await h.session()
        model = await h.model(session)
        sampler = await _sampler(h, session)
        used_sid, used = await _sample(h, sampler, 0)
        idle_sid, idle = await _sample(h, sampler, 1)
        start = trio.current_time()
        await trio.sleep(RECORDING_TTL - 10)
        response = await _forward_backward(h, wire, model, 1, [_datum(used_sid, used)])
        assert response.status_code == 200, response.text
        await trio.sleep(10)
        assert trio.current_time() - start >= RECORDING_TTL
        response = await _forward_backward(h, wire, model, 2, [_datum(idle_sid, idle)])
        _user_error(response, "data[0].model_input_spans[0]", repr(idle_sid), "expired")
        # The used one was renewed by its use and lives until a day after it.
        response = await _forward_backward(h, wire, model, 3, [_datum(used_sid, used)])
        assert response.status_code == 200, response.text
        await trio.sleep(RECORDING_TTL)
        response = await _forward_backward(h, wire, model, 4, [_datum(used_sid, used)])
        _user_error(response, repr(used_sid), "expired")


def test_sample_ids_are_the_sequence_ids_in_both_result_forms() -> None:
    """A protobuf result has no ids (6.5): they come from the submit answer, as in JSON."""
    response = t.SampleResponse(
        sequences=[
            t.SampledSequence(stop_reason="length", tokens=[1, 2], logprobs=[-0.5, -0.25]),
            t.SampledSequence(stop_reason="stop", tokens=[3], logprobs=[-1.0]),
        ]
    )
    decoded = _protobuf.decode_sample_response(
        _protobuf.encode_sample_response(response), ["r:0", "r:1"]
    )
    assert [s.sequence_id for s in decoded.sequences] == ["r:0", "r:1"]
    assert np.allclose(decoded.sequences[0].logprobs or [], [-0.5, -0.25])
