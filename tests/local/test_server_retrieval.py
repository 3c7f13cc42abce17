"""Result retrieval: deleting retrieved sample payloads (PROTOCOL.md 4.8) and metadata-only
answers (4.4), in-process in virtual time; the SDK side through `httpx.ASGITransport`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from server_testing import API_KEY, POLL, Harness, fb_body, open_harness, sample_body

import tinkex_trio
from tinkex_trio import AdamParams, Datum, ModelInput, SamplingParams, _protobuf
from tinkex_trio.local import LocalBackendSettings
from tinkex_trio.local._app import open_backend_app
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

BASE_URL = "http://testserver"


async def _sampler(h: Harness, seq: int = 0) -> str:
    sid = await h.session()
    body = await h.ok(
        "create_sampling_session",
        {"session_id": sid, "sampling_session_seq_id": seq, "base_model": FAKE_MODEL_NAME},
    )
    return str(body["sampling_session_id"])


async def _ack(h: Harness, sampling_session_id: str, request_ids: list[str]) -> Any:
    return await h.ok(
        "retrieve_futures",
        {
            "target": {"type": "sampling_session", "sampling_session_id": sampling_session_id},
            "prev_cursor": 0,
            "retrieved_request_ids": sorted(request_ids),
            "timeout": 0,
        },
    )


async def test_retrieved_payloads_are_deleted_then_410(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        ss = await _sampler(h)
        other = await _sampler(h, seq=1)
        a, b, c = [(await h.ok("asample", sample_body(ss, seq)))["request_id"] for seq in range(3)]
        d = (await h.ok("asample", sample_body(other, 0)))["request_id"]
        for rid in (a, d):
            assert "sequences" in await h.result(rid)
        # a: fetched, then acknowledged -> deleted at once. b: acknowledged before it was
        # fetched (the SDK's watcher does this) -> still served once, deleted after that.
        # d: another sampling session's request -> the acknowledgement is ignored.
        await _ack(h, ss, [a, b, d])
        gone = await h.poll(a)
        assert gone.status_code == 410
        assert gone.json()["detail"].startswith("result already retrieved")
        assert h.backend.store.get_future(a).result is None  # type: ignore[union-attr]
        assert "sequences" in await h.result(b)
        assert (await h.poll(b)).status_code == 410
        # Never acknowledged, or acknowledged under the wrong session: kept.
        for rid in (c, d):
            assert "sequences" in await h.result(rid)
            assert "sequences" in await h.result(rid)
        # A resubmitted seq_id whose payload is gone is still a duplicate (same request id).
        assert (await h.ok("asample", sample_body(ss, 0)))["request_id"] == a
        # Unknown, pending and failed ids in the list are ignored.
        h.engine.reject_next_sample("rejected by the engine")
        bad = await h.ok("asample", sample_body(ss, 3))
        assert (await h.result(bad["request_id"]))["category"] == "user"
        await _ack(h, ss, ["req-unknown", bad["request_id"]])
        assert (await h.result(bad["request_id"]))["category"] == "user"


async def test_sdk_acknowledgements_delete_payloads_without_410(
    tmp_path: Path, autojump_clock: object
) -> None:
    """The SDK lists requests as retrieved once their samples fetched them (with the next poll,
    or an acknowledgement-only poll when no sample waits): payloads go, no sample sees a 410."""
    async with open_backend_app(
        LocalBackendSettings(
            data_dir=tmp_path,
            api_key=API_KEY,
            poll_timeout=POLL,
        ),
        FakeEngine(),
        engine_in_thread=False,
    ) as app:
        async with tinkex_trio.open_service(
            base_url=BASE_URL, api_key=API_KEY, transport=httpx.ASGITransport(app=app)
        ) as service:
            sampler = await service.create_sampling_client(base_model=FAKE_MODEL_NAME)

            async def one(i: int) -> None:
                await sampler.sample(
                    ModelInput.from_ints([i + 1]), sampling_params=SamplingParams(max_tokens=2)
                )

            with trio.fail_after(600):
                for wave in range(3):  # later waves' polls carry the earlier acknowledgements
                    async with trio.open_nursery() as nursery:
                        for i in range(10):
                            nursery.start_soon(one, wave * 10 + i)
            assert sampler.statistics().retries == 0
            assert sampler.statistics().completed == 30
            await trio.sleep(1)  # let the last acknowledgement-only poll go out
        rows = app.backend.store._conn.execute(
            "SELECT COUNT(*) FROM futures WHERE request_type='Sample' AND result IS NULL"
        ).fetchone()[0]
        assert rows == 30


async def _poll_until_done(h: Harness, request_id: str, **headers: str) -> httpx.Response:
    while True:
        r = await h.post(
            "retrieve_future",
            {"request_id": request_id, "allow_metadata_only": True},
            headers=headers,
        )
        assert r.status_code == 200, r.text
        if b"try_again" not in r.content:
            return r


async def test_metadata_only_once_then_the_payload(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path, metadata_only_threshold=200) as h:
        sid = await h.session()
        mid = await h.model(sid)  # a small result (create_model): inlined at once
        tokens = list(range(1, 41))
        for seq, accept in ((1, "application/json"), (2, _protobuf.PROTOBUF_CONTENT_TYPE)):
            fb = await h.ok("forward_backward", fb_body(mid, seq, tokens))
            first = await _poll_until_done(h, fb["request_id"], accept=accept)
            announced = first.json()
            assert announced["status"] == "complete_metadata"
            # Still allowed metadata-only, but a future is announced at most once.
            full = await _poll_until_done(h, fb["request_id"], accept=accept)
            assert accept in full.headers["content-type"]
            assert announced["response_payload_size"] == len(full.content) > 200
            again = await _poll_until_done(h, fb["request_id"], accept=accept)
            assert again.content == full.content
        # allow_metadata_only: false gets the payload directly.
        fb = await h.ok("forward_backward", fb_body(mid, 3, tokens))
        await _poll_until_done(h, fb["request_id"])
        fb = await h.ok("forward_backward", fb_body(mid, 4, tokens))
        while True:
            r = await h.post(
                "retrieve_future", {"request_id": fb["request_id"], "allow_metadata_only": False}
            )
            if b"try_again" not in r.content:
                break
        assert len(r.json()["loss_fn_outputs"]) == 1


class _PollSpy(httpx.AsyncBaseTransport):
    """Records each retrieve_future answer: (request_id, allow_metadata_only, announced?)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.polls: list[tuple[str, bool, bool]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        if request.url.path.endswith("/retrieve_future"):
            body = json.loads(request.content)
            announced = (
                "json" in response.headers.get("content-type", "")
                and json.loads(content).get("status") == "complete_metadata"
            )
            self.polls.append((body["request_id"], body["allow_metadata_only"], announced))
        return httpx.Response(response.status_code, headers=response.headers, content=content)


async def test_sdk_gets_large_results_through_metadata_only(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_backend_app(
        LocalBackendSettings(
            data_dir=tmp_path,
            api_key=API_KEY,
            poll_timeout=POLL,
            metadata_only_threshold=100,
        ),
        FakeEngine(),
        engine_in_thread=False,
    ) as app:
        spy = _PollSpy(httpx.ASGITransport(app=app))
        async with tinkex_trio.open_service(
            base_url=BASE_URL, api_key=API_KEY, transport=spy
        ) as service:
            training = await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
            lengths = (30, 20)
            batch = [
                Datum(
                    model_input=ModelInput.from_ints(list(range(1, n + 1))),
                    loss_fn_inputs={
                        "target_tokens": np.arange(2, n + 2),
                        "weights": np.ones(n, np.float32),
                    },
                )
                for n in lengths
            ]
            with trio.fail_after(600):
                output = await (await training.forward_backward(batch, "cross_entropy"))
                await (await training.optim_step(AdamParams(learning_rate=1e-3)))
        # The FakeEngine's logprobs before any step: -1 / (1 + position).
        for datum_output, n in zip(output.loss_fn_outputs, lengths, strict=True):
            expected = -1.0 / (1.0 + np.arange(n))
            np.testing.assert_allclose(datum_output["logprobs"].to_numpy(), expected, rtol=1e-6)
        assert output.metrics["loss:sum"] == pytest.approx(
            sum(float((1.0 / (1.0 + np.arange(n))).sum()) for n in lengths), rel=1e-5
        )
        announced = [rid for rid, _allow, was in spy.polls if was]
        assert len(announced) == 1 and len(set(announced)) == 1  # the forward_backward only
        fetched = [(allow, was) for rid, allow, was in spy.polls if rid == announced[0]]
        assert fetched == [(True, True), (False, False)]
