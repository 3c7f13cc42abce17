"""Resource lifecycle of the local backend (issue 11, item 1): finishing a session releases its
engine state, a silent session expires, idle adapters beyond the budget are offloaded to disk.

In-process (httpx.ASGITransport, FakeEngine inline): virtual time, exact deadlines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from server_testing import Harness, fb_body, open_harness

from tinkex_trio import AdamParams, Datum, ModelInput, open_service
from tinkex_trio.local import open_local_backend
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

TIMEOUT = 60.0


async def _train(h: Harness, model_id: str, seq_id: int, *, step: bool = True) -> Any:
    res = await h.result((await h.ok("forward_backward", fb_body(model_id, seq_id)))["request_id"])
    if step:
        sub = await h.ok("optim_step", {"model_id": model_id, "seq_id": seq_id + 1})
        assert "metrics" in await h.result(sub["request_id"])
    return res


async def _save(h: Harness, model_id: str, seq_id: int, name: str) -> str:
    sub = await h.ok("save_weights", {"model_id": model_id, "seq_id": seq_id, "path": name})
    return str((await h.result(sub["request_id"]))["path"])


async def test_finish_releases_adapters_and_runs_revive(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mids = [await h.model(sid, i) for i in range(2)]
        for mid in mids:
            await _train(h, mid, 1)
        path = await _save(h, mids[0], 3, "kept")
        assert set(h.engine.adapters) == set(mids)
        r = await h.post(f"sessions/{sid}/finish", {"reason": {"type": "success"}})
        assert r.status_code == 200
        await trio.sleep(0.001)
        assert h.engine.adapters == {}
        assert sorted(m for name, m in h.engine.calls if name == "drop_adapter") == sorted(mids)
        assert h.backend.lanes.has_lane(mids[0]) is False
        r = await h.post("forward_backward", fb_body(mids[0], 4))
        assert r.status_code == 400
        assert "released when its session finished (success)" in r.json()["detail"]
        assert h.backend.lanes.has_lane(mids[0]) is False  # a refused request opens no lane
        # The runs stay listed; one revives from its checkpoint in a new session.
        assert (await h.get(f"training_runs/{mids[0]}")).status_code == 200
        new_sid = await h.session()
        sub = await h.ok(
            "load_weights",
            {"session_id": new_sid, "model_seq_id": 0, "path": path, "optimizer": True},
        )
        revived = (await h.result(sub["request_id"]))["model_id"]
        assert "logprobs" in (await _train(h, revived, 1))["loss_fn_outputs"][0]


async def test_silent_session_expires_and_is_released(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path, session_timeout=TIMEOUT) as h:
        sid = await h.session()
        other = await h.session()
        mid = await h.model(sid)
        await _train(h, mid, 1)
        # Heart-beats (and requests) keep it alive past the timeout.
        for _ in range(3):
            await trio.sleep(TIMEOUT / 2)
            assert (await h.post("session_heartbeat", {"session_id": sid})).status_code == 200
        await _train(h, mid, 3)
        last_sign = trio.current_time()
        await trio.sleep_until(last_sign + TIMEOUT - 0.001)
        assert mid in h.engine.adapters
        await trio.sleep_until(last_sign + TIMEOUT + 0.001)
        assert h.engine.adapters == {}
        r = await h.post("session_heartbeat", {"session_id": sid})
        assert r.status_code == 410
        found = await h.ok("sessions/search", {"statuses": [{"type": "cancelled"}]})
        assert {s["session_id"] for s in found["sessions"]} == {sid, other}
        assert all(s["status"]["type"] == "cancelled" for s in found["sessions"])
        r = await h.post("forward_backward", fb_body(mid, 5))
        assert r.status_code == 400 and "(expired)" in r.json()["detail"]


async def test_open_sessions_found_at_start_up_expire_too(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
    async with open_harness(tmp_path, session_timeout=TIMEOUT) as h:
        start = trio.current_time()
        await trio.sleep(TIMEOUT - 0.001)
        assert h.backend.store.get_session(sid).finished_reason is None  # type: ignore[union-attr]
        await trio.sleep(0.002)
        assert h.backend.store.get_session(sid).finished_reason == "expired"  # type: ignore[union-attr]
        assert trio.current_time() - start < TIMEOUT + 0.01


async def test_idle_adapters_beyond_the_budget_are_offloaded_and_reloaded(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path, max_resident_adapters=2) as h:
        sid = await h.session()
        a, b, c = [await h.model(sid, i) for i in range(3)]
        residency = h.backend.runner.residency
        assert residency.statistics().offloaded == (a,)
        assert set(h.engine.adapters) == {b, c}
        offload = tmp_path / "offload" / a.replace(":", "_")
        assert (offload / "optimizer.safetensors").is_file()
        # a comes back on its next use, b (least recently used) goes out.
        await _train(h, a, 1)
        await _train(h, a, 3)
        assert residency.statistics().offloaded == (b,)
        assert set(h.engine.adapters) == {c, a}
        assert not offload.exists()
        # Adapters holding gradients (forward_backward without optim_step) are never offloaded.
        await _train(h, b, 1, step=False)
        assert set(h.engine.adapters) == {a, b}
        await _train(h, c, 1, step=False)
        assert set(h.engine.adapters) == {b, c}  # a was idle: out
        out = await _train(h, a, 5, step=False)
        assert set(h.engine.adapters) == {a, b, c}  # over budget: all three hold gradients
        # a resumed with its two optimizer steps (FakeEngine: logprob[0] = -1 / (1 + steps)).
        assert out["loss_fn_outputs"][0]["logprobs"]["data"][0] == pytest.approx(-1 / 3)
        stats = residency.statistics()
        assert (stats.offloads, stats.reloads) == (4, 4)
        # Finishing the session drops them all, offloaded copies included.
        await h.post(f"sessions/{sid}/finish", {"reason": {"type": "success"}})
        await trio.sleep(0.001)
        assert h.engine.adapters == {}
        assert list((tmp_path / "offload").iterdir()) == []


async def test_offloaded_adapters_of_an_earlier_run_are_removed_at_start_up(
    tmp_path: Path, autojump_clock: object
) -> None:
    stale = tmp_path / "offload" / "s_train_0" / "adapter_model.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 10)
    async with open_harness(tmp_path):
        assert not (tmp_path / "offload").exists()


async def _until(condition: Callable[[], bool]) -> None:
    """Poll a condition of the engine, which a real-socket test cannot be told about."""
    while True:
        if condition():
            return
        await trio.sleep(0.05)


async def test_over_http_with_the_sdk(tmp_path: Path) -> None:
    """Real sockets: two training clients alternate over a budget of one resident adapter
    and train on where they stopped; leaving `open_service` releases both; a client that
    vanishes without heart-beating is expired and released. Outcomes only."""
    engine = FakeEngine()
    async with open_local_backend(
        data_dir=tmp_path / "a", engine=engine, max_resident_adapters=1
    ) as backend:
        async with open_service(base_url=backend.base_url, api_key=backend.api_key) as service:
            clients = [
                await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4) for _ in range(2)
            ]
            datum = Datum(
                model_input=ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3, 4]},
            )
            for _ in range(2):
                for client in clients:
                    await (await client.forward_backward([datum], "cross_entropy"))
                    await (await client.optim_step(AdamParams(learning_rate=0.1)))
                    assert len(engine.adapters) == 1
            out = await (await clients[0].forward([datum], "cross_entropy"))
            # Two steps each survived the offloads (FakeEngine: logprob[0] = -1 / (1 + steps)).
            assert out.loss_fn_outputs[0]["logprobs"].to_numpy()[0] == pytest.approx(-1 / 3)
            assert engine.calls.count(("load_state", clients[0].model_id)) >= 2
        with trio.fail_after(10):
            await _until(lambda: not engine.adapters)
    async with open_local_backend(
        data_dir=tmp_path / "b", engine=engine, session_timeout=3.0
    ) as backend:
        async with httpx.AsyncClient(
            base_url=backend.base_url, headers={"X-API-Key": backend.api_key}
        ) as http:
            sid = (await http.post("/api/v1/create_session", json={"sdk_version": "t"})).json()[
                "session_id"
            ]
            sub = await http.post(
                "/api/v1/create_model",
                json={"session_id": sid, "model_seq_id": 0, "base_model": FAKE_MODEL_NAME},
            )
            polled = await http.post(
                "/api/v1/retrieve_future", json={"request_id": sub.json()["request_id"]}
            )
            assert "model_id" in polled.json(), polled.text  # the adapter was created
            with trio.fail_after(20):
                await _until(lambda: not engine.adapters)
            r = await http.post("/api/v1/session_heartbeat", json={"session_id": sid})
            assert r.status_code == 410


def test_trim_heap_reaches_the_c_allocator() -> None:
    """On glibc (the platform the soak numbers come from) the trim is really called."""
    import platform

    from tinkex_trio.local._memory_trim import trim_heap

    assert platform.libc_ver()[0] == "glibc"
    assert trim_heap() is True
