"""Official response bodies survive a decode and re-encode with our Structs.

The bodies are PROTOCOL.md's examples of what an official server answers (section in each
row). Each is decoded with the Struct the SDK uses for it and encoded again, as the local
backend would send it. No field may be lost or changed. A field the example leaves out may be
added only with the value an official client assumes when it is absent (the field's
default), so the re-encoded body means the same to every client.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from tinkex_trio import types as t

EXAMPLES: list[tuple[str, type[t.Response], str]] = [
    (
        "3.1 client/config",
        t.ClientConfigResponse,
        '{"pjwt_auth_enabled": false, "use_pyqwest_transport": false, '
        '"proto_compress_fwdbwd": true, "fwdbwd_max_chunk_len": 256}',
    ),
    (
        "3.1 client/dynamic_config",
        t.DynamicConfigResponse,
        '{"refresh_interval_sec": 300, "sample_cancel_enabled": true, '
        '"sample_cancel_max_batch_size": 64}',
    ),
    ("3.1 auth/token", t.AuthTokenResponse, '{"jwt": "<header>.<payload>.<sig>"}'),
    (
        "3.1 create_session",
        t.CreateSessionResponse,
        '{"session_id": "3f6c2a1e-...", "type": "create_session", "warning_message": null}',
    ),
    ("3.1 session_heartbeat", t.SessionHeartbeatResponse, '{"type": "session_heartbeat"}'),
    ("3.1 session_heartbeat, empty", t.SessionHeartbeatResponse, "{}"),
    ("3.1 telemetry", t.TelemetryResponse, '{"status": "accepted"}'),
    ("3.1 healthz", t.HealthResponse, '{"status": "ok"}'),
    (
        "3.1 get_server_capabilities",
        t.ServerCapabilities,
        '{"supported_models": [{"model_name": "Qwen/Qwen3-8B", "max_context_length": 32768, '
        '"trainable": true, "sampleable": true}]}',
    ),
    (
        "A.5 get_server_capabilities (0.15)",
        t.ServerCapabilities,
        '{"supported_models": [{"model_name": "Qwen/Qwen3-8B"}]}',
    ),
    (
        "3.2 create_model result",
        t.CreateModelResponse,
        '{"model_id": "sess-1:train:0", "type": "create_model"}',
    ),
    (
        "3.2 get_info",
        t.GetInfoResponse,
        '{"type": "get_info", "model_id": "sess-1:train:0", "model_data": {"arch": "qwen3", '
        '"model_name": "Qwen/Qwen3-8B", "tokenizer_id": "Qwen/Qwen3-8B"}, '
        '"optimizer_config": {"type": "adamw"}, "is_lora": true, "lora_rank": 16, '
        '"model_name": "Qwen/Qwen3-8B"}',
    ),
    ("3.2 optim_step result", t.OptimStepResponse, '{"metrics": {"loss:sum": 0.43}}'),
    (
        "3.2 save_weights result",
        t.SaveWeightsResponse,
        '{"path": "tinker://sess-1:train:0/weights/step-100", "type": "save_weights"}',
    ),
    (
        "3.2 save_weights_for_sampler result (unnamed)",
        t.SaveWeightsForSamplerResponse,
        '{"sampling_session_id": "sess-1:sample:1", "type": "save_weights_for_sampler"}',
    ),
    (
        "3.2 save_weights_external result",
        t.SaveWeightsExternalResponse,
        '{"path": "tinker://sess-1:train:0/external_weights/final", "size_bytes": 123456789}',
    ),
    (
        "3.2 load_weights result",
        t.LoadWeightsResponse,
        '{"path": "tinker://sess-0:train:0/weights/step-100", "model_id": "sess-1:train:1", '
        '"type": "load_weights"}',
    ),
    (
        "A.5 unload_model result",
        t.UnloadModelResponse,
        '{"model_id": "sess-1:train:0", "type": "unload_model"}',
    ),
    (
        "3.3 create_sampling_session",
        t.CreateSamplingSessionResponse,
        '{"sampling_session_id": "sess-1:sample:0", "type": "create_sampling_session"}',
    ),
    (
        "3.3 samplers/{id}",
        t.GetSamplerResponse,
        '{"sampler_id": "sess-1:sample:0", "base_model": "Qwen/Qwen3-8B", '
        '"model_path": "tinker://sess-1:train:0/sampler_weights/s1"}',
    ),
    (
        "7.8 samplers/{id}, no model path",
        t.GetSamplerResponse,
        '{"sampler_id": "sess-1:sample:0", "base_model": "Qwen/Qwen3-8B", "model_path": null}',
    ),
    (
        "4.1 submit answer",
        t.UntypedAPIFuture,
        '{"request_id": "req-8f1c", "model_id": "sess-1:train:0"}',
    ),
    (
        "3.3 asample submit answer",
        t.UntypedAPIFuture,
        '{"request_id": "sess-1:sample:0:17", "sample_sequence_ids": ["seqA", "seqB", "seqC", '
        '"seqD"]}',
    ),
    ("A.2.2 asample submit answer (0.15)", t.UntypedAPIFuture, '{"request_id": "smp-0042"}'),
    (
        "4.6 try_again",
        t.TryAgainResponse,
        '{"type": "try_again", "request_id": "req-8f1c", "queue_state": "paused_capacity", '
        '"queue_state_reason": "Waiting for GPU capacity"}',
    ),
    (
        "A.3.3 try_again (0.15)",
        t.TryAgainResponse,
        '{"type": "try_again", "request_id": "fb-0007", "queue_state": "active"}',
    ),
    (
        "4.4 complete_metadata",
        t.CompleteMetadataResponse,
        '{"status": "complete_metadata", "response_payload_size": 73400320}',
    ),
    (
        "4.7 failed request",
        t.RequestFailedResponse,
        '{"error": "Sequence length 40000 exceeds the model\'s maximum context length 32768", '
        '"category": "user"}',
    ),
    (
        "A.3.3 408 queue state",
        t.QueueStateBody,
        '{"queue_state": "paused_rate_limit", '
        '"queue_state_reason": "too many concurrent training runs"}',
    ),
    (
        "4.8 retrieve_futures",
        t.RetrieveFuturesResponse,
        '{"completions": [{"state": "finished", "request_id": "req-c", '
        '"response_payload_uncompressed_size": 5120}, {"state": "failed", "request_id": "req-d"}], '
        '"cursor": 43}',
    ),
    (
        "7.5 SampleResponse",
        t.SampleResponse,
        '{"sequences": [{"sequence_id": "seqA", "stop_reason": "stop", "tokens": [791, 1879, 151645], '
        '"logprobs": [-0.21, -1.13, -0.01], "topk_logprobs": [[[791, -0.21], [576, -2.4]], '
        "[[1879, -1.13], [3691, -1.3]], null]}], "
        '"prompt_logprobs": [null, -4.2, -0.93], '
        '"topk_prompt_logprobs": [null, [[1879, -1.1], [11, -2.0]], [[198, -0.5]]], '
        '"prompt_cache_hit_tokens": 0}',
    ),
    (
        "A.2.3 SampleResponse (0.15)",
        t.SampleResponse,
        '{"type": "sample", "sequences": [{"stop_reason": "stop", "tokens": [791, 6460, 151645], '
        '"logprobs": [-0.31, -1.07, -0.02]}, {"stop_reason": "length", "tokens": [791, 3363, 374], '
        '"logprobs": [-0.31, -2.48, -0.66]}], "prompt_logprobs": [null, -7.91, -0.12, -3.40], '
        '"topk_prompt_logprobs": [null, [[872, -0.02], [4891, -4.4]], [[198, -0.12], [271, -2.3]], '
        "[[9707, -3.4], [13, -0.9]]]}",
    ),
    (
        "7.6 ForwardBackwardOutput",
        t.ForwardBackwardOutput,
        '{"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": [{"logprobs": '
        '{"data": [-2.1, -0.4, -0.03], "dtype": "float32", "shape": [3]}}], '
        '"metrics": {"loss:sum": 0.43}}',
    ),
    (
        "A.1.4 ForwardBackwardOutput (0.15)",
        t.ForwardBackwardOutput,
        '{"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": [{"logprobs": '
        '{"data": [-1.62, -0.41, -2.05, -0.07], "dtype": "float32", "shape": [4]}}, '
        '{"logprobs": {"data": [-0.88, -0.35, -1.02], "dtype": "float32", "shape": [3]}}], '
        '"metrics": {"loss:sum": 3.41, "clipped_frac:mean": 0.14}}',
    ),
    (
        "7.8 TrainingRunsResponse",
        t.TrainingRunsResponse,
        '{"training_runs": [{"training_run_id": "sess-1:train:0", "base_model": "Qwen/Qwen3-8B", '
        '"model_owner": "tml:user:42", "is_lora": true, "lora_rank": 16, "corrupted": false, '
        '"last_request_time": "2026-01-05T10:22:31Z", '
        '"last_checkpoint": {"checkpoint_id": "weights/step-100", "checkpoint_type": "training", '
        '"time": "2026-01-05T10:20:00Z", "tinker_path": "tinker://sess-1:train:0/weights/step-100", '
        '"size_bytes": 167772160, "public": false, "expires_at": null}, '
        '"last_sampler_checkpoint": null, "user_metadata": {"exp": "a"}}], '
        '"cursor": {"offset": 0, "limit": 20, "total_count": 1}}',
    ),
    (
        "7.8 WeightsInfoResponse",
        t.WeightsInfoResponse,
        '{"base_model": "Qwen/Qwen3-8B", "is_lora": true, "lora_rank": 16, "train_unembed": true, '
        '"train_mlp": true, "train_attn": true, "optimizer_config": {"type": "adamw"}}',
    ),
    (
        "A.6.3 WeightsInfoResponse (0.15)",
        t.WeightsInfoResponse,
        '{"base_model": "Qwen/Qwen3-8B", "is_lora": true, "lora_rank": 16}',
    ),
    (
        "7.8 ExternalWeightsUrlsResponse",
        t.ExternalWeightsUrlsResponse,
        '{"urls": {"adapter_config.json": "https://storage.example/...sig=...", '
        '"adapter_model.safetensors": "https://storage.example/...sig=..."}, '
        '"expires": "2026-01-05T11:00:00Z"}',
    ),
    (
        "7.8 CopyWeightsResponse",
        t.CopyWeightsResponse,
        '{"tinker_path": "tinker://copy:train:0/weights/step-400"}',
    ),
    (
        "7.8 GetSessionResponse",
        t.GetSessionResponse,
        '{"training_run_ids": ["sess-1:train:0"], "sampler_ids": ["sess-1:sample:0"], '
        '"user_metadata": {"exp": "a"}, "display_name": null}',
    ),
    ("7.8 ListSessionsResponse", t.ListSessionsResponse, '{"sessions": ["sess-1", "sess-2"]}'),
    (
        "3.5 trace_export",
        t.SessionTraceExportResponse,
        '{"status": "ready", "url": "https://storage.example/trace.json", "error": null}',
    ),
    (
        "7.9 SessionSearchResponse (composed from the field list)",
        t.SessionSearchResponse,
        '{"sessions": [{"session_id": "sess-9", "created_at": "2026-01-05T10:00:00Z", '
        '"owner": "tml:user:42", "project_id": null, "checkpoints_count": 2, '
        '"status": {"type": "client_finished", "reason": {"type": "errored"}}}, '
        '{"session_id": "sess-8", "created_at": "2026-01-05T09:00:00Z", "owner": "tml:user:42", '
        '"project_id": "proj-1", "checkpoints_count": 0, "status": {"type": "failed", '
        '"category": "user", "message": "bad input", "reason": {"type": "request", '
        '"request_id": "req-1", "request_type": "Sample"}}}], '
        '"next_cursor": {"last_created_at": "2026-01-05T09:00:00Z", "last_session_id": "sess-8"}}',
    ),
]


def _default(field: mi.Field) -> Any:
    if field.default is not mi.NODEFAULT:
        return msgspec.to_builtins(field.default)
    if field.default_factory is not mi.NODEFAULT:
        return msgspec.to_builtins(field.default_factory())
    return msgspec.UNSET  # required: never legitimately added


def _struct_types(info: mi.Type) -> list[mi.StructType]:
    if isinstance(info, mi.StructType):
        return [info]
    if isinstance(info, mi.UnionType):
        return [s for member in info.types for s in _struct_types(member)]
    return []


def _item_type(info: mi.Type) -> mi.Type | None:
    members = info.types if isinstance(info, mi.UnionType) else (info,)
    for member in members:
        if isinstance(member, mi.ListType):
            return member.item_type
        if isinstance(member, mi.DictType):
            return member.value_type
    return None


def _check(original: Any, encoded: Any, info: mi.Type, where: str) -> None:
    """`encoded` keeps every key and value of `original`; keys it adds hold their default."""
    structs = _struct_types(info)
    if isinstance(original, dict) and structs:
        struct = structs[0]
        if len(structs) > 1:  # a tagged union: the member the body's tag names
            struct = next(s for s in structs if s.tag == original.get(s.tag_field))
        assert isinstance(encoded, dict), where
        fields = {f.encode_name: f for f in struct.fields}
        for key, value in original.items():
            assert key in encoded, f"{where}.{key} is lost"
            if key in fields:
                _check(value, encoded[key], fields[key].type, f"{where}.{key}")
            else:
                assert encoded[key] == value, f"{where}.{key} is changed"
        for key in encoded.keys() - original.keys():
            if key == struct.tag_field:
                continue
            assert encoded[key] == _default(fields[key]), f"{where}.{key} added, not the default"
        return
    item = _item_type(info)
    if isinstance(original, list) and item is not None:
        assert isinstance(encoded, list) and len(encoded) == len(original), where
        for i, (a, b) in enumerate(zip(original, encoded, strict=True)):
            _check(a, b, item, f"{where}[{i}]")
        return
    if isinstance(original, dict) and item is not None:
        assert isinstance(encoded, dict) and encoded.keys() == original.keys(), where
        for key, value in original.items():
            _check(value, encoded[key], item, f"{where}.{key}")
        return
    assert encoded == original, f"{where} is changed: {original!r} -> {encoded!r}"


@pytest.mark.parametrize(("section", "type_", "body"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_official_body_loses_and_changes_nothing(
    section: str, type_: type[t.Response], body: str
) -> None:
    original = json.loads(body)
    encoded = json.loads(t.encode(t.decode(body, type_)))
    _check(original, encoded, mi.type_info(type_), "$")


def test_the_check_catches_a_lost_and_a_defaulted_field() -> None:
    """What omit_defaults did: `public: false` and `corrupted: false` dropped."""
    original = {"checkpoint_id": "w/a", "public": False}
    info = mi.type_info(t.Checkpoint)
    with pytest.raises(AssertionError, match="public is lost"):
        _check(original, {"checkpoint_id": "w/a"}, info, "$")
    with pytest.raises(AssertionError, match="size_bytes added"):
        _check(original, {**original, "size_bytes": 5}, info, "$")


def test_decoding_stays_lenient() -> None:
    """Unknown fields are ignored, and null is accepted wherever a field is optional."""
    body = (
        b'{"checkpoint_id": "weights/a", "checkpoint_type": "training", "time": '
        b'"2026-01-05T10:20:00Z", "tinker_path": "tinker://r/weights/a", "size_bytes": null, '
        b'"user_metadata": null, "expires_at": null, "from_the_future": {"x": 1}}'
    )
    checkpoint = t.decode(body, t.Checkpoint)
    assert checkpoint.size_bytes is None and checkpoint.public is False
    completion = t.decode(
        b'{"request_id": "r", "response_payload_uncompressed_size": null}', t.FutureCompletion
    )
    assert completion.response_payload_uncompressed_size is None
    assert json.loads(t.encode(completion))["response_payload_uncompressed_size"] is None
    pending = t.decode(
        b'{"type": "try_again", "request_id": "r", "queue_state": "active", '
        b'"queue_state_reason": null}',
        t.TryAgainResponse,
    )
    assert pending.queue_state_reason is None
