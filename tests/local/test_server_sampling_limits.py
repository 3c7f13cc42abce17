"""Sampling back-pressure (PROTOCOL.md 9.5, 10.8), in-process in virtual time.

The engine is made "slow" by holding it (`EngineRunner.exclusive`): a sleep inside the
FakeEngine would be real time, which `autojump_clock` cannot skip (STYLE.md 2.11). The SDK
tests run `open_service` against the app through `httpx.ASGITransport`: no sockets, so
virtual time stays valid.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
from server_testing import API_KEY, POLL, Harness, open_harness, sample_body

import tinkex_trio
from tinkex_trio import ModelInput, SamplingParams
from tinkex_trio.local import LocalBackendSettings, server
from tinkex_trio.local._app import open_backend_app
from tinkex_trio.local._routes_sampling import SAMPLE_RETRY_AFTER_MS
from tinkex_trio.local._scheduler import SAMPLE_BATCH_WINDOW
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

BASE_URL = "http://testserver"


async def _sampler(h: Harness) -> str:
    sid = await h.session()
    body = await h.ok(
        "create_sampling_session",
        {"session_id": sid, "sampling_session_seq_id": 0, "base_model": FAKE_MODEL_NAME},
    )
    return str(body["sampling_session_id"])


async def test_asample_429_beyond_limit_then_accepted_once_drained(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path, max_queued_samples=3) as h:
        ss = await _sampler(h)
        async with h.backend.runner.exclusive():  # the engine is busy: nothing starts
            accepted = [await h.ok("asample", sample_body(ss, seq)) for seq in range(3)]
            assert h.backend.batcher.queued == 3
            rejected = await h.post("asample", sample_body(ss, 3))
            assert rejected.status_code == 429
            assert rejected.headers["retry-after-ms"] == str(SAMPLE_RETRY_AFTER_MS)
            body = rejected.json()
            assert body["category"] == "server"
            assert "3 sampling requests" in body["detail"]
            # Nothing was created or consumed for the rejected seq_id ...
            assert (
                h.backend.store.find_future_by_seq(model_id=None, sampling_session_id=ss, seq_id=3)
                is None
            )
            # ... and a resubmission of an accepted seq_id still gets its future.
            assert await h.ok("asample", sample_body(ss, 0)) == accepted[0]
            await trio.sleep(10.0)
            assert (await h.post("asample", sample_body(ss, 3))).status_code == 429
        # The engine is free: the gathered batch starts within one batch window.
        await trio.sleep(SAMPLE_BATCH_WINDOW)
        assert h.backend.batcher.queued == 0
        late = await h.ok("asample", sample_body(ss, 3))  # the same seq_id, now accepted
        for sub in [*accepted, late]:
            result = await h.result(sub["request_id"])
            assert len(result["sequences"]) == 1, result


async def test_unlimited_queue_and_bad_limit(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path / "a", max_queued_samples=None) as h:
        ss = await _sampler(h)
        async with h.backend.runner.exclusive():
            for seq in range(40):
                await h.ok("asample", sample_body(ss, seq))
            assert h.backend.batcher.queued > 16  # more than one batch waits; none refused
    with pytest.raises(ValueError, match="max_queued_samples"):
        async with open_harness(tmp_path / "b", max_queued_samples=0):
            pass


async def test_sdk_backs_off_and_every_sample_completes(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_backend_app(
        LocalBackendSettings(
            data_dir=tmp_path,
            api_key=API_KEY,
            poll_timeout=POLL,
            max_queued_samples=5,
        ),
        FakeEngine(),
        engine_in_thread=False,
    ) as app:
        async with tinkex_trio.open_service(
            base_url=BASE_URL, api_key=API_KEY, transport=httpx.ASGITransport(app=app)
        ) as service:
            sampler = await service.create_sampling_client(base_model=FAKE_MODEL_NAME)
            tokens: dict[int, list[int]] = {}

            async def one(i: int) -> None:
                response = await sampler.sample(
                    ModelInput.from_ints([100 + i]), sampling_params=SamplingParams(max_tokens=2)
                )
                tokens[i] = list(response.sequences[0].tokens)

            with trio.fail_after(600):
                async with trio.open_nursery() as nursery:
                    for i in range(50):
                        nursery.start_soon(one, i)
            # The FakeEngine continues a prompt p with p+1, p+2.
            assert tokens == {i: [101 + i, 102 + i] for i in range(50)}
            assert service.rate_limiter.statistics().rate_limited_total > 0
            assert sampler.statistics().retries == 0  # 429s are resubmits, not retries


def test_serve_option_rejects_a_non_positive_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        server.main(["--max-queued-samples", "0"])
    assert exc.value.code == 2
    assert "--max-queued-samples" in capsys.readouterr().err
