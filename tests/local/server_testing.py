"""Helpers for the server tests (a plain module: tests/local/conftest.py belongs to the engine).

`open_harness` runs the backend app in-process (httpx.ASGITransport) with a FakeEngine called
inline on the trio thread, so tests may use `autojump_clock` and assert virtual times.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from tinkex_trio.local import LocalBackendSettings
from tinkex_trio.local._app import BackendApp, open_backend_app
from tinkex_trio.local._backend import Backend
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

API_KEY = "tml-test-key"
POLL = 5.0  # long-poll window used by the in-process tests (virtual seconds)
RESULT_DEADLINE = 300.0  # a future still pending after this (virtual) time is a test failure


@dataclass
class Harness:
    client: httpx.AsyncClient
    app: BackendApp
    engine: FakeEngine
    data_dir: Path

    @property
    def backend(self) -> Backend:
        return self.app.backend

    async def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is None:
            return await self.client.post(f"/api/v1/{path}", **kw)
        return await self.client.post(f"/api/v1/{path}", json=body, **kw)

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(f"/api/v1/{path}", **kw)

    async def ok(self, path: str, body: Any = None) -> Any:
        r = await self.post(path, body)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    async def poll(self, request_id: str) -> httpx.Response:
        return await self.post(
            "retrieve_future", {"request_id": request_id, "allow_metadata_only": True}
        )

    async def result(self, request_id: str) -> Any:
        """Poll until the future is no longer pending; return the JSON body."""
        with trio.fail_after(RESULT_DEADLINE):
            return await self._result(request_id)

    async def _result(self, request_id: str) -> Any:
        while True:
            r = await self.poll(request_id)
            assert r.status_code == 200, r.text
            body = r.json()
            if body.get("type") != "try_again":
                return body

    async def session(self) -> str:
        body = await self.ok(
            "create_session", {"tags": [], "user_metadata": {}, "sdk_version": "t"}
        )
        return str(body["session_id"])

    async def model(self, session_id: str, model_seq_id: int = 0, rank: int = 4) -> str:
        sub = await self.ok(
            "create_model",
            {
                "session_id": session_id,
                "model_seq_id": model_seq_id,
                "base_model": FAKE_MODEL_NAME,
                "lora_config": {"rank": rank},
            },
        )
        res = await self.result(sub["request_id"])
        assert "error" not in res, res
        return str(res["model_id"])


def datum(tokens: list[int], *, weights: list[float] | None = None) -> dict[str, Any]:
    n = len(tokens)
    return {
        "model_input": {"chunks": [{"tokens": tokens}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": [t + 1 for t in tokens], "dtype": "int64", "shape": [n]},
            "weights": {"data": weights or [1.0] * n, "dtype": "float32", "shape": [n]},
        },
    }


def fb_body(model_id: str, seq_id: int, tokens: list[int] | None = None) -> dict[str, Any]:
    return {
        "forward_backward_input": {
            "data": [datum(tokens or [1, 2, 3])],
            "loss_fn": "cross_entropy",
            "loss_fn_config": None,
        },
        "model_id": model_id,
        "seq_id": seq_id,
    }


def sample_body(
    sampling_session_id: str, seq_id: int, tokens: list[int] | None = None
) -> dict[str, Any]:
    return {
        "num_samples": 1,
        "prompt": {"chunks": [{"tokens": tokens or [5, 6]}]},
        "sampling_params": {"max_tokens": 2},
        "sampling_session_id": sampling_session_id,
        "seq_id": seq_id,
    }


@asynccontextmanager
async def open_harness(
    data_dir: Path,
    *,
    engine: FakeEngine | None = None,
    poll_timeout: float = POLL,
    in_thread: bool = False,
    **app_kwargs: Any,
) -> AsyncIterator[Harness]:
    """`app_kwargs` are `LocalBackendSettings` options (e.g. `max_queued_samples=`)."""
    engine = engine if engine is not None else FakeEngine()
    # No session expiry unless a test asks for it: the expiry task's deadline would be where
    # autojump leaps whenever a worker thread (file listing, archive build) is busy, which
    # would expire sessions of tests that are not about expiry.
    app_kwargs.setdefault("session_timeout", None)
    async with open_backend_app(
        LocalBackendSettings(
            data_dir=data_dir,
            api_key=API_KEY,
            poll_timeout=poll_timeout,
            **app_kwargs,
        ),
        engine,
        engine_in_thread=in_thread,
    ) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers={"X-API-Key": API_KEY}
        ) as client:
            yield Harness(client, app, engine, data_dir)
            await trio.lowlevel.checkpoint()
