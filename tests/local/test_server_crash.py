"""Crash safety (issue 11, item 4): `kill -9` of a serving process mid-save and mid-training.

The server runs in a child process (`stalling_server.py`: the real backend and HTTP server over
the FakeEngine, whose chosen call stalls half-way through writing). The test drives it over
HTTP, kills it with SIGKILL while the call hangs, restarts it on the same data directory and
checks: every finished checkpoint is listed with its files intact, the in-flight futures
failed with a clear error, and no byte of staging is left, with the removal logged.
Real sockets and processes: outcomes only, under `trio.fail_after`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from server_testing import datum

from tinkex_trio.local._store import RESTART_FAILURE_MESSAGE
from tinkex_trio.local.testing import FAKE_MODEL_NAME

SCRIPT = Path(__file__).with_name("stalling_server.py")
KEY = {"X-API-Key": "tml-crash"}


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, stderr: Path) -> None:
        self.process = process
        self.client = httpx.AsyncClient(base_url=url, headers=KEY, timeout=30)
        self.stderr = stderr

    async def ok(self, path: str, body: Any) -> Any:
        r = await self.client.post(f"/api/v1/{path}", json=body)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    async def result(self, request_id: str) -> Any:
        while True:
            body = await self.ok("retrieve_future", {"request_id": request_id})
            if body.get("type") != "try_again":
                return body

    async def wait_stalled(self) -> None:
        assert self.process.stdout is not None
        line = await trio.to_thread.run_sync(self.process.stdout.readline)
        assert line.strip() == b"STALLED", line

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _spawn(data_dir: Path, stall: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), str(data_dir), stall],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=SCRIPT.parent,
        )


@asynccontextmanager
async def running(data_dir: Path, stall: str, log: Path) -> AsyncIterator[Server]:
    process = _spawn(data_dir, stall, log)
    try:
        assert process.stdout is not None
        url = (await trio.to_thread.run_sync(process.stdout.readline)).decode().strip()
        assert url.startswith("http://"), (url, _text(log))
        server = Server(process, url, log)
        async with server.client:
            yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _text(path: Path) -> str:
    return path.read_text()


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def _staging_bytes(data_dir: Path) -> int:
    staging = data_dir / "staging"
    if not staging.exists():
        return 0
    return sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) + len(
        list(staging.iterdir())
    )


async def test_kill_9_mid_save_and_mid_training(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(120):
        # 1. A finished checkpoint, then a second save that is killed half-written.
        async with running(data, "save_state:2", tmp_path / "run1.log") as server:
            sid = (await server.ok("create_session", {"sdk_version": "t"}))["session_id"]
            sub = await server.ok(
                "create_model",
                {"session_id": sid, "model_seq_id": 0, "base_model": FAKE_MODEL_NAME},
            )
            mid = (await server.result(sub["request_id"]))["model_id"]
            sub = await server.ok("save_weights", {"model_id": mid, "seq_id": 1, "path": "done"})
            done_path = (await server.result(sub["request_id"]))["path"]
            ck_dir = data / "checkpoints" / mid.replace(":", "_") / "weights" / "done"
            before = _digests(ck_dir)
            second = await server.ok(
                "save_weights", {"model_id": mid, "seq_id": 2, "path": "interrupted"}
            )
            queued = await server.ok(
                "optim_step", {"model_id": mid, "seq_id": 3, "adam_params": {}}
            )
            await server.wait_stalled()
            assert _staging_bytes(data) > 100_000  # the half-written save is really there
            server.kill()

        # 2. Restart: recovery, then a training step that is killed mid-way.
        async with running(data, "forward_backward:1", tmp_path / "run2.log") as server:
            assert _staging_bytes(data) == 0
            log = _text(tmp_path / "run2.log")
            assert "start-up removed 1 leftover(s) of interrupted writes" in log, log
            listed = (await server.client.get(f"/api/v1/training_runs/{mid}/checkpoints")).json()
            assert [c["tinker_path"] for c in listed["checkpoints"]] == [done_path]
            assert _digests(ck_dir) == before
            for request_id in (second["request_id"], queued["request_id"]):
                failed = await server.result(request_id)
                assert failed["error"] == RESTART_FAILURE_MESSAGE
                assert failed["category"] == "server"
            # The run lost its in-memory adapter; it revives from the finished checkpoint.
            sub = await server.ok(
                "load_weights",
                {"session_id": sid, "model_seq_id": 1, "path": done_path, "optimizer": True},
            )
            revived = (await server.result(sub["request_id"]))["model_id"]
            fb = await server.ok(
                "forward_backward",
                {
                    "forward_backward_input": {
                        "data": [datum([1, 2, 3])],
                        "loss_fn": "cross_entropy",
                    },
                    "model_id": revived,
                    "seq_id": 1,
                },
            )
            await server.wait_stalled()
            server.kill()

        # 3. Restart again: the training step failed clearly; the checkpoint is still intact.
        async with running(data, "-", tmp_path / "run3.log") as server:
            failed = await server.result(fb["request_id"])
            assert failed["error"] == RESTART_FAILURE_MESSAGE
            listed = (await server.client.get("/api/v1/checkpoints")).json()
            assert [c["tinker_path"] for c in listed["checkpoints"]] == [done_path]
            assert _digests(ck_dir) == before
            assert _staging_bytes(data) == 0
