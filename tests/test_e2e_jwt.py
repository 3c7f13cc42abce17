"""The SDK against the real local backend in JWT-exchange mode (PROTOCOL.md 1.3).

Real sockets (Hypercorn on 127.0.0.1) and a torch worker thread: no virtual time; the test runs
under `trio.fail_after` and asserts outcomes. The tokens live 62 s, so they have <= 60 s left
(the SDK's on-demand refresh threshold) about 2 s after each exchange: a short job already
crosses several refreshes.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

pytest.importorskip("torch")

from tinkex_trio import AdamParams, Datum, ModelInput, SamplingParams, open_service
from tinkex_trio._pool import H11Pool
from tinkex_trio.local import open_local_backend

TINY = "tinkex-trio/SmolLM2-tiny-random"
LIMIT = 240


class KeyRecorder(httpx.AsyncBaseTransport):
    """The SDK's default pool, recording (path, X-API-Key) of every request it sends."""

    def __init__(self) -> None:
        self.inner = H11Pool()
        self.seen: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.path, request.headers.get("x-api-key", "")))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_training_and_sampling_with_short_lived_jwts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 2000, size=11)
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    rec = KeyRecorder()
    with trio.fail_after(LIMIT):
        async with open_local_backend(
            data_dir=tmp_path / "data", models=[TINY], jwt_auth=True, jwt_lifetime=62.0
        ) as backend:
            async with open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False, transport=rec
            ) as service:
                assert service.client_config.pjwt_auth_enabled
                training = await service.create_lora_training_client(TINY, rank=4, seed=0)
                fb = await training.forward_backward([datum], "cross_entropy")
                step = await training.optim_step(AdamParams(learning_rate=1e-2))
                assert (await fb).metrics["loss:sum"] > 0
                await step
                await trio.sleep(2.5)  # the token now has < 60 s left: the next send refreshes
                sampler = await training.save_weights_and_get_sampling_client()
                result = await sampler.sample(
                    ModelInput.from_ints([1, 4093, 198]), 2, SamplingParams(max_tokens=4)
                )
                assert len(result.sequences) == 2
    paths = [p.removeprefix("/api/v1/") for p, _ in rec.seen]
    assert paths[0] == "client/config"
    assert paths.count("auth/token") >= 2
    first = paths.index("auth/token")
    assert all(key == backend.api_key for _, key in rec.seen[: first + 1])
    for path, key in rec.seen[first + 1 :]:
        if path.endswith("/auth/token"):
            assert key == backend.api_key
        else:
            assert key.startswith("eyJ") and key != backend.api_key, path
