"""REST endpoints, checkpoint archives and restart recovery of the local backend (in-process)."""

from __future__ import annotations

import io
import tarfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from server_testing import Harness, fb_body, open_harness

from tinkex_trio.local._archive import ARCHIVE_ROUTE_PREFIX
from tinkex_trio.local._signed_urls import sign
from tinkex_trio.local._store import RESTART_FAILURE_MESSAGE


def _aware(ts: str) -> datetime:
    value = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    assert value.tzinfo is not None, ts
    return value


async def _save(h: Harness, mid: str, seq: int, name: str, sampler: bool = False) -> str:
    path = "save_weights_for_sampler" if sampler else "save_weights"
    sub = await h.ok(path, {"model_id": mid, "seq_id": seq, "path": name})
    res = await h.result(sub["request_id"])
    return str(res["path"])


async def test_runs_and_checkpoints_pagination(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mids = [await h.model(sid, model_seq_id=i) for i in range(3)]
        seen: list[str] = []
        for offset in (0, 2):
            page = (await h.get("training_runs", params={"limit": 2, "offset": offset})).json()
            assert page["cursor"] == {"offset": offset, "limit": 2, "total_count": 3}
            seen += [r["training_run_id"] for r in page["training_runs"]]
        assert sorted(seen) == sorted(mids)
        run = (await h.get(f"training_runs/{mids[0]}")).json()
        assert run["base_model"] and run["is_lora"] is True and run["lora_rank"] == 4
        _aware(run["last_request_time"])
        assert (await h.get("training_runs/nope:train:0")).status_code == 404
        assert (await h.get("training_runs", params={"limit": "x"})).status_code == 400

        for i in range(3):
            await _save(h, mids[0], i + 1, f"step-{i}")
            await trio.sleep(
                1
            )  # distinct timestamps in the wall clock are not needed: order is by insert time
        await _save(h, mids[0], 4, "smp", sampler=True)
        run = (await h.get(f"training_runs/{mids[0]}")).json()
        assert run["last_checkpoint"]["checkpoint_id"].startswith("weights/")
        assert run["last_sampler_checkpoint"]["checkpoint_id"] == "sampler_weights/smp"
        per_run = (await h.get(f"training_runs/{mids[0]}/checkpoints")).json()
        assert len(per_run["checkpoints"]) == 4
        ids: list[str] = []
        for offset in (0, 3):
            page = (await h.get("checkpoints", params={"limit": 3, "offset": offset})).json()
            assert page["cursor"]["total_count"] == 4
            ids += [c["checkpoint_id"] for c in page["checkpoints"]]
            for c in page["checkpoints"]:
                _aware(c["time"])
                assert c["tinker_path"] == f"tinker://{mids[0]}/{c['checkpoint_id']}"
        assert len(ids) == 4 and len(set(ids)) == 4

        sessions = (await h.get("sessions", params={"limit": 10})).json()
        assert sessions == {"sessions": [sid]}
        sess = (await h.get(f"sessions/{sid}")).json()
        assert sess["training_run_ids"] == mids and sess["sampler_ids"] == []


async def test_checkpoint_publish_ttl_delete(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        await _save(h, mid, 1, "a")
        base = f"training_runs/{mid}/checkpoints/weights/a"
        assert (await h.client.delete(f"/api/v1/{base}/publish")).status_code == 409
        assert (await h.post(f"{base}/publish")).status_code == 200
        r = await h.post(f"{base}/publish")
        assert r.status_code == 409 and "already public" in r.json()["detail"]
        ck = (await h.get(f"training_runs/{mid}/checkpoints")).json()["checkpoints"][0]
        assert ck["public"] is True and ck["expires_at"] is None
        r = await h.client.put(f"/api/v1/{base}/ttl", json={"ttl_seconds": 86400})
        assert r.status_code == 200
        ck = (await h.get(f"training_runs/{mid}/checkpoints")).json()["checkpoints"][0]
        assert _aware(ck["expires_at"]).timestamp() > time.time() + 86000
        r = await h.client.put(f"/api/v1/{base}/ttl", json={"ttl_seconds": None})
        ck = (await h.get(f"training_runs/{mid}/checkpoints")).json()["checkpoints"][0]
        assert ck["expires_at"] is None
        r = await h.client.put(f"/api/v1/{base}/ttl", json={"ttl_seconds": -5})
        assert r.status_code == 400
        directory = tmp_path / "checkpoints" / mid.replace(":", "_") / "weights" / "a"
        assert (directory / "adapter_model.safetensors").is_file()
        assert (await h.client.delete(f"/api/v1/{base}")).status_code == 200
        assert not directory.exists()
        assert (await h.client.delete(f"/api/v1/{base}")).status_code == 404
        assert (await h.get(f"training_runs/{mid}/checkpoints")).json()["checkpoints"] == []


async def _archive_location(h: Harness, mid: str, checkpoint_id: str) -> Any:
    url = f"training_runs/{mid}/checkpoints/{checkpoint_id}/archive"
    statuses = []
    with trio.fail_after(10):
        while True:
            r = await h.get(url, headers={"accept": "application/gzip"})
            statuses.append(r.status_code)
            if r.status_code != 503:
                break
            assert r.headers["retry-after"] == "1" and r.json()["detail"]
            await trio.sleep(0.01)
    assert statuses[0] == 503 and statuses[-1] == 302, statuses
    return r


async def test_archive_503_then_302_and_signed_download(tmp_path: Path) -> None:
    # Real clock: the archive is built in a worker thread.
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        await _save(h, mid, 1, "step-1")
        r = await _archive_location(h, mid, "weights/step-1")
        location = r.headers["location"]
        assert location.startswith("http://testserver/archives/")
        expires = datetime.strptime(r.headers["expires"], "%a, %d %b %Y %H:%M:%S GMT")
        assert expires.year >= 2025
        dl = await h.client.get(location)
        assert dl.status_code == 200 and dl.headers["content-type"] == "application/gzip"
        assert int(dl.headers["content-length"]) == len(dl.content)
        with tarfile.open(fileobj=io.BytesIO(dl.content)) as tar:
            members = tar.getmembers()
        names = sorted(m.name for m in members)
        assert names == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "checkpoint_complete",
            "optimizer.safetensors",
        ]
        assert all(m.isfile() and "/" not in m.name for m in members)
        # A second request is served from the cache at once.
        assert (
            await h.get(f"training_runs/{mid}/checkpoints/weights/step-1/archive")
        ).status_code == 302

        parts = urlsplit(location)
        query = parse_qs(parts.query)
        tampered = location.replace(query["signature"][0], "0" * 64)
        r = await h.client.get(tampered)
        assert r.status_code == 403 and "signature" in r.json()["detail"]
        r = await h.client.get(location.replace(f"expires={query['expires'][0]}", "expires=99"))
        assert r.status_code == 403
        past = int(time.time()) - 10
        sig = sign(h.backend.secret, parts.path, past)
        r = await h.client.get(f"{parts.path}?expires={past}&signature={sig}")
        assert r.status_code == 410 and "expired" in r.json()["detail"]
        assert parts.path.startswith(ARCHIVE_ROUTE_PREFIX)
        # Deleting the checkpoint removes the cached archive too.
        await h.client.delete(f"/api/v1/training_runs/{mid}/checkpoints/weights/step-1")
        assert (await h.client.get(location)).status_code == 404
        r = await h.get(f"training_runs/{mid}/checkpoints/weights/step-1/archive")
        assert r.status_code == 404


async def test_restart_keeps_state_and_fails_pending(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        path = await _save(h, mid, 1, "keep")
        ss = await h.ok(
            "create_sampling_session",
            {"session_id": sid, "sampling_session_seq_id": 0, "model_path": path},
        )
        pending = await h.ok("forward_backward", fb_body(mid, 3))  # waits for seq 2 forever
        await h.poll(pending["request_id"])
    async with open_harness(tmp_path) as h:
        res = await h.result(pending["request_id"])
        assert res == {"error": RESTART_FAILURE_MESSAGE, "category": "server"}
        assert (await h.get("sessions")).json()["sessions"] == [sid]
        run = (await h.get(f"training_runs/{mid}")).json()
        assert run["corrupted"] is True and run["last_checkpoint"]["tinker_path"] == path
        assert len((await h.get("checkpoints")).json()["checkpoints"]) == 1
        sampler = (await h.get(f"samplers/{ss['sampling_session_id']}")).json()
        assert sampler["model_path"] == path
        # Training on the lost in-memory model is refused with a clear message ...
        r = await h.post("forward_backward", fb_body(mid, 4))
        assert r.status_code == 400 and "checkpoint" in r.json()["detail"]
        # ... but it can be restored from the checkpoint, and sampling still works.
        load = await h.ok(
            "load_weights", {"session_id": sid, "model_seq_id": 1, "path": path, "optimizer": True}
        )
        new = (await h.result(load["request_id"]))["model_id"]
        fb = await h.ok("forward_backward", fb_body(new, 1))
        assert "metrics" in await h.result(fb["request_id"])
        smp = await h.ok(
            "asample",
            {
                "prompt": {"chunks": [{"tokens": [5]}]},
                "sampling_session_id": ss["sampling_session_id"],
                "seq_id": 0,
                "sampling_params": {"max_tokens": 2},
            },
        )
        assert len((await h.result(smp["request_id"]))["sequences"]) == 1
