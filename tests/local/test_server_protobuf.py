"""Protobuf forms end to end: our SDK against the backend app in-process (PROTOCOL.md 4.5, 6).

The backend runs with the FakeEngine inline (httpx.ASGITransport), so the same job can be run
in JSON and in protobuf and the results compared exactly. Also: the 415 switch, zstd bodies,
retrieve_futures (4.8) and cancel_future (4.9) on the raw wire.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from tinkex_trio import Config, _protobuf, open_service, types as t
from tinkex_trio.local import LocalBackendSettings
from tinkex_trio.local._app import open_backend_app
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

API_KEY = "tml-test-key"


class Recording(httpx.AsyncBaseTransport):
    """Records (path, content-type, content-encoding, accept) and can refuse JSON fwd/bwd."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, refuse_json_fwdbwd: bool = False):
        self.inner = inner
        self.refuse_json_fwdbwd = refuse_json_fwdbwd
        self.seen: list[tuple[str, str, str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        h = request.headers
        self.seen.append(
            (
                request.url.path,
                h.get("content-type", ""),
                h.get("content-encoding", ""),
                h.get("accept", ""),
            )
        )
        if (
            self.refuse_json_fwdbwd
            and request.url.path in ("/api/v1/forward_backward", "/api/v1/forward")
            and "json" in h.get("content-type", "")
        ):
            return httpx.Response(415, json={"detail": "requires application/x-protobuf"})
        return await self.inner.handle_async_request(request)


@asynccontextmanager
async def backend(data_dir: Path, **flags: Any) -> AsyncIterator[Any]:
    async with open_backend_app(
        LocalBackendSettings(
            data_dir=data_dir,
            api_key=API_KEY,
            poll_timeout=2.0,
            client_flags=flags,
        ),
        FakeEngine(),
        engine_in_thread=False,
    ) as app:
        yield app


def _data() -> list[t.Datum]:
    rng = np.random.default_rng(1)
    out = []
    for n in (3, 5, 4, 6, 2):
        tokens = rng.integers(1, 100, size=n + 1)
        out.append(
            t.Datum(
                model_input=t.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "weights": np.ones(n, np.float32),
                },
            )
        )
    return out


async def _job(app: Any, transport: httpx.AsyncBaseTransport, **config: Any) -> dict[str, Any]:
    cfg = Config(api_key=API_KEY, base_url="http://testserver", telemetry=False, **config)
    async with open_service(cfg, transport=transport) as service:
        training = await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
        fwd = await (await training.forward(_data())).result()
        fb = await (await training.forward_backward(_data())).result()
        await (await training.optim_step(t.AdamParams(learning_rate=1e-2))).result()
        fb2 = await (await training.forward_backward(_data())).result()
        sampler = await training.save_weights_and_get_sampling_client()
        prompt = t.ModelInput.from_ints([1, 2, 3])
        sample = await sampler.sample(
            prompt, 2, t.SamplingParams(max_tokens=4, seed=5), include_prompt_logprobs=True
        )
    return {
        "fwd": [o["logprobs"].data for o in fwd.loss_fn_outputs],
        "losses": [fb.metrics["loss:sum"], fb2.metrics["loss:sum"]],
        "fb": [o["logprobs"].data for o in fb.loss_fn_outputs],
        "tokens": [s.tokens for s in sample.sequences],
        "ids": [s.sequence_id for s in sample.sequences],
        "prompt_logprobs": sample.prompt_logprobs,
    }


async def test_protobuf_job_matches_json_job_exactly(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with backend(tmp_path / "a", fwdbwd_max_chunk_len=2) as app:
            json_rec = Recording(httpx.ASGITransport(app=app))
            as_json = await _job(app, json_rec)
        async with backend(
            tmp_path / "b", fwdbwd_max_chunk_len=2, proto_compress_fwdbwd=True
        ) as app:
            proto_rec = Recording(httpx.ASGITransport(app=app))
            as_proto = await _job(app, proto_rec, wire_format="protobuf")
    # Sequence ids come from the request id (random); each sample has its own.
    for result in (as_json, as_proto):
        ids = result.pop("ids")
        assert len(set(ids)) == 2 and None not in ids
    assert as_proto == as_json
    assert len(as_json["tokens"]) == 2
    # Three chunks per call (5 datums, 2 per chunk), in the expected forms.
    json_fb = [s for s in json_rec.seen if s[0] in ("/api/v1/forward_backward", "/api/v1/forward")]
    assert len(json_fb) == 9 and all(s[1] == "application/json" for s in json_fb)
    proto_fb = [s for s in proto_rec.seen if s[0] == "/api/v1/forward_backward"]
    assert len(proto_fb) == 9
    assert all(s[1:3] == (_protobuf.PROTOBUF_CONTENT_TYPE, "zstd") for s in proto_fb)
    polls = {s[3] for s in proto_rec.seen if s[0] == "/api/v1/retrieve_future"}
    assert _protobuf.PROTOBUF_CONTENT_TYPE in polls and "application/json" in polls


async def test_a_415_switches_the_service_to_protobuf(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with backend(tmp_path) as app:
            rec = Recording(httpx.ASGITransport(app=app), refuse_json_fwdbwd=True)
            result = await _job(app, rec)
    assert len(result["losses"]) == 2
    fb = [s for s in rec.seen if s[0] in ("/api/v1/forward_backward", "/api/v1/forward")]
    # One refused JSON attempt, then protobuf for every chunk of every call.
    assert fb[0][1] == "application/json"
    assert all(s[1] == _protobuf.PROTOBUF_CONTENT_TYPE for s in fb[1:]) and len(fb) == 4


async def test_bad_protobuf_bodies_are_400_with_the_reason(tmp_path: Path) -> None:
    async with backend(tmp_path) as app:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver",
            headers={"X-API-Key": API_KEY},
        ) as client:
            r = await client.post(
                "/api/v1/forward_backward",
                content=b"\xff\xff",
                headers={"content-type": _protobuf.PROTOBUF_CONTENT_TYPE},
            )
            assert r.status_code == 400 and "protobuf" in r.text
            r = await client.post(
                "/api/v1/forward_backward",
                content=b"not zstd",
                headers={
                    "content-type": _protobuf.PROTOBUF_CONTENT_TYPE,
                    "content-encoding": "zstd",
                },
            )
            assert r.status_code == 400 and "zstd" in r.text


async def test_retrieve_futures_reports_completions_by_cursor_and_cancel_future(
    tmp_path: Path,
) -> None:
    async with backend(tmp_path) as app:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver",
            headers={"X-API-Key": API_KEY},
        ) as client:

            async def ok(path: str, body: Any) -> Any:
                r = await client.post(f"/api/v1/{path}", json=body)
                assert r.status_code == 200, r.text
                return r.json()

            session = (await ok("create_session", {"sdk_version": "t"}))["session_id"]
            sampler = (
                await ok(
                    "create_sampling_session",
                    {
                        "session_id": session,
                        "sampling_session_seq_id": 0,
                        "base_model": FAKE_MODEL_NAME,
                    },
                )
            )["sampling_session_id"]
            target = {
                "type": "sampling_session",
                "sampling_session_id": sampler,
                "cloned_sampler_id": 0,
            }
            empty = await ok("retrieve_futures", {"target": target, "prev_cursor": 0, "timeout": 0})
            assert empty == {"completions": [], "cursor": 0}
            ids = []
            for seq in range(3):
                sub = await ok(
                    "asample",
                    {
                        "prompt": {"chunks": [{"tokens": [1, 2]}]},
                        "sampling_params": {"max_tokens": 2, "seed": 1},
                        "sampling_session_id": sampler,
                        "seq_id": seq,
                        "num_samples": 2,
                    },
                )
                assert len(sub["sample_sequence_ids"]) == 2
                ids.append(sub["request_id"])
            seen: list[str] = []
            cursor = 0
            with trio.fail_after(30):
                while len(seen) < 3:
                    got = await ok("retrieve_futures", {"target": target, "prev_cursor": cursor})
                    seen += [c["request_id"] for c in got["completions"]]
                    assert all(c["state"] == "finished" for c in got["completions"])
                    assert all(
                        c["response_payload_uncompressed_size"] > 0 for c in got["completions"]
                    )
                    cursor = got["cursor"]
            assert sorted(seen) == sorted(ids) and cursor == 3
            # Acknowledged events are not reported again.
            again = await ok(
                "retrieve_futures", {"target": target, "prev_cursor": cursor, "timeout": 0}
            )
            assert again == {"completions": [], "cursor": 3}
            # A result polled with Accept: protobuf is the SampleResponse message.
            r = await client.post(
                "/api/v1/retrieve_future",
                json={"request_id": ids[0], "allow_metadata_only": False},
                headers={"accept": _protobuf.PROTOBUF_CONTENT_TYPE},
            )
            assert r.headers["content-type"] == _protobuf.PROTOBUF_CONTENT_TYPE
            assert len(_protobuf.decode_sample_response(r.content).sequences) == 2
            # cancel_future on a finished request changes nothing; an unknown id is a 404.
            await ok("cancel_future", {"request_id": ids[0]})
            unknown = await client.post("/api/v1/cancel_future", json={"request_id": "req-x"})
            assert unknown.status_code == 404
            r = await client.post(
                "/api/v1/retrieve_future", json={"request_id": ids[0], "allow_metadata_only": False}
            )
            assert "sequences" in r.json()


async def _count_sample_polls(data_dir: Path, n: int, *, session_wide: bool) -> dict[str, int]:
    """n concurrent samples that each take longer than the server's long-poll window."""
    async with open_backend_app(
        LocalBackendSettings(
            data_dir=data_dir,
            api_key=API_KEY,
            poll_timeout=0.1,
            client_flags={"sample_use_retrieve_futures": session_wide},
        ),
        FakeEngine(delay=0.3),
        engine_in_thread=True,
    ) as app:
        rec = Recording(httpx.ASGITransport(app=app))
        cfg = Config(api_key=API_KEY, base_url="http://testserver", telemetry=False)
        async with open_service(cfg, transport=rec) as service:
            sampler = await service.create_sampling_client(base_model=FAKE_MODEL_NAME)
            start = len(rec.seen)
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(
                        sampler.sample,
                        t.ModelInput.from_ints([i + 1]),
                        1,
                        t.SamplingParams(max_tokens=2),
                    )
            paths = [s[0] for s in rec.seen[start:]]
    return {p.rsplit("/", 1)[1]: paths.count(p) for p in set(paths)}


async def test_retrieve_futures_replaces_per_sample_long_polls(tmp_path: Path) -> None:
    with trio.fail_after(120):
        alone = await _count_sample_polls(tmp_path / "a", 12, session_wide=False)
        shared = await _count_sample_polls(tmp_path / "b", 12, session_wide=True)
    assert alone["asample"] == shared["asample"] == 12
    assert "retrieve_futures" not in alone
    # Without: every sample re-polls each 0.1 s window until its 0.3 s+ batch is done.
    assert alone["retrieve_future"] > 2 * 12
    # With: one shared long-poll stream, then exactly one payload fetch per sample.
    assert shared["retrieve_future"] == 12
    assert shared["retrieve_futures"] < alone["retrieve_future"] - 12
