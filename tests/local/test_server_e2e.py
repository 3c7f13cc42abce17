"""The local backend over real HTTP (Hypercorn on 127.0.0.1, port 0) with the FakeEngine in its
worker thread. Outcomes only, each test under a trio.fail_after limit (STYLE.md 2.11)."""

from __future__ import annotations

import functools
import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import trio
from server_testing import fb_body

from tinkex_trio.local import open_local_backend, serve_local_backend
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

LIMIT = 30


async def _result(client: httpx.AsyncClient, request_id: str) -> Any:
    while True:
        r = await client.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert r.status_code == 200, r.text
        body = r.json()
        if body.get("type") != "try_again":
            return body


async def test_end_to_end_over_http(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_local_backend(
            data_dir=tmp_path, engine=FakeEngine(delay=0.01), poll_timeout=1.0
        ) as backend:
            assert backend.api_key.startswith("tml-")
            assert (tmp_path / "api_key").read_text().strip() == backend.api_key
            async with httpx.AsyncClient(
                base_url=backend.base_url, headers={"X-API-Key": backend.api_key}
            ) as client:
                assert (await client.get("/api/v1/healthz")).json() == {"status": "ok"}
                r = await client.post(
                    "/api/v1/create_session",
                    json={"sdk_version": "x"},
                    headers={"X-API-Key": "tml-wrong"},
                )
                assert r.status_code == 401
                sid = (
                    await client.post("/api/v1/create_session", json={"sdk_version": "x"})
                ).json()["session_id"]
                sub = (
                    await client.post(
                        "/api/v1/create_model",
                        json={"session_id": sid, "model_seq_id": 0, "base_model": FAKE_MODEL_NAME},
                    )
                ).json()
                mid = (await _result(client, sub["request_id"]))["model_id"]
                # Chunks of one call arrive concurrently, first chunk last (PROTOCOL.md 5.2).
                ids: dict[int, str] = {}

                async def submit(seq: int, delay: float) -> None:
                    await trio.sleep(delay)
                    r = await client.post("/api/v1/forward_backward", json=fb_body(mid, seq))
                    ids[seq] = r.json()["request_id"]

                async with trio.open_nursery() as nursery:
                    for seq, delay in ((3, 0.0), (2, 0.05), (1, 0.1)):
                        nursery.start_soon(submit, seq, delay)
                results = [await _result(client, ids[s]) for s in (1, 2, 3)]
                assert all("loss:sum" in r["metrics"] for r in results)
                save = (
                    await client.post(
                        "/api/v1/save_weights", json={"model_id": mid, "seq_id": 4, "path": "final"}
                    )
                ).json()
                path = (await _result(client, save["request_id"]))["path"]
                archive = f"/api/v1/training_runs/{mid}/checkpoints/weights/final/archive"
                for _ in range(400):
                    r = await client.get(archive)
                    if r.status_code != 503:
                        break
                    await trio.sleep(0.05)
                assert r.status_code == 302
                location = r.headers["location"]
                assert location.startswith(backend.base_url + "/archives/")
                async with httpx.AsyncClient() as plain:  # no Tinker headers, like urllib
                    buf = io.BytesIO()
                    async with plain.stream("GET", location) as dl:
                        assert dl.status_code == 200
                        async for chunk in dl.aiter_bytes():
                            buf.write(chunk)
                buf.seek(0)
                with tarfile.open(fileobj=buf) as tar:
                    assert "checkpoint_complete" in tar.getnames()
                # Many concurrent samples in one go (batched by the server).
                ss = (
                    await client.post(
                        "/api/v1/create_sampling_session",
                        json={"session_id": sid, "sampling_session_seq_id": 0, "model_path": path},
                    )
                ).json()
                outs: list[Any] = []

                async def sample(i: int) -> None:
                    r = await client.post(
                        "/api/v1/asample",
                        json={
                            "prompt": {"chunks": [{"tokens": [i + 1]}]},
                            "seq_id": i,
                            "sampling_session_id": ss["sampling_session_id"],
                            "sampling_params": {"max_tokens": 2},
                        },
                    )
                    outs.append(await _result(client, r.json()["request_id"]))

                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(sample, i)
                assert len(outs) == 8 and all(len(o["sequences"]) == 1 for o in outs)

        # Restart on the same data dir: state is listed again, the key is reused.
        engine = FakeEngine()
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                functools.partial(serve_local_backend, data_dir=tmp_path, engine=engine)
            )
            key = (tmp_path / "api_key").read_text().strip()
            async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}) as client:
                runs = (await client.get("/api/v1/training_runs")).json()
                assert [r["training_run_id"] for r in runs["training_runs"]] == [mid]
                cks = (await client.get("/api/v1/checkpoints")).json()["checkpoints"]
                assert [c["tinker_path"] for c in cks] == [path]
            nursery.cancel_scope.cancel()
