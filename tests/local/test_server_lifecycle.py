"""Resource lifecycle of the local backend (issue 11, item 1): finishing a session releases its
engine state, a silent session expires, idle adapters beyond the budget are offloaded to disk.

In-process (httpx.ASGITransport, FakeEngine inline): virtual time, exact deadlines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from server_testing import Harness, fb_body, open_harness

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
