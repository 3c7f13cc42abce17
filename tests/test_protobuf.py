"""The protobuf codec (PROTOCOL.md 6): round trips, the byte rules of 6.4/6.5, malformed input."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import pytest

from tinkex_trio import _protobuf as proto, types as t
from tinkex_trio.errors import InvalidInputError

pb: Any = proto._pb


def _datums(numpy_backed: bool) -> list[t.Datum]:
    rng = np.random.default_rng(0)
    out = []
    for n in (3, 7):
        tokens = rng.integers(0, 50_000, size=n + 1)
        targets = tokens[1:]
        weights = rng.random(n).astype(np.float32)
        if numpy_backed:
            model_input = t.ModelInput.from_ints(tokens[:-1])
            inputs: dict[str, Any] = {"target_tokens": targets, "weights": weights}
        else:
            model_input = t.ModelInput.from_ints(tokens[:-1].tolist())
            inputs = {"target_tokens": targets.tolist(), "weights": weights.tolist()}
        out.append(t.Datum(model_input=model_input, loss_fn_inputs=inputs))
    return out


def _plain(obj: object) -> Any:
    """Builtins for comparison: protobuf maps do not keep insertion order, dicts compare fine."""
    return msgspec.to_builtins(obj, enc_hook=t.enc_hook)  # held arrays: lists


def _encode(data: list[t.Datum], **kw: Any) -> bytes:
    args: dict[str, Any] = dict(
        model_id="s:train:0",
        seq_id=3,
        data=data,
        loss_fn="cross_entropy",
        loss_fn_config=None,
        forward_only=False,
    )
    args.update(kw)
    return proto.encode_forward_backward_request(**args)


def test_request_from_numpy_and_from_lists_is_byte_identical_and_round_trips() -> None:
    from_numpy = _encode(_datums(True))
    from_lists = _encode(_datums(False))
    assert from_numpy == from_lists
    decoded = proto.decode_forward_backward_request(from_numpy)
    assert (decoded.model_id, decoded.seq_id, decoded.forward_only) == ("s:train:0", 3, False)
    assert _plain(decoded.data) == _plain(_datums(False))


def _runtime_body(data: list[t.Datum], **kw: Any) -> bytes:
    """The reference: the whole request built as protobuf messages and serialized by the
    runtime deterministically (what the hand framing must reproduce byte for byte)."""
    message = pb.ForwardBackwardRequest(
        model_id=kw["model_id"],
        seq_id=kw["seq_id"],
        loss_fn=kw["loss_fn"],
        forward_only=kw["forward_only"],
    )
    for key, value in (kw["loss_fn_config"] or {}).items():
        if isinstance(value, str):
            message.loss_fn_config_v2[key].text = value
        else:
            message.loss_fn_config[key] = float(value)
            message.loss_fn_config_v2[key].number = float(value)
    for index, datum in enumerate(data):
        proto._fill_datum(message.data.add(), datum, index)
    body: bytes = message.SerializeToString(deterministic=True)
    return body


def test_hand_framed_body_equals_the_runtimes_serialization() -> None:
    """Text chunks and dense tensors are framed by hand around their buffers; every other
    datum is serialized by the runtime. Either way the bytes are the runtime's."""
    rng = np.random.default_rng(5)
    image = t.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=2)
    span = [t.PromptProvenanceSpan(sequence_id="s-0", length=3)]
    data = [
        *_datums(True),
        *_datums(False),
        t.Datum(  # two chunks, one empty; 2-D tensor; keys out of order; 300 tokens (varints)
            model_input=t.ModelInput(
                chunks=[
                    t.EncodedTextChunk(tokens=[]),
                    t.EncodedTextChunk(tokens=rng.integers(0, 2**31 - 1, 300).tolist()),
                ]
            ),
            loss_fn_inputs={
                "weights": rng.random((300, 2)).astype(np.float32),
                "advantages": t.TensorData(data=[], dtype="float32", shape=[300, 0]),
                "target_tokens": np.arange(300),
            },
        ),
        t.Datum(  # an image: the runtime path
            model_input=t.ModelInput(chunks=[t.EncodedTextChunk(tokens=[1]), image]),
            loss_fn_inputs={"target_tokens": [2, 3, 4]},
        ),
        t.Datum(  # a sparse tensor
            model_input=t.ModelInput.from_ints([1, 2]),
            loss_fn_inputs={
                "target_tokens": t.TensorData(
                    data=[5],
                    dtype="int64",
                    shape=[2, 1],
                    sparse_crow_indices=[0, 1, 1],
                    sparse_col_indices=[0],
                )
            },
        ),
        t.Datum(
            model_input=t.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [1, 2, 3]},
        ).with_provenance(span, span),
    ]
    for kw in (
        dict(
            model_id="s:train:0",
            seq_id=3,
            loss_fn="ppo",
            forward_only=False,
            loss_fn_config={"clip_low_threshold": 0.8, "mode": "x", "b": 0.0},
        ),
        dict(
            model_id="", seq_id=0, loss_fn="cross_entropy", forward_only=True, loss_fn_config=None
        ),
        dict(
            model_id="m" * 200, seq_id=2**31 - 1, loss_fn="", forward_only=False, loss_fn_config={}
        ),
    ):
        assert _encode(data, **kw) == _runtime_body(data, **kw)
        assert _encode(data[:2], **kw) == _runtime_body(data[:2], **kw)
        assert _encode([], **kw) == _runtime_body([], **kw)


def test_request_fields_follow_section_6_2() -> None:
    body = _encode(
        _datums(True)[:1],
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.8, "note": "x"},
        forward_only=True,
    )
    message = pb.ForwardBackwardRequest()
    message.ParseFromString(body)
    assert message.forward_only and message.loss_fn == "ppo"
    # Numbers go to both maps, strings only to v2.
    assert dict(message.loss_fn_config) == {"clip_low_threshold": 0.8}
    assert message.loss_fn_config_v2["clip_low_threshold"].number == 0.8
    assert message.loss_fn_config_v2["note"].text == "x"
    datum = message.data[0]
    assert len(datum.model_input[0].encoded_text.tokens) == 4 * 3  # int32
    targets = datum.loss_fn_inputs["target_tokens"]
    assert (targets.dtype, list(targets.shape), len(targets.dense)) == (proto.DTYPE_INT64, [3], 24)
    weights = datum.loss_fn_inputs["weights"]
    assert (weights.dtype, len(weights.dense)) == (proto.DTYPE_FLOAT32, 12)
    decoded = proto.decode_forward_backward_request(body)
    assert decoded.loss_fn_config == {"clip_low_threshold": 0.8, "note": "x"}


def test_sparse_tensor_and_image_round_trip() -> None:
    sparse = t.TensorData(
        data=[1, 2, 3],
        dtype="int64",
        shape=[2, 4],
        sparse_crow_indices=[0, 1, 3],
        sparse_col_indices=[2, 0, 3],
    )
    datum = t.Datum(
        model_input=t.ModelInput(
            chunks=[
                t.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=1),
                t.EncodedTextChunk(tokens=[5]),
            ]
        ),
        loss_fn_inputs={"target_prompt": sparse},
    )
    decoded = proto.decode_forward_backward_request(_encode([datum]))
    assert _plain(decoded.data[0]) == _plain(datum)


def test_image_pointer_cannot_go_as_protobuf() -> None:
    datum = t.Datum(
        model_input=t.ModelInput(
            chunks=[t.ImageAssetPointerChunk(format="png", location="s3://x", expected_tokens=1)]
        ),
        loss_fn_inputs={"target_tokens": [1]},
    )
    with pytest.raises(InvalidInputError, match="image_asset_pointer"):
        _encode([datum])


def test_malformed_request_bytes_are_value_errors() -> None:
    message = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    message.data.add().model_input.add().encoded_text.tokens = b"\x01\x02\x03"  # not int32s
    with pytest.raises(ValueError, match="multiple of 4"):
        proto.decode_forward_backward_request(message.SerializeToString())
    with pytest.raises(ValueError, match="does not parse"):
        proto.decode_forward_backward_request(b"\xff\xff\xff")


def test_zstd_round_trip_and_bomb_limit() -> None:
    body = _encode(_datums(True))
    assert proto.decompress(proto.compress(body)) == body
    with pytest.raises(ValueError, match="inflates past"):
        proto.decompress(proto.compress(b"\0" * 10_000), limit=1000)
    with pytest.raises(ValueError, match="could not be decompressed"):
        proto.decompress(b"not zstd")


def test_forward_backward_output_round_trip_with_trailing_shape() -> None:
    output = t.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {
                "logprobs": t.TensorData.from_numpy(np.array([-1.0, -2.0], np.float32)),
                "topk": t.TensorData.from_numpy(np.arange(6).reshape(2, 3)),
            },
            {
                "logprobs": t.TensorData.from_numpy(np.array([-3.0], np.float32)),
                "topk": t.TensorData.from_numpy(np.arange(3).reshape(1, 3)),
            },
        ],
        metrics={"loss:sum": 6.0},
    )
    body = proto.encode_forward_backward_output(output)
    message = pb.ForwardBackwardOutput()
    message.ParseFromString(body)
    field = message.loss_fn_outputs[0].fields["logprobs"]
    assert np.frombuffer(field.offsets, "<i8").tolist() == [0, 8, 12]  # byte offsets
    assert list(message.loss_fn_outputs[0].fields["topk"].trailing_shape) == [3]
    decoded = proto.decode_forward_backward_output(body)
    assert decoded.loss_fn_output_type == output.loss_fn_output_type
    assert decoded.metrics == output.metrics
    assert _plain(decoded.loss_fn_outputs) == _plain(output.loss_fn_outputs)


def test_output_decoding_widens_int32_and_bfloat16_and_strips_type_prefix() -> None:
    message = pb.ForwardBackwardOutput(loss_fn_output_type="pkg.mod:TorchLossReturn")
    record = message.loss_fn_outputs.add(num_datums=2)
    ints = record.fields["ids"]
    ints.dtype = proto.DTYPE_INT32
    ints.data = np.array([7, 8, 9], "<i4").tobytes()
    ints.offsets = np.array([0, 4, 12], "<i8").tobytes()
    halves = record.fields["lp"]
    halves.dtype = proto.DTYPE_BFLOAT16
    # bfloat16 of -1.0 and 0.5 are the high halves of their float32 bit patterns.
    bits = (np.array([-1.0, 0.5, 2.0], np.float32).view(np.uint32) >> 16).astype("<u2")
    halves.data = bits.tobytes()
    halves.offsets = np.array([0, 2, 6], "<i8").tobytes()
    decoded = proto.decode_forward_backward_output(message.SerializeToString())
    assert decoded.loss_fn_output_type == "TorchLossReturn"
    assert [o["ids"].data for o in decoded.loss_fn_outputs] == [[7], [8, 9]]
    assert decoded.loss_fn_outputs[1]["ids"].dtype == "int64"
    assert [o["lp"].data for o in decoded.loss_fn_outputs] == [[-1.0], [0.5, 2.0]]


def test_output_with_bad_offsets_is_rejected() -> None:
    message = pb.ForwardBackwardOutput()
    field = message.loss_fn_outputs.add(num_datums=1).fields["logprobs"]
    field.dtype = proto.DTYPE_FLOAT32
    field.data = np.zeros(2, "<f4").tobytes()
    field.offsets = np.array([0, 4], "<i8").tobytes()  # does not reach the end
    with pytest.raises(ValueError, match="offsets"):
        proto.decode_forward_backward_output(message.SerializeToString())


def test_sample_response_round_trip_nan_to_none_and_topk_rows() -> None:
    response = t.SampleResponse(
        sequences=[
            t.SampledSequence(stop_reason="stop", tokens=[1, 2], logprobs=[-0.5, -0.25]),
            t.SampledSequence(stop_reason="length", tokens=[3], logprobs=[-1.0]),
        ],
        prompt_logprobs=[None, -4.0, -0.5],
        topk_prompt_logprobs=[None, [(5, -0.5), (6, -1.5)], [(7, -0.25)]],
    )
    body = proto.encode_sample_response(response)
    message = pb.SampleResponse()
    message.ParseFromString(body)
    assert (message.topk_prompt_logprobs.k, message.topk_prompt_logprobs.length) == (2, 3)
    assert [s.stop_reason for s in message.sequences] == [0, 1]
    assert math.isnan(np.frombuffer(message.prompt_logprobs, "<f4")[0])
    decoded = proto.decode_sample_response(body, ["a", "b"])
    assert [s.sequence_id for s in decoded.sequences] == ["a", "b"]
    assert decoded.prompt_logprobs == [None, -4.0, -0.5]
    assert decoded.topk_prompt_logprobs == [None, [(5, -0.5), (6, -1.5)], [(7, -0.25)]]
    assert [s.tokens for s in decoded.sequences] == [[1, 2], [3]]
    assert decoded.sequences[1].stop_reason == "length"
    with pytest.raises(ValueError, match="sample_sequence_ids"):
        proto.decode_sample_response(body, ["only-one"])


def test_sample_response_unknown_stop_reason_is_rejected() -> None:
    message = pb.SampleResponse()
    message.sequences.add(stop_reason=7, tokens=b"")
    with pytest.raises(ValueError, match="stop_reason"):
        proto.decode_sample_response(message.SerializeToString())
