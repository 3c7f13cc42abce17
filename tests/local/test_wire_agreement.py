"""Client and server agree on the wire, answer by answer.

One job drives every JSON endpoint of the local backend (in-process, FakeEngine inline, real
clock: archives and trace exports are built in worker threads). Each JSON answer is decoded
into the `tinkex_trio.types` Struct the SDK decodes it with and re-encoded: the JSON must come
out the same, so the server sends no field the SDK drops, no value the SDK would change, and
nothing the SDK cannot decode. The job must reach every route of the app, so a new endpoint
cannot be added without saying here which type its answer has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import trio
from custom_loss_graphs import neg_ll, upload_body
from server_testing import API_KEY, Harness, fb_body, open_harness

from tinkex_trio import types as t
from tinkex_trio.local._engine_api import EngineUserError
from tinkex_trio.local.testing import FAKE_MODEL_NAME
from tinkex_trio.types._custom_loss import CreateCustomLossResponse

#: The answer type of each route handler (by name) whose answer is not a future's result.
ANSWER_TYPES: dict[str, type[t.Response]] = {
    "client_config": t.ClientConfigResponse,
    "dynamic_config": t.DynamicConfigResponse,
    "auth_token": t.AuthTokenResponse,
    "telemetry": t.TelemetryResponse,
    "healthz": t.HealthResponse,
    "capabilities": t.ServerCapabilities,
    "create_session": t.CreateSessionResponse,
    "session_heartbeat": t.SessionHeartbeatResponse,
    "finish_session": t.EmptyResponse,
    "list_sessions": t.ListSessionsResponse,
    "get_session": t.GetSessionResponse,
    "assign_project": t.EmptyResponse,
    "trace_export": t.SessionTraceExportResponse,
    "search": t.SessionSearchResponse,
    "create_model": t.UntypedAPIFuture,
    "get_info": t.GetInfoResponse,
    "forward": t.UntypedAPIFuture,
    "forward_backward": t.UntypedAPIFuture,
    "optim_step": t.UntypedAPIFuture,
    "load_weights": t.UntypedAPIFuture,
    "unload_model": t.UntypedAPIFuture,
    "list_training_runs": t.TrainingRunsResponse,
    "get_training_run": t.TrainingRun,
    "save_weights": t.UntypedAPIFuture,
    "save_weights_for_sampler": t.UntypedAPIFuture,
    "save_weights_external": t.UntypedAPIFuture,
    "run_checkpoints": t.CheckpointsListResponse,
    "list_checkpoints": t.CheckpointsListResponse,
    "delete_checkpoint": t.EmptyResponse,
    "publish": t.EmptyResponse,
    "unpublish": t.EmptyResponse,
    "set_ttl": t.EmptyResponse,
    "archive_url": t.CheckpointArchiveUrlResponse,
    "external_weights_urls": t.ExternalWeightsUrlsResponse,
    "copy_weights": t.CopyWeightsResponse,
    "weights_info": t.WeightsInfoResponse,
    "create_sampling_session": t.CreateSamplingSessionResponse,
    "get_sampler": t.GetSamplerResponse,
    "asample": t.UntypedAPIFuture,
    "retrieve_futures": t.RetrieveFuturesResponse,
    "cancel_future": t.EmptyResponse,
    "audit": t.AuditLogResponse,
    "billing_usage": t.BillingUsageResponse,
    "checkpoint_storage": t.CurrentCheckpointStorageUsageResponse,
    "create_custom_loss": t.UntypedAPIFuture,
}
#: The result type of each kind of future (its request type, PROTOCOL.md 4.2 and A.3.8).
RESULT_TYPES: dict[str, type[t.Response]] = {
    "CreateModel": t.CreateModelResponse,
    "Forward": t.ForwardBackwardOutput,
    "ForwardBackward": t.ForwardBackwardOutput,
    "OptimStep": t.OptimStepResponse,
    "SaveWeights": t.SaveWeightsResponse,
    "SaveWeightsForSampler": t.SaveWeightsForSamplerResponse,
    "SaveWeightsExternal": t.SaveWeightsExternalResponse,
    "LoadWeights": t.LoadWeightsResponse,
    "UnloadModel": t.UnloadModelResponse,
    "Sample": t.SampleResponse,
    "CreateCustomLoss": CreateCustomLossResponse,
}
#: Routes whose answer is a file, not a wire object.
FILE_ROUTES = frozenset({"download", "external_file", "trace_file"})


@dataclass
class Exchange:
    method: str
    path: str
    request_body: bytes
    status: int
    content_type: str
    body: bytes


class Recorder(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        self.exchanges.append(
            Exchange(
                request.method,
                request.url.path,
                request.content,
                response.status_code,
                response.headers.get("content-type", ""),
                body,
            )
        )
        return httpx.Response(response.status_code, headers=response.headers, content=body)


async def _result(h: Harness, request_id: str) -> Any:
    """Poll until finished, taking the metadata-only step when offered (PROTOCOL.md 4.4)."""
    allow = True
    while True:
        r = await h.post(
            "retrieve_future", {"request_id": request_id, "allow_metadata_only": allow}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        if body.get("status") == "complete_metadata":
            allow = False
        elif body.get("type") != "try_again":
            return body


async def _submit(h: Harness, path: str, body: dict[str, Any]) -> Any:
    return await _result(h, (await h.ok(path, body))["request_id"])


async def _until(h: Harness, method: str, path: str, done: int | str) -> httpx.Response:
    """Repeat a GET until it answers `done` (a status code, or a JSON `status`)."""
    while True:
        r = await h.client.request(method, f"/api/v1/{path}")
        if r.status_code == done or (r.status_code == 200 and r.json().get("status") == done):
            return r
        await trio.sleep(0.01)


async def _drive_every_endpoint(h: Harness) -> None:
    await h.ok("client/config", {"sdk_version": "t"})
    await h.ok("client/dynamic_config", {"sdk_version": "t"})
    await h.ok("auth/token", {})
    await h.ok("telemetry", {"events": [], "platform": "t", "sdk_version": "t", "session_id": "x"})
    assert (await h.get("healthz")).status_code == 200
    assert (await h.get("get_server_capabilities")).status_code == 200
    sid = await h.session()
    await h.ok("session_heartbeat", {"session_id": sid})
    mid = await h.model(sid)
    await h.ok("get_info", {"model_id": mid})

    # Training: every kind of future result, a failed one, and a pending answer.
    forward = {"forward_input": fb_body(mid, 1)["forward_backward_input"], "model_id": mid}
    await _submit(h, "forward", {**forward, "seq_id": 1})
    await _submit(h, "forward_backward", fb_body(mid, 2))
    await _submit(h, "optim_step", {"model_id": mid, "seq_id": 3})
    saved = await _submit(h, "save_weights", {"model_id": mid, "seq_id": 4, "path": "step-1"})
    await _submit(h, "save_weights_for_sampler", {"model_id": mid, "seq_id": 5, "path": "s1"})
    unnamed = {"model_id": mid, "seq_id": 6, "sampling_session_seq_id": 0}
    await _submit(h, "save_weights_for_sampler", unnamed)
    await _submit(h, "save_weights_external", {"model_id": mid, "seq_id": 7, "path": "exp"})
    h.engine.fail_next("optim_step", EngineUserError("learning rate too high"))
    failed = await _submit(h, "optim_step", {"model_id": mid, "seq_id": 8})
    assert failed == {"error": "learning rate too high", "category": "user"}
    in_place = {"model_id": mid, "seq_id": 9, "path": saved["path"], "optimizer": True}
    await _submit(h, "load_weights", in_place)
    by_session = {"session_id": sid, "model_seq_id": 1, "path": saved["path"], "optimizer": False}
    loaded = await _submit(h, "load_weights", by_session)
    await _submit(h, "unload_model", {"model_id": loaded["model_id"]})
    async with h.backend.runner.exclusive():  # the engine is busy: the poll times out
        pending = await h.ok("forward_backward", fb_body(mid, 10))
        assert (await h.poll(pending["request_id"])).json()["type"] == "try_again"
    await _result(h, pending["request_id"])
    # A server-side custom loss (PROTOCOL.md 8.8): its future, then a forward_backward with it.
    ranks = {"logprobs": 1, "weights": 1}
    custom_loss = await _submit(h, "create_custom_loss", upload_body(sid, neg_ll, ranks))
    custom = fb_body(mid, 11)
    custom["forward_backward_input"] |= {
        "loss_fn": "custom",
        "loss_fn_config_v2": {"loss_id": {"text": custom_loss["loss_id"]}},
    }
    await _submit(h, "forward_backward", custom)

    # Sampling, session-wide completion polling and cancel.
    sampler = await h.ok(
        "create_sampling_session",
        {"session_id": sid, "sampling_session_seq_id": 1, "base_model": FAKE_MODEL_NAME},
    )
    ss = sampler["sampling_session_id"]
    assert (await h.get(f"samplers/{ss}")).status_code == 200
    sample = {
        "num_samples": 4,
        "prompt": {"chunks": [{"tokens": [5, 6, 7]}]},
        "sampling_params": {"max_tokens": 8},
        "sampling_session_id": ss,
        "seq_id": 0,
        "prompt_logprobs": True,
        "topk_prompt_logprobs": 2,
    }
    submitted = await h.ok("asample", sample)
    await _result(h, submitted["request_id"])
    target = {"sampling_session_id": ss}
    await h.ok("retrieve_futures", {"target": target, "prev_cursor": 0, "timeout": 0})
    await h.ok("cancel_future", {"request_id": submitted["request_id"]})

    # REST: runs, checkpoints, archives, exports, copies, sessions.
    assert (await h.get("training_runs")).status_code == 200
    assert (await h.get(f"training_runs/{mid}")).status_code == 200
    assert (await h.get(f"training_runs/{mid}/checkpoints")).status_code == 200
    assert (await h.get("checkpoints")).status_code == 200
    checkpoint = f"training_runs/{mid}/checkpoints/weights/step-1"
    assert (await h.post(f"{checkpoint}/publish")).status_code == 200
    assert (await h.client.delete(f"/api/v1/{checkpoint}/publish")).status_code == 200
    ttl = await h.client.put(f"/api/v1/{checkpoint}/ttl", json={"ttl_seconds": 86400})
    assert ttl.status_code == 200
    await _until(h, "GET", f"{checkpoint}/archive", 302)
    urls = await h.get(
        f"training_runs/{mid}/checkpoints/external_weights/exp/external_weights_urls"
    )
    assert urls.status_code == 200
    copy = await h.ok("copy_weights", {"source_path": saved["path"]})
    await h.ok("weights_info", {"tinker_path": saved["path"]})
    copied = t.ParsedTinkerPath.parse(copy["tinker_path"])
    deleted = await h.client.delete(
        f"/api/v1/training_runs/{copied.training_run_id}/checkpoints/{copied.checkpoint_id}"
    )
    assert deleted.status_code == 200
    assert (await h.get("sessions")).status_code == 200
    assert (await h.get(f"sessions/{sid}")).status_code == 200
    project = await h.client.put(f"/api/v1/sessions/{sid}/project", json={"project_id": "p"})
    assert project.status_code == 200
    await _until(h, "GET", f"sessions/{sid}/trace_export", "ready")
    await h.ok("sessions/search", {"statuses": [{"type": "active"}]})
    await h.ok(f"sessions/{sid}/finish", {"reason": {"type": "success"}, "detail": None})

    # Admin: the audit log, billing usage events and current checkpoint storage.
    assert (await h.get("audit")).status_code == 200
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    window = {
        "starting_on": (hour - timedelta(hours=1)).isoformat(),
        "ending_before": (hour + timedelta(hours=1)).isoformat(),
    }
    usage = await h.get("billing/usage/events", params=window)
    assert {e["event_info"]["type"] for e in usage.json()["data"]} == {"checkpoint", "storage"}
    assert (await h.get("billing/usage/checkpoints/current")).status_code == 200


def _answer_type(h: Harness, exchange: Exchange, handler: str) -> type[t.Response]:
    if handler != "retrieve_future":
        return ANSWER_TYPES[handler]
    envelope = t.decode(exchange.body, t.PollEnvelope)
    if envelope.type == "try_again":
        return t.TryAgainResponse
    if envelope.status == "complete_metadata":
        return t.CompleteMetadataResponse
    if envelope.error is not None:
        return t.RequestFailedResponse
    request_id = json.loads(exchange.request_body)["request_id"]
    row = h.backend.store.get_future(request_id)
    assert row is not None
    return RESULT_TYPES[row.request_type]


async def test_every_answer_decodes_into_the_sdk_type_and_re_encodes_the_same(
    tmp_path: Path,
) -> None:
    async with open_harness(
        tmp_path, poll_timeout=0.2, metadata_only_threshold=300, jwt_auth=True
    ) as base:
        recorder = Recorder(httpx.ASGITransport(app=base.app))
        async with httpx.AsyncClient(
            transport=recorder, base_url="http://testserver", headers={"X-API-Key": API_KEY}
        ) as client:
            h = Harness(client, base.app, base.engine, base.data_dir)
            with trio.fail_after(60):
                await _drive_every_endpoint(h)
            checked: set[str] = set()
            answer_types: set[type[t.Response]] = set()
            for exchange in recorder.exchanges:
                handler, _ = h.app.router.resolve(exchange.method, exchange.path)
                name = handler.__name__  # type: ignore[attr-defined]
                if exchange.status >= 400 or name in FILE_ROUTES:
                    continue
                assert exchange.content_type == "application/json", exchange
                type_ = _answer_type(h, exchange, name)
                decoded = t.decode(exchange.body, type_)
                assert json.loads(t.encode(decoded)) == json.loads(exchange.body), (name, type_)
                checked.add(name)
                answer_types.add(type_)
    every_route = {
        handler.__name__  # type: ignore[attr-defined]
        for handler in (route.handler for route in h.app.router._routes)
    }
    assert checked == every_route - FILE_ROUTES
    assert set(RESULT_TYPES.values()) <= answer_types
    poll_answers = {t.TryAgainResponse, t.CompleteMetadataResponse, t.RequestFailedResponse}
    assert poll_answers <= answer_types
