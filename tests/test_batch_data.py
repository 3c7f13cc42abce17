"""The batch data path (issue 12 item 1): each array converted once, bodies encoded once.

Conversions: lists of Python numbers are checked and copied in C and kept as the JSON data;
numpy and torch inputs keep their buffer for the protobuf encoder; odd inputs (numpy scalars,
bools, generators) still convert exactly as before. Bodies: a forward_backward chunk is encoded
once and the very same bytes go out on every retry; a large JSON result is parsed once.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
from fake_tinker import FakeTinker
from fault_server import open_fault_server

from tinkex_trio import Config, _fwdbwd, _polling, _protobuf, open_service, types as t
from tinkex_trio.types._inputs import held_array


def test_from_ints_copies_a_list_of_ints_and_keeps_no_alias() -> None:
    tokens = [3, 1, 4, 1, 5]
    model_input = t.ModelInput.from_ints(tokens)
    tokens.append(9)  # the caller's list is theirs: the chunk took a copy
    chunk = model_input.chunks[0]
    assert isinstance(chunk, t.EncodedTextChunk)
    assert chunk.tokens == [3, 1, 4, 1, 5]
    assert not hasattr(chunk, "_array")  # nothing converted that the JSON path does not need


@pytest.mark.parametrize(
    "tokens",
    [
        (3, 1, 4),
        [np.int64(3), np.int32(1), np.uint16(4)],
        iter([3, 1, 4]),
        range(3, 0, -1),
    ],
)
def test_from_ints_accepts_every_int_sequence_as_before(tokens: Any) -> None:
    values = t.ModelInput.from_ints(tokens).to_ints()
    assert all(type(v) is int for v in values)
    assert values in ([3, 1, 4], [3, 2, 1])


def test_from_ints_keeps_bools_and_truncating_floats_as_int_did() -> None:
    assert t.ModelInput.from_ints([True, 2]).to_ints() == [1, 2]
    assert t.ModelInput.from_ints([1.9, 2.0]).to_ints() == [1, 2]
    with pytest.raises(ValueError):
        t.ModelInput.from_ints(["x"])  # type: ignore[list-item]


def test_from_ints_of_numpy_and_torch_keeps_the_buffer() -> None:
    array = np.arange(10, dtype=np.int64)
    chunk = t.ModelInput.from_ints(array).chunks[0]
    # The buffer is held until the tokens are read (then the list handed out is the value).
    assert np.shares_memory(chunk._array, array)  # type: ignore[union-attr]
    assert chunk.tokens == list(range(10))  # type: ignore[union-attr]
    torch = pytest.importorskip("torch")
    tensor = torch.arange(5)
    chunk = t.ModelInput.from_ints(tensor).chunks[0]
    assert np.shares_memory(chunk._array, tensor.numpy())  # type: ignore[union-attr]
    assert chunk.tokens == [0, 1, 2, 3, 4]  # type: ignore[union-attr]


def test_from_list_keeps_python_numbers_and_checks_them() -> None:
    weights = [0.1, 1, 2.5]
    tensor = t.TensorData.from_list(weights, "float32")
    weights[0] = 7.0
    # Copied, ints widened to float, values kept as given (float32 rounding happens where the
    # bytes are made: the protobuf encoder, or the server reading JSON).
    assert tensor.data == [0.1, 1.0, 2.5] and all(type(v) is float for v in tensor.data)
    assert tensor.resolved_shape() == [3]
    assert t.TensorData.from_list([1, 2], "int64").data == [1, 2]
    # Values numpy converts (floats for int64, numpy scalars) go through numpy, as before.
    assert t.TensorData.from_list([1.7, np.int64(2)], "int64").data == [1, 2]
    with pytest.raises(ValueError, match="flat list"):
        t.TensorData.from_list([[1, 2], [3, 4]], "int64")
    with pytest.raises(ValueError):
        t.TensorData.from_list(["a"], "float32")  # type: ignore[list-item]


def test_json_body_from_lists_is_the_bare_msgspec_encoding_of_the_same_data() -> None:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 1000, size=33).tolist()
    weights = rng.random(32).tolist()
    d = t.Datum(
        model_input=t.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )
    _, body = _fwdbwd.encode_json(_fwdbwd.FwdBwdChunk("m", 1, [d], "cross_entropy", None, False))
    sent = msgspec.json.decode(body)["forward_backward_input"]["data"][0]
    assert sent["model_input"]["chunks"][0]["tokens"] == tokens[:-1]
    assert sent["loss_fn_inputs"]["weights"]["data"] == weights  # exact, no detour via float32
    assert sent["loss_fn_inputs"]["target_tokens"]["data"] == tokens[1:]


class _NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


@pytest.mark.parametrize("wire_format", ["json", "protobuf"])
async def test_a_retried_chunk_sends_the_same_bytes_encoded_once(
    wire_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503, 503, then success (layer A) over real sockets: three identical bodies, one encode."""
    fake = FakeTinker()
    fake.faults["/api/v1/forward_backward"] = [503, 503]
    encoded: list[bytes] = []
    real_json, real_proto = _fwdbwd.encode_json, _fwdbwd.encode_protobuf

    def count_json(chunk: _fwdbwd.FwdBwdChunk) -> tuple[str, bytes]:
        path, body = real_json(chunk)
        encoded.append(body)
        return path, body

    def count_proto(chunk: _fwdbwd.FwdBwdChunk) -> bytes:
        encoded.append(real_proto(chunk))
        return encoded[-1]

    monkeypatch.setattr(_fwdbwd, "encode_json", count_json)
    monkeypatch.setattr(_fwdbwd, "encode_protobuf", count_proto)

    # The fake server reads JSON only: answer a protobuf body's 503s, then stop there.
    with trio.fail_after(30):
        async with open_fault_server(fake.fault_handler) as server:
            if wire_format == "protobuf":
                from fault_server import Reply

                server.script("POST", "/api/v1/forward_backward", Reply(status=503))
                server.script("POST", "/api/v1/forward_backward", Reply(status=503))
                server.script(
                    "POST", "/api/v1/forward_backward", Reply(status=400, body=b'{"detail":"x"}')
                )
            config = Config(
                api_key=fake.api_key,
                base_url=server.base_url,
                telemetry=False,
                wire_format=wire_format,  # type: ignore[arg-type]
            )
            async with open_service(config) as service:
                service._ctx.transport.random = _NoJitter()
                training = await service.create_lora_training_client("fake/model")
                d = t.Datum(
                    model_input=t.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 0.5, 0.0]},
                )
                future = await training.forward_backward([d], "cross_entropy")
                if wire_format == "json":
                    await future
                else:
                    with pytest.raises(Exception, match="400"):
                        await future
            sent = [r for r in server.requests if r.path == "/api/v1/forward_backward"]
    assert len(encoded) == 1
    assert len(sent) == 3
    assert [r.body for r in sent] == [encoded[0]] * 3
    assert [r.headers["x-stainless-retry-count"] for r in sent] == ["0", "1", "2"]


async def test_a_large_json_result_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A result past `RESULT_FIRST_BYTES` is decoded straight into its type; small envelopes
    (try_again) are still classified first."""
    fake = FakeTinker()
    fake.poll_try_again = 1
    parses: list[str] = []
    real_decode = t.decode

    def counting_decode(body: bytes | str, type_: type[Any]) -> Any:
        parses.append(f"{type_.__name__}:{len(body) >= _polling.RESULT_FIRST_BYTES}")
        return real_decode(body, type_)

    monkeypatch.setattr(t, "decode", counting_decode)
    n = 20_000  # "-0.5, " per logprob in the fake's JSON: well past 64 KiB
    d = t.Datum(
        model_input=t.ModelInput.from_ints(list(range(n))),
        loss_fn_inputs={"target_tokens": list(range(1, n + 1))},
    )
    with trio.fail_after(30):
        async with open_fault_server(fake.fault_handler) as server:
            config = Config(api_key=fake.api_key, base_url=server.base_url, telemetry=False)
            async with open_service(config) as service:
                training = await service.create_lora_training_client("fake/model")
                parses.clear()
                out = await (await training.forward_backward([d], "cross_entropy"))
    assert out.loss_fn_outputs[0]["logprobs"].resolved_shape() == [n]
    polls = [p for p in parses if not p.startswith("UntypedAPIFuture")]
    assert polls == ["PollEnvelope:False", "ForwardBackwardOutput:True"]


def _slot(value: t.TensorData | t.EncodedTextChunk) -> object:
    """What the msgspec field holds (before `data`/`tokens` is read): list or array."""
    return msgspec.structs.astuple(value)[0]


def test_from_numpy_holds_the_array_and_makes_the_list_only_when_read() -> None:
    weights = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    tensor = t.TensorData.from_numpy(weights)
    chunk = t.ModelInput.from_ints(np.arange(4)).chunks[0]
    assert isinstance(chunk, t.EncodedTextChunk)
    assert isinstance(_slot(tensor), np.ndarray) and isinstance(_slot(chunk), np.ndarray)
    # Everything the SDK does to send it leaves it an array: size, shape, length, encoders.
    assert tensor.size == 6 and tensor.resolved_shape() == [2, 3] and chunk.length == 4
    as_list = t.TensorData(data=weights.ravel().tolist(), dtype="float32", shape=[2, 3])
    assert t.encode(tensor) == t.encode(as_list)
    assert t.encode(chunk) == t.encode(t.EncodedTextChunk(tokens=[0, 1, 2, 3]))
    assert isinstance(_slot(tensor), np.ndarray) and isinstance(_slot(chunk), np.ndarray)
    # Repr and equality read the values as lists, as for a tensor built from a list.
    assert repr(tensor) == repr(as_list) and repr(chunk) == "EncodedTextChunk(tokens=[0, 1, 2, 3])"
    assert tensor == as_list and chunk == t.EncodedTextChunk(tokens=[0, 1, 2, 3])
    # Reading gives a list of Python numbers, kept; from then on the list is the value.
    assert tensor.data == as_list.data and type(tensor.data[0]) is float
    assert tensor.data is tensor.data and type(_slot(tensor)) is list
    assert chunk.tokens == [0, 1, 2, 3] and type(chunk.tokens[0]) is int
    assert np.array_equal(tensor.to_numpy(), weights)
    # Assigning a new list replaces the held array everywhere.
    tensor.data = [9.0] * 6
    assert tensor.to_numpy().ravel().tolist() == [9.0] * 6


def test_a_list_read_and_changed_in_place_is_what_every_wire_form_sends() -> None:
    """Once `data`/`tokens` is read, the caller holds a mutable list: JSON and protobuf (and
    to_numpy) send that list, never the array it was built from."""
    tensor = t.TensorData.from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    model_input = t.ModelInput.from_ints(np.array([5, 6, 7]))
    chunk = model_input.chunks[0]
    assert isinstance(chunk, t.EncodedTextChunk)
    tensor.data[0] = 99.0
    chunk.tokens[0] = 42
    assert held_array(tensor) is None and held_array(chunk) is None
    assert tensor.to_numpy().tolist() == [99.0, 2.0, 3.0]
    datum = t.Datum(model_input=model_input, loss_fn_inputs={"weights": tensor})
    body = _protobuf.encode_forward_backward_request(
        model_id="m", seq_id=1, data=[datum], loss_fn="cross_entropy",
        loss_fn_config=None, forward_only=False,
    )  # fmt: skip
    [sent] = _protobuf.decode_forward_backward_request(body).data
    [sent_chunk] = sent.model_input.chunks
    assert isinstance(sent_chunk, t.EncodedTextChunk) and sent_chunk.tokens == [42, 6, 7]
    assert sent.loss_fn_inputs["weights"].data == [99.0, 2.0, 3.0]


def test_a_protobuf_result_decodes_into_arrays_not_lists() -> None:
    logprobs = np.array([-0.5, -0.25, -1.0], dtype=np.float32)
    body = _protobuf.encode_forward_backward_output(
        t.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=[{"logprobs": t.TensorData.from_numpy(logprobs)}],
            metrics={"loss:sum": 1.75},
        )
    )
    out = _protobuf.decode_forward_backward_output(body).loss_fn_outputs[0]["logprobs"]
    assert isinstance(_slot(out), np.ndarray)  # a view of the body, no list made
    assert out.resolved_shape() == [3] and np.array_equal(out.to_numpy(), logprobs)
    assert out.data == [-0.5, -0.25, -1.0]


def test_protobuf_from_lists_packs_exactly_as_numpy_does() -> None:
    """Lists are packed with `struct`; values it refuses go through numpy as before."""
    weights = [0.1, 1, 2.5, 1e-40, -0.0]
    targets = [1.7, np.int64(2), True, 3, 4]  # floats truncate, as numpy.asarray does

    def body(weight_values: Any, target_values: Any) -> bytes:
        d = t.Datum(
            model_input=t.ModelInput.from_ints([5, 6, 7, 8, 9]),
            loss_fn_inputs={
                "weights": t.TensorData(data=weight_values, dtype="float32", shape=[5]),
                "target_tokens": t.TensorData(data=target_values, dtype="int64", shape=[5]),
            },
        )
        if isinstance(weight_values, np.ndarray):  # the numpy path: held arrays
            d.loss_fn_inputs = {
                "weights": t.TensorData.from_numpy(weight_values),
                "target_tokens": t.TensorData.from_numpy(target_values),
            }
        return _protobuf.encode_forward_backward_request(
            model_id="m",
            seq_id=1,
            data=[d],
            loss_fn="cross_entropy",
            loss_fn_config=None,
            forward_only=False,
        )

    from_arrays = body(np.asarray(weights, dtype=np.float32), np.asarray(targets, dtype=np.int64))
    assert body(weights, targets) == from_arrays
    assert body(weights, [1, 2, 1, 3, 4]) == from_arrays
