"""`cancel_future` on the local backend (PROTOCOL.md 4.9), in-process in virtual time.

As in test_server_sampling_limits.py, the engine is made "slow" by holding it
(`EngineRunner.exclusive`) rather than by sleeping in the FakeEngine (real time). The SDK test
runs `open_service` against the app through `httpx.ASGITransport`: no sockets.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import trio
from server_testing import API_KEY, POLL, Harness, fb_body, open_harness, sample_body

import tinkex_trio
from tinkex_trio import ModelInput, SamplingParams
from tinkex_trio.local import LocalBackendSettings
from tinkex_trio.local._app import open_backend_app
from tinkex_trio.local._routes_service import DYNAMIC_CONFIG
from tinkex_trio.local._scheduler import SAMPLE_BATCH_MAX, SAMPLE_BATCH_WINDOW
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

BASE_URL = "http://testserver"


async def _sampler(h: Harness) -> str:
    sid = await h.session()
    body = await h.ok(
        "create_sampling_session",
        {"session_id": sid, "sampling_session_seq_id": 0, "base_model": FAKE_MODEL_NAME},
    )
    return str(body["sampling_session_id"])


def _engine_sampled(engine: FakeEngine) -> int:
    """How many sampling requests the engine has run (summed over its batches)."""
    return sum(int(n) for method, n in engine.calls if method == "sample")


async def test_dynamic_config_enables_cancel(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        answer = await h.ok("client/dynamic_config", {"sdk_version": "t"})
    assert answer == msgspec.to_builtins(DYNAMIC_CONFIG)
    assert answer["sample_cancel_enabled"] is True


async def test_a_cancelled_queued_sample_never_runs_and_frees_its_slot(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path, max_queued_samples=2) as h:
        ss = await _sampler(h)
        async with h.backend.runner.exclusive():  # the engine is busy: nothing starts
            first, second = [await h.ok("asample", sample_body(ss, seq)) for seq in range(2)]
            assert (await h.post("asample", sample_body(ss, 2))).status_code == 429
            assert await h.ok("cancel_future", {"request_id": first["request_id"]}) == {}
            assert h.backend.batcher.queued == 1
            # Cancelling again is a no-op; the freed slot takes a new sample.
            await h.ok("cancel_future", {"request_id": first["request_id"]})
            third = await h.ok("asample", sample_body(ss, 2))
            assert h.backend.batcher.queued == 2
            await trio.sleep(10.0)
        await trio.sleep(SAMPLE_BATCH_WINDOW)
        assert h.backend.batcher.queued == 0
        cancelled = await h.result(first["request_id"])
        assert cancelled["category"] == "user" and "cancel" in cancelled["error"]
        for sub in (second, third):
            assert len((await h.result(sub["request_id"]))["sequences"]) == 1
        assert _engine_sampled(h.engine) == 2


async def test_cancel_while_the_batch_is_gathered(tmp_path: Path, autojump_clock: object) -> None:
    """A sample already taken from the queue into a batch still being gathered is left out."""
    async with open_harness(tmp_path) as h:
        ss = await _sampler(h)
        async with h.backend.runner.exclusive():
            subs = [await h.ok("asample", sample_body(ss, seq)) for seq in range(3)]
            await trio.sleep(1.0)  # the batcher holds all three, waiting for the engine
            await h.ok("cancel_future", {"request_id": subs[1]["request_id"]})
            assert h.backend.batcher.queued == 2
        for i, sub in enumerate(subs):
            result = await h.result(sub["request_id"])
            assert ("error" in result) == (i == 1), result
        assert _engine_sampled(h.engine) == 2


async def test_cancel_of_running_finished_unknown_and_training_requests(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        ss = await _sampler(h)
        # A full batch goes to the engine at once and waits for it there: "running".
        async with h.backend.runner.exclusive():
            subs = [await h.ok("asample", sample_body(ss, s)) for s in range(SAMPLE_BATCH_MAX)]
            await trio.sleep(1.0)
            running = subs[0]["request_id"]
            assert h.backend.store.get_future(running).state == "running"  # type: ignore[union-attr]
            await h.ok("cancel_future", {"request_id": running})
        await trio.sleep(1.0)
        # The engine ran it; its result was dropped, the future stays cancelled.
        assert _engine_sampled(h.engine) == SAMPLE_BATCH_MAX
        assert "cancel" in (await h.result(running))["error"]
        # Finished: 200 and nothing changes.
        done = subs[1]["request_id"]
        before = await h.result(done)
        await h.ok("cancel_future", {"request_id": done})
        assert await h.result(done) == before
        # Unknown: 404.
        assert (await h.post("cancel_future", {"request_id": "req-nope"})).status_code == 404
        # Training requests are never cancelled: the step still applies, so does its future.
        model = await h.model(await h.session())
        async with h.backend.runner.exclusive():
            step = await h.ok("forward_backward", fb_body(model, 1))
            await h.ok("cancel_future", {"request_id": step["request_id"]})
        assert "loss_fn_outputs" in await h.result(step["request_id"])


async def test_sdk_cancels_abandoned_samples_before_the_engine_runs_them(
    tmp_path: Path, autojump_clock: object
) -> None:
    engine = FakeEngine()
    async with open_backend_app(
        LocalBackendSettings(
            data_dir=tmp_path,
            api_key=API_KEY,
            poll_timeout=POLL,
        ),
        engine,
        engine_in_thread=False,
    ) as app:
        async with tinkex_trio.open_service(
            base_url=BASE_URL, api_key=API_KEY, transport=httpx.ASGITransport(app=app)
        ) as service:
            sampler = await service.create_sampling_client(base_model=FAKE_MODEL_NAME)
            canceller = service._ctx.sample_canceller
            engine_free = trio.Event()

            async def busy_engine(task_status: trio.TaskStatus[None]) -> None:
                async with app.backend.runner.exclusive():  # e.g. a long training step
                    task_status.started()
                    await engine_free.wait()

            async with trio.open_nursery() as nursery:
                await nursery.start(busy_engine)
                with trio.move_on_after(5):
                    async with trio.open_nursery() as samples:
                        for i in range(20):
                            samples.start_soon(
                                sampler.sample,
                                ModelInput.from_ints([100 + i]),
                                1,
                                SamplingParams(max_tokens=2),
                            )
                # The cancels reach the server while the engine is still busy.
                await trio.sleep(1)
                assert canceller.sent == 20
                assert app.backend.batcher.queued == 0
                engine_free.set()
            await trio.sleep(10)
            assert _engine_sampled(engine) < 20
            assert canceller.failed == 0
            # The sampler still works.
            result = await sampler.sample(
                ModelInput.from_ints([7]), 1, SamplingParams(max_tokens=2)
            )
            assert list(result.sequences[0].tokens) == [8, 9]
