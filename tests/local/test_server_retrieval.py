"""Result retrieval: deleting retrieved sample payloads (PROTOCOL.md 4.8) and metadata-only
answers (4.4), in-process in virtual time; the SDK side through `httpx.ASGITransport`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from server_testing import API_KEY, POLL, Harness, open_harness, sample_body

import tinkex_trio
from tinkex_trio import ModelInput, SamplingParams
from tinkex_trio.local._app import open_backend_app
from tinkex_trio.local._fake_engine import FAKE_TINY_NAME, FakeEngine

BASE_URL = "http://testserver"


async def _sampler(h: Harness, seq: int = 0) -> str:
    sid = await h.session()
    body = await h.ok(
        "create_sampling_session",
        {"session_id": sid, "sampling_session_seq_id": seq, "base_model": FAKE_TINY_NAME},
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
        assert h.app.store.get_future(a).result is None  # type: ignore[union-attr]
        assert "sequences" in await h.result(b)
        assert (await h.poll(b)).status_code == 410
        # Never acknowledged, or acknowledged under the wrong session: kept.
        for rid in (c, d):
            assert "sequences" in await h.result(rid)
            assert "sequences" in await h.result(rid)
        # A resubmitted seq_id whose payload is gone is still a duplicate (same request id).
        assert (await h.ok("asample", sample_body(ss, 0)))["request_id"] == a
        # Unknown, pending and failed ids in the list are ignored.
        bad = await h.ok("asample", sample_body(ss, 3, tokens=[0]))  # fake engine rejects [0]
        assert (await h.result(bad["request_id"]))["category"] == "user"
        await _ack(h, ss, ["req-unknown", bad["request_id"]])
        assert (await h.result(bad["request_id"]))["category"] == "user"


async def test_sdk_acknowledgements_delete_payloads_without_410(
    tmp_path: Path, autojump_clock: object
) -> None:
    """The SDK lists requests as retrieved as soon as they are reported, possibly before its
    sample fetched them: no sample may see a 410 (which would cost a resubmission)."""
    async with open_backend_app(
        data_dir=tmp_path,
        engine=FakeEngine(),
        api_key=API_KEY,
        poll_timeout=POLL,
        engine_in_thread=False,
    ) as app:
        async with tinkex_trio.open_service(
            base_url=BASE_URL, api_key=API_KEY, transport=httpx.ASGITransport(app=app)
        ) as service:
            sampler = await service.create_sampling_client(base_model=FAKE_TINY_NAME)

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
        rows = app.store._conn.execute(
            "SELECT COUNT(*) FROM futures WHERE request_type='Sample' AND result IS NULL"
        ).fetchone()[0]
        assert rows >= 10
