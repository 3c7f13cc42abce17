"""The local backend's future protocol, ordering and error handling, in-process and in
virtual time (FakeEngine called inline; `autojump_clock` from pytest-trio)."""

from __future__ import annotations

from pathlib import Path

import trio
from server_testing import POLL, datum, fb_body, open_harness

from tinkex_trio.local._engine_api import EngineUserError
from tinkex_trio.local.testing import FAKE_MODEL_NAME


async def test_auth_required_except_healthz(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        r = await h.client.post(
            "/api/v1/create_session", json={"sdk_version": "x"}, headers={"X-API-Key": ""}
        )
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        del h.client.headers["X-API-Key"]
        r = await h.post("create_session", {"sdk_version": "x"})
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
        assert int(r.headers["content-length"]) > 0
        r = await h.get("healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_session_lifecycle(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        assert await h.ok("session_heartbeat", {"session_id": sid}) == {"type": "session_heartbeat"}
        assert (await h.ok("telemetry", {"events": []})) == {"status": "accepted"}
        assert (
            await h.post(f"sessions/{sid}/finish", {"reason": {"type": "success"}})
        ).status_code == 200
        r = await h.post("session_heartbeat", {"session_id": sid})
        assert r.status_code == 410
        r = await h.post("session_heartbeat", {"session_id": "nope"})
        assert r.status_code == 404
        caps = (await h.get("get_server_capabilities")).json()
        assert caps["supported_models"][0]["model_name"] == FAKE_MODEL_NAME
        assert (await h.ok("client/config", {"sdk_version": "x"}))["pjwt_auth_enabled"] is False


async def test_training_round_trip(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        assert mid == f"{sid}:train:0"
        info = await h.ok("get_info", {"model_id": mid})
        assert info["model_data"]["model_name"] == FAKE_MODEL_NAME and info["lora_rank"] == 4
        fb = await h.ok("forward_backward", fb_body(mid, 1))
        assert fb["model_id"] == mid
        out = await h.result(fb["request_id"])
        assert out["loss_fn_output_type"] == "ArrayRecord"
        assert out["loss_fn_outputs"][0]["logprobs"]["shape"] == [3]
        assert "loss:sum" in out["metrics"]
        fwd = await h.ok(
            "forward",
            {
                "forward_input": {"data": [datum([5, 6])], "loss_fn": "cross_entropy"},
                "model_id": mid,
                "seq_id": 2,
            },
        )
        assert len((await h.result(fwd["request_id"]))["loss_fn_outputs"]) == 1
        opt = await h.ok("optim_step", {"model_id": mid, "seq_id": 3, "adam_params": {}})
        assert await h.result(opt["request_id"]) == {"metrics": {"learning_rate:mean": 1e-4}}
        save = await h.ok("save_weights", {"model_id": mid, "seq_id": 4, "path": "step-1"})
        res = await h.result(save["request_id"])
        assert res["path"] == f"tinker://{mid}/weights/step-1"
        named = await h.ok("save_weights_for_sampler", {"model_id": mid, "seq_id": 5, "path": "s1"})
        assert (await h.result(named["request_id"]))["path"] == f"tinker://{mid}/sampler_weights/s1"
        unnamed = await h.ok(
            "save_weights_for_sampler",
            {"model_id": mid, "seq_id": 6, "sampling_session_seq_id": 0},
        )
        res = await h.result(unnamed["request_id"])
        # `path` is null, as a 0.15 client asserts for an unnamed save (PROTOCOL.md A.3.8).
        assert res == {
            "sampling_session_id": f"{sid}:sample:0",
            "path": None,
            "type": "save_weights_for_sampler",
        }
        smp = await h.ok(
            "asample",
            {
                "num_samples": 2,
                "prompt": {"chunks": [{"tokens": [7, 8]}]},
                "sampling_params": {"max_tokens": 3},
                "sampling_session_id": res["sampling_session_id"],
                "seq_id": 0,
                "prompt_logprobs": True,
                "topk_prompt_logprobs": 2,
            },
        )
        assert len(smp["sample_sequence_ids"]) == 2
        out = await h.result(smp["request_id"])
        assert [s["sequence_id"] for s in out["sequences"]] == smp["sample_sequence_ids"]
        assert all(s["stop_reason"] == "length" and len(s["tokens"]) == 3 for s in out["sequences"])
        assert out["prompt_logprobs"] == [None, -1.0]
        assert out["topk_prompt_logprobs"][0] is None and len(out["topk_prompt_logprobs"][1]) == 2
        unload = await h.ok("unload_model", {"model_id": mid})
        assert (await h.result(unload["request_id"])) == {"model_id": mid, "type": "unload_model"}
        r = await h.post("forward_backward", fb_body(mid, 7))
        assert r.status_code == 400 and "unloaded" in r.json()["detail"]


async def test_out_of_order_waits_and_long_poll(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        opt = await h.ok("optim_step", {"model_id": mid, "seq_id": 2})
        start = trio.current_time()
        r = await h.poll(opt["request_id"])
        assert r.json() == {
            "type": "try_again",
            "request_id": opt["request_id"],
            "queue_state": "active",
        }
        assert trio.current_time() - start == POLL  # held for the whole window
        assert ("optim_step", mid) not in h.engine.calls
        fb = await h.ok("forward_backward", fb_body(mid, 1))
        await h.result(opt["request_id"])
        await h.result(fb["request_id"])
        order = [c for c in h.engine.calls if c[0] in ("forward_backward", "optim_step")]
        assert order == [("forward_backward", mid), ("optim_step", mid)]


async def test_poll_wakes_as_soon_as_done(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        opt = await h.ok("optim_step", {"model_id": mid, "seq_id": 2})
        async with trio.open_nursery() as nursery:

            async def late_first() -> None:
                await trio.sleep(1.5)
                await h.ok("forward_backward", fb_body(mid, 1))

            nursery.start_soon(late_first)
            start = trio.current_time()
            res = await h.result(opt["request_id"])
            assert trio.current_time() - start == 1.5
            assert "metrics" in res


async def test_duplicate_seq_dedup_and_conflict(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        a = await h.ok("forward_backward", fb_body(mid, 1))
        b = await h.ok("forward_backward", fb_body(mid, 1))
        assert a["request_id"] == b["request_id"]
        r = await h.post("forward_backward", fb_body(mid, 1, tokens=[9, 9]))
        assert r.status_code == 409 and "different payload" in r.json()["detail"]
        await h.result(a["request_id"])
        assert [c for c in h.engine.calls if c[0] == "forward_backward"] == [
            ("forward_backward", mid)
        ]
        # create_model retried with the same body → same request
        body = {
            "session_id": sid,
            "model_seq_id": 0,
            "base_model": FAKE_MODEL_NAME,
            "lora_config": {"rank": 4},
        }
        again = await h.ok("create_model", body)
        assert again["model_id"] == mid
        # asample dedup on (sampling session, seq_id)
        ss = await h.ok(
            "create_sampling_session",
            {"session_id": sid, "sampling_session_seq_id": 3, "base_model": FAKE_MODEL_NAME},
        )
        sbody = {
            "prompt": {"chunks": [{"tokens": [1]}]},
            "num_samples": 1,
            "sampling_session_id": ss["sampling_session_id"],
            "seq_id": 4,
        }
        s1 = await h.ok("asample", sbody)
        s2 = await h.ok("asample", sbody)
        assert s1 == s2


async def test_failure_categories_do_not_poison(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        h.engine.fail_next("forward_backward", EngineUserError("weights has NaN at datum 0"))
        fb = await h.ok("forward_backward", fb_body(mid, 1))
        assert await h.result(fb["request_id"]) == {
            "error": "weights has NaN at datum 0",
            "category": "user",
        }
        h.engine.fail_next("optim_step", RuntimeError("boom"))
        opt = await h.ok("optim_step", {"model_id": mid, "seq_id": 2})
        res = await h.result(opt["request_id"])
        assert res["category"] == "server" and "boom" in res["error"]
        ok = await h.ok("forward_backward", fb_body(mid, 3))
        assert "metrics" in await h.result(ok["request_id"])
        # sampling: a per-request engine error and a batch-wide crash
        ss = await h.ok(
            "create_sampling_session",
            {"session_id": sid, "sampling_session_seq_id": 0, "base_model": FAKE_MODEL_NAME},
        )
        h.engine.reject_next_sample("prompt rejected by the engine")
        bad = await h.ok(
            "asample",
            {
                "prompt": {"chunks": [{"tokens": [4]}]},
                "sampling_session_id": ss["sampling_session_id"],
            },
        )
        assert await h.result(bad["request_id"]) == {
            "error": "prompt rejected by the engine",
            "category": "user",
        }
        h.engine.fail_next("sample", RuntimeError("oom"))
        crash = await h.ok(
            "asample",
            {
                "prompt": {"chunks": [{"tokens": [4]}]},
                "sampling_session_id": ss["sampling_session_id"],
            },
        )
        assert (await h.result(crash["request_id"]))["category"] == "server"
        good = await h.ok(
            "asample",
            {
                "prompt": {"chunks": [{"tokens": [4]}]},
                "sampling_session_id": ss["sampling_session_id"],
            },
        )
        assert "sequences" in await h.result(good["request_id"])


async def test_unknown_request_id_404(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        r = await h.poll("req-nope")
        assert r.status_code == 404 and "req-nope" in r.json()["detail"]


async def test_bad_inputs_are_4xx_and_consume_seq(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        long = list(range(1, 2050))
        mismatched = fb_body(mid, 4)
        mismatched["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"] = {
            "data": [1.0, 1.0],
            "dtype": "float32",
            "shape": [2],
        }
        bad_loss = fb_body(mid, 6)
        bad_loss["forward_backward_input"]["loss_fn"] = "nope"
        cases = [
            ("forward_backward", b"{not json", 400, "invalid request body"),
            ("forward_backward", {"model_id": mid, "seq_id": 1}, 400, "forward_backward_input"),
            (
                "forward_backward",
                {
                    **fb_body(mid, 2),
                    "forward_backward_input": {
                        "data": [],
                        "loss_fn": "cross_entropy",
                        "loss_fn_config": "x",
                    },
                },
                400,
                "$.forward_backward_input.loss_fn_config",
            ),
            ("forward_backward", fb_body("sess:train:9", 1), 404, "unknown model_id"),
            ("forward_backward", fb_body(mid, 3, tokens=long), 400, "maximum context length"),
            ("forward_backward", mismatched, 400, "length 3"),
            ("forward_backward", fb_body(mid, 5, tokens=[-1, 2]), 400, "outside the vocabulary"),
            ("forward_backward", bad_loss, 400, "unknown loss_fn"),
            (
                "optim_step",
                {"model_id": mid, "seq_id": 7, "adam_params": {"beta1": 2}},
                400,
                "beta1",
            ),
            ("save_weights", {"model_id": mid, "seq_id": 8, "path": "../x"}, 400, "not a valid"),
            (
                "create_model",
                {"session_id": "nope", "model_seq_id": 0, "base_model": FAKE_MODEL_NAME},
                404,
                "unknown session_id",
            ),
            (
                "create_model",
                {"session_id": sid, "model_seq_id": 1, "base_model": "gpt-9"},
                400,
                "unknown base_model",
            ),
            (
                "create_model",
                {
                    "session_id": sid,
                    "model_seq_id": 1,
                    "base_model": FAKE_MODEL_NAME,
                    "lora_config": {
                        "rank": 4,
                        "train_attn": False,
                        "train_mlp": False,
                        "train_unembed": False,
                    },
                },
                400,
                "at least one",
            ),
            (
                "asample",
                {"prompt": {"chunks": [{"tokens": [1]}]}, "sampling_session_id": "x:sample:0"},
                404,
                "unknown sampling",
            ),
            (
                "asample",
                {
                    "prompt": {"chunks": [{"data": "aGk=", "format": "png"}]},
                    "base_model": FAKE_MODEL_NAME,
                },
                400,
                "text-only",
            ),
            (
                "asample",
                {
                    "prompt": {"chunks": [{"tokens": [1]}]},
                    "base_model": FAKE_MODEL_NAME,
                    "sampling_params": {"max_tokens": 5000},
                },
                400,
                "maximum context length",
            ),
            (
                "load_weights",
                {"session_id": sid, "model_seq_id": 5, "optimizer": False, "path": "tinker://a/b"},
                400,
                "tinker path",
            ),
            ("weights_info", {"tinker_path": f"tinker://{mid}/weights/none"}, 404, "no checkpoint"),
        ]
        for path, body, status, needle in cases:
            if isinstance(body, bytes):
                r = await h.post(path, content=body)
            else:
                r = await h.post(path, body)
            assert r.status_code == status, (path, body, r.text)
            detail = r.json()["detail"]
            assert needle in detail, (needle, detail)
            assert int(r.headers["content-length"]) > 0
        # Every rejected seq_id (1..8) was consumed: seq 9 runs without waiting.
        ok = await h.ok("forward_backward", fb_body(mid, 9))
        assert "metrics" in await h.result(ok["request_id"])
        r = await h.post("forward_backward", fb_body(mid, 9, tokens=[4]))
        assert r.status_code == 409
        r = await h.post("forward_backward", fb_body(mid, 2))
        assert r.status_code == 400 and "already used" in r.json()["detail"]
        r = await h.client.put("/api/v1/healthz")
        assert r.status_code == 405
        r = await h.get("no/such/thing")
        assert r.status_code == 404


async def test_lenient_bodies_0_15_style(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sess = await h.ok(
            "create_session",
            {"tags": [], "user_metadata": {}, "sdk_version": "0.15.0", "project_id": None},
        )
        sid = sess["session_id"]
        sub = await h.ok(
            "create_model",
            {
                "session_id": sid,
                "model_seq_id": 0,
                "base_model": FAKE_MODEL_NAME,
                "user_metadata": None,
                "lora_config": {"rank": 2, "seed": None},
            },
        )
        mid = (await h.result(sub["request_id"]))["model_id"]
        typed = fb_body(mid, 1)
        typed["forward_backward_input"]["data"][0]["model_input"]["chunks"][0]["type"] = (
            "encoded_text"
        )
        typed["type"] = "forward_backward"
        fb = await h.ok("forward_backward", typed)
        assert "metrics" in await h.result(fb["request_id"])
        opt = await h.ok(
            "optim_step", {"model_id": mid, "seq_id": 2, "adam_params": {"learning_rate": 0.01}}
        )
        assert (await h.result(opt["request_id"]))["metrics"]["learning_rate:mean"] == 0.01
        save = await h.ok(
            "save_weights",
            {
                "model_id": mid,
                "seq_id": 3,
                "path": "a",
                "ttl_seconds": None,
                "type": "save_weights",
            },
        )
        await h.result(save["request_id"])
        ss = await h.ok(
            "create_sampling_session",
            {
                "session_id": sid,
                "sampling_session_seq_id": 0,
                "base_model": None,
                "model_path": f"tinker://{mid}/weights/a",
            },
        )
        smp = await h.ok(
            "asample",
            {
                "num_samples": 1,
                "prompt": {"chunks": [{"tokens": [3]}]},
                "sampling_params": {"seed": None, "stop": None},
                "sampling_session_id": ss["sampling_session_id"],
                "seq_id": 0,
                "prompt_logprobs": False,
                "topk_prompt_logprobs": 0,
            },
        )
        out = await h.result(smp["request_id"])
        assert out["prompt_logprobs"] is None and len(out["sequences"][0]["tokens"]) == 64
        r = await h.get(f"samplers/{ss['sampling_session_id']}")
        assert r.json()["base_model"] == FAKE_MODEL_NAME
        assert r.json()["model_path"] == f"tinker://{mid}/weights/a"


async def test_load_weights_both_modes(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid, rank=8)
        save = await h.ok("save_weights", {"model_id": mid, "seq_id": 1, "path": "p"})
        path = (await h.result(save["request_id"]))["path"]
        info = await h.ok("weights_info", {"tinker_path": path})
        assert info["base_model"] == FAKE_MODEL_NAME and info["lora_rank"] == 8
        load = await h.ok(
            "load_weights", {"session_id": sid, "model_seq_id": 1, "path": path, "optimizer": True}
        )
        res = await h.result(load["request_id"])
        assert res["model_id"] == f"{sid}:train:1"
        new = res["model_id"]
        fb = await h.ok("forward_backward", fb_body(new, 1))
        assert "metrics" in await h.result(fb["request_id"])
        legacy = await h.ok(
            "load_weights", {"model_id": mid, "seq_id": 2, "path": path, "optimizer": False}
        )
        assert (await h.result(legacy["request_id"]))["path"] == path
        assert ("load_state", new) in h.engine.calls and ("load_state", mid) in h.engine.calls
