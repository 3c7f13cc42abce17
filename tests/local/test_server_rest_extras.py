"""The REST extras of the local backend in-process: external-weights URLs, copy_weights,
session project, trace export and session search (PROTOCOL.md 3.5, 7.9)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from server_testing import Harness, open_harness

from tinkex_trio.local._signed_urls import sign


async def _session(h: Harness, **fields: Any) -> str:
    body = await h.ok(
        "create_session", {"tags": [], "user_metadata": {}, "sdk_version": "t", **fields}
    )
    return str(body["session_id"])


async def _export(h: Harness, mid: str, seq: int, name: str) -> str:
    sub = await h.ok("save_weights_external", {"model_id": mid, "seq_id": seq, "path": name})
    res = await h.result(sub["request_id"])
    assert res["size_bytes"] > 0, res
    return str(res["path"])


async def test_external_weights_urls_are_signed_and_die_with_the_export(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        mid = await h.model(await _session(h))
        path = await _export(h, mid, 1, "dl")
        route = f"training_runs/{mid}/checkpoints/external_weights/dl/external_weights_urls"
        urls = (await h.get(route)).json()
        assert "optimizer.safetensors" not in urls["urls"]
        url = urls["urls"]["adapter_model.safetensors"]
        parts = urlsplit(url)
        got = await h.client.get(url, headers={"X-API-Key": ""})
        assert got.status_code == 200 and got.content == b"\0" * 64
        query = parse_qs(parts.query)
        past = int(time.time()) - 10
        expired = (
            f"{parts.path}?expires={past}&signature={sign(h.backend.secret, parts.path, past)}"
        )
        assert (await h.client.get(expired)).status_code == 410
        tampered = url.replace(query["expires"][0], str(int(query["expires"][0]) + 1))
        assert (await h.client.get(tampered)).status_code == 403
        # Only external_weights checkpoints have file URLs.
        assert (
            await h.get(f"training_runs/{mid}/checkpoints/weights/dl/external_weights_urls")
        ).status_code == 404
        # Overwriting the export invalidates the old URLs.
        await trio.sleep(1)
        assert await _export(h, mid, 2, "dl") == path
        assert (await h.client.get(url)).status_code == 404
        await h.client.delete(f"/api/v1/training_runs/{mid}/checkpoints/external_weights/dl")
        assert (await h.get(route)).status_code == 404


async def test_copy_weights_is_idempotent_and_untrainable(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        mid = await h.model(await _session(h))
        sub = await h.ok("save_weights", {"model_id": mid, "seq_id": 1, "path": "a"})
        source = (await h.result(sub["request_id"]))["path"]
        headers = {"X-Idempotency-Key": "key-1", "X-Tinker-Weights-Access-Token": "anything"}
        body = {"source_path": source, "destination_project_id": "proj-x"}
        first = await h.post("copy_weights", body, headers=headers)
        again = await h.post("copy_weights", body, headers=headers)
        assert first.status_code == 200 and again.json() == first.json()
        other = (await h.post("copy_weights", body)).json()
        assert other["tinker_path"] != first.json()["tinker_path"]
        copied_run = first.json()["tinker_path"].split("/")[2]
        refused = await h.post(
            "forward_backward",
            {
                "forward_backward_input": {"data": [], "loss_fn": "cross_entropy"},
                "model_id": copied_run,
                "seq_id": 1,
            },
        )
        assert refused.status_code == 400 and refused.json()["category"] == "user"
        found = (await h.post("sessions/search", {"project_ids": ["proj-x"]})).json()
        assert len(found["sessions"]) == 2
        bad = await h.post("copy_weights", {"source_path": "tinker://x/weights/y"})
        assert bad.status_code == 404
        assert (await h.post("copy_weights", {"source_path": "nope"})).status_code == 400
        assert (
            await h.post("copy_weights", {"source_path": source, "ttl_seconds": -1})
        ).status_code == 400


async def test_session_project_and_trace_export(tmp_path: Path) -> None:
    """Real time: the export is written in a worker thread, which autojump cannot see."""
    async with open_harness(tmp_path) as h:
        sid = await _session(h)
        await h.model(sid)
        put = await h.client.put(f"/api/v1/sessions/{sid}/project", json={"project_id": "p2"})
        assert put.status_code == 200
        assert (
            await h.client.put(f"/api/v1/sessions/{sid}/project", json={"project_id": " "})
        ).status_code == 400
        assert (
            await h.client.put("/api/v1/sessions/nope/project", json={"project_id": "p"})
        ).status_code == 404
        assert (await h.post("sessions/search", {"project_ids": ["p2"]})).json()["sessions"][0][
            "session_id"
        ] == sid

        first = (await h.get(f"sessions/{sid}/trace_export")).json()
        assert first == {"status": "pending", "url": None, "error": None}
        with trio.fail_after(10):
            for _ in range(500):
                ready = (await h.get(f"sessions/{sid}/trace_export")).json()
                if ready["status"] != "pending":
                    break
                await trio.sleep(0.02)
        assert ready["status"] == "ready"
        trace = (await h.client.get(ready["url"])).json()
        assert [r["request_type"] for r in trace["requests"]] == ["CreateModel"]
        assert (await h.client.get(ready["url"] + "0")).status_code == 403
        assert (await h.get("sessions/nope/trace_export")).status_code == 404


async def test_session_search_filters_and_cursor(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        ids = []
        names = ["Nightly RL run", "nightly sft", "Weekly eval", None]
        for i, name in enumerate(names):
            extra: dict[str, Any] = {"user_metadata": {"i": str(i), "team": "rl"}}
            if name is not None:
                extra["display_name"] = name
            ids.append(await _session(h, **extra))
            await trio.sleep(0.01)
        await h.post(f"sessions/{ids[2]}/finish", {"reason": {"type": "errored"}})

        async def search(**body: Any) -> list[str]:
            r = await h.post("sessions/search", body)
            assert r.status_code == 200, r.text
            return [s["session_id"] for s in r.json()["sessions"]]

        assert await search() == ids[::-1]  # newest first
        assert await search(display_name="NIGHT run") == [ids[0]]
        assert await search(display_name="nightly") == [ids[1], ids[0]]
        assert await search(display_name="eval", session_id=ids[3]) == [ids[3], ids[2]]
        assert await search(user_metadata={"i": "1", "team": "rl"}) == [ids[1]]
        assert await search(statuses=[{"type": "client_finished"}]) == [ids[2]]
        finished_ok = [{"type": "client_finished", "reasons": ["success"]}]
        assert await search(statuses=finished_ok) == []
        assert await search(statuses=[{"type": "active"}, {"type": "failed"}]) == [
            ids[3],
            ids[1],
            ids[0],
        ]
        assert await search(owner={"type": "user", "owner_urns": ["tml:user:other"]}) == []
        assert len(await search(owner={"type": "user", "owner_urns": ["tml:user:local"]})) == 4

        seen: list[str] = []
        cursor = None
        while True:
            body: dict[str, Any] = {"limit": 3}
            if cursor is not None:
                body["cursor"] = cursor
            page = (await h.post("sessions/search", body)).json()
            seen += [s["session_id"] for s in page["sessions"]]
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        assert seen == ids[::-1]

        summary = (await h.post("sessions/search", {"session_id": ids[2]})).json()["sessions"][0]
        assert summary["status"] == {
            "type": "client_finished",
            "reason": {"type": "errored"},
            "detail": None,
        }
        assert summary["owner"] == "tml:user:local" and summary["checkpoints_count"] == 0
        for bad in ({"limit": 0}, {"limit": 201}, {"owner": {"type": "user", "owner_urns": []}}):
            r = await h.post("sessions/search", bad)
            assert r.status_code == 400 and r.json()["category"] == "user", bad
