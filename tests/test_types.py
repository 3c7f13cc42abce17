"""Golden JSON tests for the wire types, from PROTOCOL.md's examples (both A.0 conventions)."""

from __future__ import annotations

import json
from datetime import datetime

import msgspec
import numpy as np
import pytest

from tinkex_trio import types as t


def _j(obj: object) -> object:
    return json.loads(t.encode(obj))


def test_create_model_request_sends_defaults_and_type() -> None:
    req = t.CreateModelRequest(
        session_id="sess-1",
        model_seq_id=0,
        base_model="Qwen/Qwen3-8B",
        lora_config=t.LoraConfig(rank=16, seed=7),
    )
    assert _j(req) == {
        "session_id": "sess-1",
        "model_seq_id": 0,
        "base_model": "Qwen/Qwen3-8B",
        "lora_config": {
            "rank": 16,
            "seed": 7,
            "train_unembed": True,
            "train_mlp": True,
            "train_attn": True,
        },
        "optimizer_config": {"type": "adamw"},
        "type": "create_model",
    }


def test_unset_fields_are_omitted_not_null() -> None:
    req = t.CreateModelRequest(session_id="s", model_seq_id=1, base_model="m")
    body = _j(req)
    assert isinstance(body, dict)
    assert "user_metadata" not in body
    assert "seed" not in body["lora_config"]


def test_sample_request_golden() -> None:
    req = t.SampleRequest(
        num_samples=4,
        prompt=t.ModelInput.from_ints([151644, 872, 198]),
        sampling_params=t.SamplingParams(
            max_tokens=256, seed=1234, stop=["<|im_end|>"], temperature=0.7
        ),
        sampling_session_id="sess-1:sample:0",
        seq_id=17,
    )
    assert _j(req) == {
        "num_samples": 4,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [151644, 872, 198]}]},
        "sampling_params": {
            "max_tokens": 256,
            "seed": 1234,
            "stop": ["<|im_end|>"],
            "temperature": 0.7,
            "top_k": -1,
            "top_p": 1.0,
        },
        "sampling_session_id": "sess-1:sample:0",
        "seq_id": 17,
        "prompt_logprobs": False,
        "topk_prompt_logprobs": 0,
        "record_stability_info": False,
        "type": "sample",
    }


def test_stop_omitted_differs_from_empty_list() -> None:
    omitted = t.decode_request(b'{"max_tokens": 3}', t.SamplingParams)
    empty = t.decode_request(b'{"max_tokens": 3, "stop": []}', t.SamplingParams)
    null = t.decode_request(b'{"max_tokens": 3, "stop": null}', t.SamplingParams)
    assert omitted.stop_list() is None
    assert null.stop_list() is None
    assert empty.stop_list() == []
    assert t.SamplingParams(stop=[2, 5]).stop_list() == [2, 5]
    assert t.SamplingParams(stop="\n").stop_list() == ["\n"]
    assert "stop" not in _j(t.SamplingParams())  # type: ignore[operator]
    assert _j(t.SamplingParams(stop=[]))["stop"] == []  # type: ignore[index]


def test_mixed_stop_list_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="all strings"):
        t.SamplingParams(stop=["a", 1])


def test_decode_request_accepts_015_conventions() -> None:
    """No `type` anywhere, chunk kinds inferred from keys, explicit nulls (A.0)."""
    body = {
        "num_samples": 2,
        "prompt": {
            "chunks": [
                {"tokens": [1, 2, 3]},
                {"data": "aGVsbG8=", "format": "png", "expected_tokens": 1},
                {"location": "https://x/cat.jpg", "format": "jpeg"},
            ]
        },
        "sampling_params": {"max_tokens": 64, "seed": None, "stop": ["\n\n"]},
        "sampling_session_id": "sess-1:sample:0",
        "seq_id": 5,
        "prompt_logprobs": True,
        "topk_prompt_logprobs": 2,
        "base_model": None,
        "model_path": None,
    }
    req = t.decode_request(json.dumps(body).encode(), t.SampleRequest)
    chunks = req.prompt.chunks
    assert isinstance(chunks[0], t.EncodedTextChunk) and chunks[0].tokens == [1, 2, 3]
    assert isinstance(chunks[1], t.ImageChunk) and chunks[1].data == b"hello"
    assert isinstance(chunks[2], t.ImageAssetPointerChunk)
    assert req.sampling_params.seed is t.UNSET
    assert req.sampling_params.temperature == 1.0
    assert req.base_model is t.UNSET


def test_decode_request_accepts_038_conventions() -> None:
    req = t.CreateModelRequest(session_id="s", model_seq_id=3, base_model="m")
    assert t.decode_request(t.encode(req), t.CreateModelRequest) == req


def test_decode_request_rejects_wrong_type_constant_with_path() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.type"):
        t.decode_request(b'{"model_id": "m", "type": "optim_step"}', t.GetInfoRequest)
    with pytest.raises(msgspec.ValidationError, match="model_id"):
        t.decode_request(b'{"type": "get_info"}', t.GetInfoRequest)


def test_forward_backward_json_body_a1() -> None:
    datum = t.Datum(
        model_input=t.ModelInput.from_ints([101, 4021, 318, 257]),
        loss_fn_inputs={
            "target_tokens": [4021, 318, 257, 1332],
            "logprobs": [-1.5, -0.25, -2.0, -0.125],
            "advantages": np.array([0.0, 0.5, 0.5, 0.5]),
        },
    )
    req = t.ForwardBackwardRequest(
        forward_backward_input=t.ForwardBackwardInput(
            data=[datum],
            loss_fn="ppo",
            loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.28},
        ),
        model_id="sess-1:train:0",
        seq_id=3,
    )
    body = _j(req)
    assert body == {
        "forward_backward_input": {
            "data": [
                {
                    "model_input": {
                        "chunks": [{"type": "encoded_text", "tokens": [101, 4021, 318, 257]}]
                    },
                    "loss_fn_inputs": {
                        "target_tokens": {
                            "data": [4021, 318, 257, 1332],
                            "dtype": "int64",
                            "shape": [4],
                        },
                        "logprobs": {
                            "data": [-1.5, -0.25, -2.0, -0.125],
                            "dtype": "float32",
                            "shape": [4],
                        },
                        "advantages": {
                            "data": [0.0, 0.5, 0.5, 0.5],
                            "dtype": "float32",
                            "shape": [4],
                        },
                    },
                }
            ],
            "loss_fn": "ppo",
            "loss_fn_config": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.28},
        },
        "model_id": "sess-1:train:0",
        "seq_id": 3,
    }
    # ... and the server reads it back, also in the 0.15 form without chunk types.
    again = t.decode_request(t.encode(req), t.ForwardBackwardRequest)
    assert again == req


def test_datum_dtype_by_key_rules() -> None:
    d = t.Datum(
        model_input=t.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": [0, 1]},
    )
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert d.loss_fn_inputs["weights"].dtype == "float32"
    assert d.loss_fn_inputs["weights"].data == [0.0, 1.0]
    with pytest.raises(ValueError, match="only"):
        t.Datum(model_input=t.ModelInput.from_ints([1]), loss_fn_inputs={"mystery": [1]})


def test_tensor_data_numpy_round_trip_dense_and_sparse() -> None:
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    td = t.TensorData.from_numpy(arr)
    assert td.dtype == "int64" and td.shape == [2, 3]
    np.testing.assert_array_equal(td.to_numpy(), arr)
    f = t.TensorData.from_numpy(np.array([0.5, 1.5], dtype=np.float64))
    assert f.dtype == "float32" and f.to_numpy().dtype == np.float32
    sparse = msgspec.json.decode(
        b'{"data": [17, 942], "dtype": "int64", "shape": [5, 1],'
        b' "sparse_crow_indices": [0, 0, 0, 1, 1, 2], "sparse_col_indices": [0, 0]}',
        type=t.TensorData,
    )
    np.testing.assert_array_equal(sparse.to_numpy(pad_value=-1).ravel(), [-1, -1, 17, -1, 942])


def test_model_input_helpers() -> None:
    class Tok:
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    mi = t.ModelInput.from_text("ab", Tok())
    assert mi.to_ints() == [97, 98] and mi.length == 2
    mi2 = mi.append_int(5).append(t.ImageChunk(data=b"x", format="png", expected_tokens=3))
    assert mi2.length == 6
    with pytest.raises(ValueError, match="text-only"):
        mi2.to_ints()
    assert mi.to_ints() == [97, 98]  # append returns new inputs


def test_sample_response_decodes_015_json_and_ignores_extras() -> None:
    body = {
        "type": "sample",
        "sequences": [
            {
                "stop_reason": "stop",
                "tokens": [791, 6460, 151645],
                "logprobs": [-0.31, -1.07, -0.02],
            },
            {"stop_reason": "length", "tokens": [791], "extra_key": 1},
        ],
        "prompt_logprobs": [None, -7.91],
        "topk_prompt_logprobs": [None, [[872, -0.02], [4891, -4.4]]],
    }
    resp = t.decode(json.dumps(body), t.SampleResponse)
    assert resp.sequences[1].logprobs is None
    assert resp.topk_prompt_logprobs == [None, [(872, -0.02), (4891, -4.4)]]
    with pytest.raises(msgspec.ValidationError):
        t.decode(b'{"sequences": [{"stop_reason": "eos", "tokens": []}]}', t.SampleResponse)


def test_poll_envelope_classifies_bodies() -> None:
    env = t.decode(
        b'{"type": "try_again", "request_id": "r", "queue_state": "paused_capacity"}',
        t.PollEnvelope,
    )
    assert env.type == "try_again" and t.normalize_queue_state(env.queue_state) == "paused_capacity"
    failed = t.decode(b'{"error": "bad", "category": "weird"}', t.PollEnvelope)
    assert failed.error == "bad" and t.normalize_category(failed.category) == "unknown"


def test_rest_shapes_golden() -> None:
    body = b"""{"training_runs": [{"training_run_id": "sess-1:train:0", "base_model": "Qwen/Qwen3-8B",
       "model_owner": "tml:user:42", "is_lora": true, "lora_rank": 16, "corrupted": false,
       "last_request_time": "2026-01-05T10:22:31Z",
       "last_checkpoint": {"checkpoint_id": "weights/step-100", "checkpoint_type": "training",
         "time": "2026-01-05T10:20:00Z", "tinker_path": "tinker://sess-1:train:0/weights/step-100",
         "size_bytes": 167772160, "public": false, "expires_at": null},
       "last_sampler_checkpoint": null, "user_metadata": {"exp": "a"}}],
     "cursor": {"offset": 0, "limit": 20, "total_count": 1}}"""
    runs = t.decode(body, t.TrainingRunsResponse)
    run = runs.training_runs[0]
    assert run.last_checkpoint is not None and run.last_checkpoint.size_bytes == 167772160
    assert run.last_request_time.tzinfo is not None
    assert runs.cursor.next_offset is None
    # Re-encoded as an official server sends it: nulls and defaults included.
    encoded = _j(run)
    assert isinstance(encoded, dict)
    assert encoded["last_sampler_checkpoint"] is None and encoded["corrupted"] is False
    cp = t.Checkpoint(
        checkpoint_id="weights/a",
        checkpoint_type="training",
        time=datetime.fromisoformat("2026-01-05T10:20:00+00:00"),
        tinker_path="tinker://r/weights/a",
    )
    # A strict client never gets null where it expects a value: `public` has a real default.
    assert _j(cp) == {
        "checkpoint_id": "weights/a",
        "checkpoint_type": "training",
        "time": "2026-01-05T10:20:00Z",
        "tinker_path": "tinker://r/weights/a",
        "size_bytes": None,
        "public": False,
        "user_metadata": None,
        "expires_at": None,
    }


def test_finish_session_sends_explicit_null_detail() -> None:
    req = t.FinishSessionRequest(reason=t.FinishReason(type="interrupted"))
    assert _j(req) == {"reason": {"type": "interrupted"}, "detail": None}


def test_ttl_request_sends_null_to_remove() -> None:
    assert _j(t.SetCheckpointTtlRequest()) == {"ttl_seconds": None}
    assert t.decode_request(b'{"ttl_seconds": null}', t.SetCheckpointTtlRequest).ttl_seconds is None


@pytest.mark.parametrize(
    ("path", "run", "kind", "cid"),
    [
        (
            "tinker://sess-1:train:0/weights/step-100",
            "sess-1:train:0",
            "training",
            "weights/step-100",
        ),
        ("tinker://r/sampler_weights/s", "r", "sampler", "sampler_weights/s"),
        ("tinker://r/external_weights/e", "r", "external", "external_weights/e"),
    ],
)
def test_tinker_path_parse(path: str, run: str, kind: str, cid: str) -> None:
    parsed = t.ParsedTinkerPath.parse(path)
    assert (parsed.training_run_id, parsed.kind, parsed.checkpoint_id) == (run, kind, cid)
    assert str(parsed) == path


@pytest.mark.parametrize(
    "bad",
    ["http://x/weights/a", "tinker://r/weights", "tinker://r/other/a", "tinker://r/weights/a/b"],
)
def test_tinker_path_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="tinker"):
        t.ParsedTinkerPath.parse(bad)


def test_adam_params_validation() -> None:
    assert _j(t.AdamParams()) == {
        "learning_rate": 0.0001,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }
    with pytest.raises(ValueError, match="learning_rate"):
        t.AdamParams(learning_rate=-1)
    with pytest.raises(ValueError, match="beta1"):
        t.AdamParams(beta1=1.0)


def test_lora_config_rejects_all_false() -> None:
    with pytest.raises(ValueError, match="at least one"):
        t.LoraConfig(train_attn=False, train_mlp=False, train_unembed=False)


def test_response_constants_and_defaults_are_always_sent() -> None:
    """Responses emit every field, `type` tags and defaults included; UNSET ones are left out."""
    assert _j(t.TryAgainResponse(request_id="r", queue_state="active")) == {
        "type": "try_again",
        "request_id": "r",
        "queue_state": "active",
    }
    with_null = t.TryAgainResponse(request_id="r", queue_state="active", queue_state_reason=None)
    assert _j(with_null) == {
        **_j(t.TryAgainResponse(request_id="r", queue_state="active")),
        "queue_state_reason": None,
    }  # type: ignore[dict-item]
    assert _j(t.SampleResponse(sequences=[])) == {
        "sequences": [],
        "prompt_logprobs": None,
        "topk_prompt_logprobs": None,
        "prompt_cache_hit_tokens": 0,
        "type": "sample",
    }
    assert _j(t.FutureCompletion(state="failed", request_id="r")) == {
        "state": "failed",
        "request_id": "r",
    }
    assert _j(t.TelemetryResponse(status="accepted")) == {"status": "accepted"}
    assert _j(t.HealthResponse(status="ok")) == {"status": "ok"}
    assert _j(
        t.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[], metrics={})
    ) == {"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": [], "metrics": {}}
    assert _j(t.CompleteMetadataResponse(response_payload_size=5)) == {
        "status": "complete_metadata",
        "response_payload_size": 5,
    }
