"""Billing storage arithmetic of the admin endpoints (PROTOCOL.md 3.6), in-process: gigabyte-hours
per UTC hour from each checkpoint's lifetime, checked against an independent sum. The clock the
endpoint reads ("now") is pinned, so the expected numbers are exact."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from server_testing import open_harness

from tinkex_trio.local import _routes_admin


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def test_storage_gigabyte_hours_follow_checkpoint_lifetimes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path) as h:
        mid = await h.model(await h.session())
        for seq, name in ((1, "kept"), (2, "gone")):
            sub = await h.ok("save_weights", {"model_id": mid, "seq_id": seq, "path": name})
            assert "path" in await h.result(sub["request_id"])
        listed = (await h.get(f"training_runs/{mid}/checkpoints")).json()["checkpoints"]
        by_id = {c["checkpoint_id"]: c for c in listed}
        deleted = await h.client.delete(f"/api/v1/training_runs/{mid}/checkpoints/weights/gone")
        assert deleted.status_code == 200
        audit = (await h.get("audit", params={"event_type": "checkpoints"})).json()["entries"]
        [deletion] = [e for e in audit if e["event"] == "checkpoint_delete"]

        kept_at, kept_size = _ts(by_id["weights/kept"]["time"]), by_id["weights/kept"]["size_bytes"]
        gone_at, gone_size = _ts(by_id["weights/gone"]["time"]), by_id["weights/gone"]["size_bytes"]
        gone_until = _ts(deletion["timestamp"])
        start = math.floor(kept_at / 3600) * 3600
        pinned_now = kept_at + 5400.0  # 1.5 h after the first save
        monkeypatch.setattr(_routes_admin, "now", lambda: pinned_now)
        window = {
            "starting_on": datetime.fromtimestamp(start, UTC).isoformat(),
            "ending_before": datetime.fromtimestamp(start + 4 * 3600, UTC).isoformat(),
        }
        usage = (await h.get("billing/usage/events", params=window)).json()

    storage = [e for e in usage["data"] if e["event_info"]["type"] == "storage"]
    checkpoints = [e for e in usage["data"] if e["event_info"]["type"] == "checkpoint"]
    assert sum(e["event_info"]["count"] for e in checkpoints) == 2
    assert all(e["estimated_cost_usd"] is None for e in checkpoints)
    # Independent: bytes x seconds held, within the window and before "now".
    expected_total = (kept_size * (pinned_now - kept_at) + gone_size * (gone_until - gone_at)) / (
        3600 * 1e9
    )
    total = sum(e["event_info"]["gigabyte_hours"] for e in storage)
    assert expected_total > 0
    assert total == pytest.approx(expected_total, rel=1e-9)
    # Per hour: the kept checkpoint fills every whole hour after its first one, until "now".
    hours = {_ts(e["bucket_start"]): e["event_info"]["gigabyte_hours"] for e in storage}
    first_hour_end = start + 3600
    assert hours[start + 3600] == pytest.approx(
        kept_size * min(3600.0, pinned_now - first_hour_end) / (3600 * 1e9), rel=1e-9
    )
    assert max(hours) < pinned_now and all(bucket >= start for bucket in hours)
    assert all(e["event_info"]["free"] and e["estimated_cost_usd"] == 0.0 for e in storage)
    assert all(e["project_id"] == "local-default" for e in usage["data"])


async def test_sessions_belong_to_the_default_project_unless_assigned(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        default_session = await h.session()
        named = (
            await h.ok(
                "create_session",
                {"tags": [], "user_metadata": {}, "sdk_version": "t", "project_id": "proj-a"},
            )
        )["session_id"]
        default_run, named_run = await h.model(default_session), await h.model(named)

        async def runs(project: str) -> list[str]:
            answer = await h.get("training_runs", params={"project_id": project})
            assert answer.status_code == 200, answer.text
            return [r["training_run_id"] for r in answer.json()["training_runs"]]

        async def searched(project: str) -> list[str]:
            found = await h.ok("sessions/search", {"project_ids": [project]})
            return [s["session_id"] for s in found["sessions"]]

        everything = await h.ok("sessions/search", {})
        assert {s["session_id"]: s["project_id"] for s in everything["sessions"]} == {
            default_session: "local-default",
            named: "proj-a",
        }
        assert await runs("local-default") == [default_run]
        assert await runs("proj-a") == [named_run]
        assert await searched("local-default") == [default_session]
        moved = await h.client.put(
            f"/api/v1/sessions/{default_session}/project", json={"project_id": "proj-a"}
        )
        assert moved.status_code == 200
        assert await runs("local-default") == []
        assert sorted(await runs("proj-a")) == sorted([default_run, named_run])
        assert await searched("local-default") == []
        assert (await h.get("training_runs", params={"project_id": " "})).status_code == 400
        audit = (await h.get("audit", params={"event_type": "projects"})).json()["entries"]
        assert [(e["event"], e["event_details"]["project_id"]) for e in audit] == [
            ("project_session_assign", "proj-a")
        ]
