"""Server-side custom losses over HTTP (PROTOCOL.md 3.2 `create_custom_loss`, 8.8, 9.8).

In-process (ASGI, FakeEngine running the real graph interpreter): the future, idempotent
resubmission, refusals as 400 `user` naming the node/key, JSON and protobuf forward_backward
with exact values. Real sockets (Hypercorn on 127.0.0.1, TorchEngine with the tiny model):
the custom negative log-likelihood trains exactly like the built-in cross_entropy, and [T, K]
logprobs come back through protobuf.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from custom_loss_graphs import neg_ll, topk_distill, upload_body
from server_testing import Harness, open_harness

from tinkex_trio import _protobuf, types as t
from tinkex_trio.local import open_local_backend
from tinkex_trio.local._custom_graph import MAX_LOSSES_PER_SESSION
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import TINY_NAME

NEG_LL_RANKS = {"logprobs": 1, "weights": 1}
LIMIT = 240


def datum(tokens: list[int], weights: list[float], **extra: Any) -> dict[str, Any]:
    n = len(tokens)
    inputs = {
        "target_tokens": {"data": [x + 1 for x in tokens], "dtype": "int64", "shape": [n]},
        "weights": {"data": weights, "dtype": "float32", "shape": [n]},
        **extra,
    }
    return {"model_input": {"chunks": [{"tokens": tokens}]}, "loss_fn_inputs": inputs}


def custom_fb(model_id: str, seq_id: int, loss_id: str, data: list[Any]) -> dict[str, Any]:
    return {
        "forward_backward_input": {
            "data": data,
            "loss_fn": "custom",
            "loss_fn_config_v2": {"loss_id": {"text": loss_id}},
        },
        "model_id": model_id,
        "seq_id": seq_id,
    }


async def upload(h: Harness, body: dict[str, Any]) -> tuple[str, str]:
    sub = await h.ok("create_custom_loss", body)
    result = await h.result(sub["request_id"])
    return sub["request_id"], result["loss_id"]


async def test_upload_then_forward_backward_json(tmp_path: Path, autojump_clock: Any) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        sub = await h.ok("create_custom_loss", upload_body(sid, neg_ll, NEG_LL_RANKS))
        assert await h.result(sub["request_id"]) == {
            "loss_id": f"{sid}:loss:0",
            "type": "create_custom_loss",
        }
        loss_id = f"{sid}:loss:0"
        data = [datum([1, 2, 3], [1.0, 0.0, 2.0]), datum([4, 5], [1.0, 1.0])]
        fb = await h.ok("forward_backward", custom_fb(mid, 1, loss_id, data))
        out = await h.result(fb["request_id"])
        # FakeEngine logprobs: -1 / (1 + i) at position i (no optim step yet).
        lp = [[-1.0, -0.5, -1 / 3], [-1.0, -0.5]]
        for output, expected_lp in zip(out["loss_fn_outputs"], lp, strict=True):
            assert output["logprobs"]["data"] == pytest.approx(expected_lp)
        expected = (1.0 + 2 / 3) + (1.0 + 0.5)
        assert out["metrics"] == pytest.approx(
            {
                "loss:sum": expected,
                "custom/neg_ll:sum": expected,
                "custom/tokens:mean": (3.0 + 2.0) / 2,  # mean over the request's 2 datums
            }
        )
        assert ("forward_backward_custom", mid) in h.engine.calls


async def test_protobuf_forward_backward_names_the_loss_in_config_v2(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        _, loss_id = await upload(h, upload_body(sid, neg_ll, NEG_LL_RANKS))
        datums = [
            t.Datum(
                model_input=t.ModelInput.from_ints([1, 2]),
                loss_fn_inputs={
                    "target_tokens": t.TensorData.from_list([2, 3], "int64"),
                    "weights": t.TensorData.from_list([2.0, 2.0], "float32"),
                },
            )
        ]
        body = _protobuf.encode_forward_backward_request(
            model_id=mid,
            seq_id=1,
            data=datums,
            loss_fn="custom",
            loss_fn_config={"loss_id": loss_id},
            forward_only=False,
        )
        r = await h.post(
            "forward_backward",
            content=body,
            headers={"Content-Type": _protobuf.PROTOBUF_CONTENT_TYPE},
        )
        assert r.status_code == 200, r.text
        out = await h.result(r.json()["request_id"])
        assert out["metrics"]["loss:sum"] == pytest.approx(2.0 * 1.5)
        # A text value for a built-in loss is still refused (and its seq_id consumed).
        bad = _protobuf.encode_forward_backward_request(
            model_id=mid,
            seq_id=2,
            data=datums,
            loss_fn="cross_entropy",
            loss_fn_config={"loss_id": loss_id},
            forward_only=False,
        )
        r = await h.post(
            "forward_backward", content=bad, headers={"Content-Type": "application/x-protobuf"}
        )
        assert r.status_code == 400 and "must be a number" in r.json()["detail"]


async def test_resubmission_is_idempotent_and_a_reused_seq_id_conflicts(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        body = upload_body(sid, neg_ll, NEG_LL_RANKS)
        first = await h.ok("create_custom_loss", body)
        again = await h.ok("create_custom_loss", body)
        assert again["request_id"] == first["request_id"]
        other = upload_body(sid, topk_distill, {"logprobs": 2, "teacher": 2})
        r = await h.post("create_custom_loss", other)
        assert r.status_code == 409 and "custom_loss_seq_id 0" in r.json()["detail"]
        _, second = await upload(h, {**other, "custom_loss_seq_id": 1})
        assert second == f"{sid}:loss:1"


async def test_refusals_are_400_user_errors_naming_the_problem(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)

        async def refused(path: str, body: dict[str, Any], *needles: str) -> None:
            r = await h.post(path, body)
            assert r.status_code == 400, (r.status_code, r.text)
            detail = r.json()
            assert detail["category"] == "user"
            for needle in needles:
                assert needle in detail["detail"], detail

        evil = upload_body(sid, neg_ll, NEG_LL_RANKS)
        evil["graph"]["nodes"][2] |= {"target": "builtins.eval"}
        await refused(
            "create_custom_loss",
            evil,
            "node 'mul'",
            "'builtins.eval'",
            "client_flags={'custom_loss_server_side': False}",  # how to run it anyway
        )
        bad_key = upload_body(sid, neg_ll, NEG_LL_RANKS)
        out = bad_key["graph"]["nodes"][-1]
        out["args"] = [{"tuple": [{"ref": "neg"}, {"dict": {"loss:sum": {"ref": "neg"}}}]}]
        await refused("create_custom_loss", bad_key, "'loss:sum'", "custom/<name>:sum")
        await refused(
            "create_custom_loss",
            {**upload_body(sid, neg_ll, NEG_LL_RANKS), "graph": {"format": 2, "nodes": []}},
            "format",
        )

        deep = upload_body(sid, neg_ll, NEG_LL_RANKS)
        deep["graph"]["nodes"][2]["args"] = [[]]
        raw = json.dumps(deep).replace("[[]]", "[" * 20_000 + "]" * 20_000)
        r = await h.post("create_custom_loss", content=raw.encode())
        assert r.status_code == 400 and "nested too deeply" in r.json()["detail"]

        _, loss_id = await upload(h, upload_body(sid, neg_ll, NEG_LL_RANKS))
        text_for_builtin = custom_fb(mid, 1, loss_id, [datum([1], [1.0])])
        text_for_builtin["forward_backward_input"]["loss_fn"] = "cross_entropy"
        await refused(
            "forward_backward", text_for_builtin, "loss_fn_config_v2['loss_id'] must be a number"
        )
        await refused(
            "forward_backward",
            custom_fb(mid, 2, f"{sid}:loss:9", [datum([1], [1.0])]),
            f"unknown custom loss_id '{sid}:loss:9'",
        )
        no_weights = datum([1, 2], [1.0, 1.0])
        del no_weights["loss_fn_inputs"]["weights"]
        await refused(
            "forward_backward",
            custom_fb(mid, 3, loss_id, [no_weights]),
            "data[0].loss_fn_inputs lacks 'weights'",
        )
        matrix = datum([1, 2], [1.0, 1.0])
        matrix["loss_fn_inputs"]["weights"] = {
            "data": [1.0] * 4,
            "dtype": "float32",
            "shape": [2, 2],
        }
        await refused(
            "forward_backward", custom_fb(mid, 4, loss_id, [matrix]), "declares it with rank 1"
        )
        no_id = custom_fb(mid, 5, loss_id, [datum([1], [1.0])])
        del no_id["forward_backward_input"]["loss_fn_config_v2"]
        await refused("forward_backward", no_id, "loss_fn_config_v2 {'loss_id'")

        # Provenance spans are checked as for the built-in losses.
        spanned = datum([1, 2], [1.0, 1.0])
        span = {"type": "sampled_tokens", "sequence_id": "nope", "offset": 0, "length": 2}
        spanned |= {"model_input_spans": [span], "loss_fn_input_spans": [span]}
        await refused(
            "forward_backward",
            custom_fb(mid, 6, loss_id, [spanned]),
            "data[0].model_input_spans[0]",
            "'nope'",
        )

        other_sid = await h.session()
        other_mid = await h.model(other_sid)
        await refused(
            "forward_backward",
            custom_fb(other_mid, 1, loss_id, [datum([1], [1.0])]),
            f"belongs to session '{sid}'",
        )
        # The refused seq ids were consumed: the next one runs (PROTOCOL.md 5.2).
        fb = await h.ok("forward_backward", custom_fb(mid, 7, loss_id, [datum([1], [3.0])]))
        assert (await h.result(fb["request_id"]))["metrics"]["loss:sum"] == pytest.approx(3.0)


async def test_a_session_stores_a_bounded_number_of_losses(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        for seq in range(MAX_LOSSES_PER_SESSION):
            await h.ok("create_custom_loss", upload_body(sid, neg_ll, NEG_LL_RANKS, seq_id=seq))
        r = await h.post(
            "create_custom_loss",
            upload_body(sid, neg_ll, NEG_LL_RANKS, seq_id=MAX_LOSSES_PER_SESSION),
        )
        assert r.status_code == 400
        assert f"already stores {MAX_LOSSES_PER_SESSION}" in r.json()["detail"]


async def test_a_failing_node_fails_the_future_as_a_user_error(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        mid = await h.model(sid)
        _, loss_id = await upload(h, upload_body(sid, neg_ll, NEG_LL_RANKS))
        short = datum([1, 2, 3], [1.0, 1.0, 1.0])
        # weights of another length than logprobs: rank 1 as declared, but mul cannot broadcast.
        short["loss_fn_inputs"]["weights"] = {"data": [1.0, 1.0], "dtype": "float32", "shape": [2]}
        fb = await h.ok("forward_backward", custom_fb(mid, 1, loss_id, [short]))
        result = await h.result(fb["request_id"])
        assert result["category"] == "user"
        assert "node 'mul'" in result["error"] and "operator.mul" in result["error"]


# ----------------------------------------------------------------------- real engine, sockets


async def _future(c: httpx.AsyncClient, response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    while True:
        r = await c.post("/api/v1/retrieve_future", json={"request_id": request_id})
        body = r.json()
        if body.get("type") != "try_again":
            assert "error" not in body, body
            return body


async def test_custom_neg_ll_trains_like_cross_entropy_on_the_tiny_model(tmp_path: Path) -> None:
    """Same seed, same data: the custom neg-ll and cross_entropy give the same loss, logprobs
    and gradient (checked through the weights after one optimizer step)."""
    data = [datum([1, 5, 9, 13], [0.0, 1.0, 1.0, 0.5]), datum([7, 3, 2], [1.0, 1.0, 1.0])]
    with trio.fail_after(LIMIT):
        engine = TorchEngine(models=[TINY_NAME])
        async with (
            open_local_backend(data_dir=tmp_path, engine=engine) as backend,
            httpx.AsyncClient(
                base_url=backend.base_url, headers={"X-API-Key": backend.api_key}, timeout=60
            ) as c,
        ):
            sid = (await c.post("/api/v1/create_session", json={"sdk_version": "t"})).json()[
                "session_id"
            ]
            models = []
            for seq in range(2):
                created = await _future(
                    c,
                    await c.post(
                        "/api/v1/create_model",
                        json={
                            "session_id": sid,
                            "model_seq_id": seq,
                            "base_model": TINY_NAME,
                            "lora_config": {"rank": 4, "seed": 0},
                        },
                    ),
                )
                models.append(created["model_id"])
            body = upload_body(sid, neg_ll, NEG_LL_RANKS)
            loss_id = (await _future(c, await c.post("/api/v1/create_custom_loss", json=body)))[
                "loss_id"
            ]
            builtin_fb = {
                "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"},
                "model_id": models[0],
                "seq_id": 1,
            }
            builtin = await _future(c, await c.post("/api/v1/forward_backward", json=builtin_fb))
            custom = await _future(
                c,
                await c.post(
                    "/api/v1/forward_backward", json=custom_fb(models[1], 1, loss_id, data)
                ),
            )
            step = {"adam_params": {"learning_rate": 0.05}}
            for mid in models:
                await _future(
                    c,
                    await c.post("/api/v1/optim_step", json={**step, "model_id": mid, "seq_id": 2}),
                )
            after = []
            for mid in models:
                fwd = {
                    "forward_input": {"data": data, "loss_fn": "cross_entropy"},
                    "model_id": mid,
                    "seq_id": 3,
                }
                after.append(await _future(c, await c.post("/api/v1/forward", json=fwd)))
    loss = builtin["metrics"]["loss:sum"]
    assert custom["metrics"]["loss:sum"] == pytest.approx(loss, rel=1e-5)
    assert custom["metrics"]["custom/neg_ll:sum"] == pytest.approx(loss, rel=1e-5)
    assert custom["metrics"]["custom/tokens:mean"] == pytest.approx((2.5 + 3.0) / 2)
    for a, b in zip(builtin["loss_fn_outputs"], custom["loss_fn_outputs"], strict=True):
        np.testing.assert_allclose(a["logprobs"]["data"], b["logprobs"]["data"], atol=1e-5)
    # The step moved the weights, and moved both models the same way.
    before = [o["logprobs"]["data"] for o in builtin["loss_fn_outputs"]]
    moved = [o["logprobs"]["data"] for o in after[0]["loss_fn_outputs"]]
    assert not np.allclose(np.concatenate(before), np.concatenate(moved), atol=1e-4)
    for a, b in zip(after[0]["loss_fn_outputs"], after[1]["loss_fn_outputs"], strict=True):
        np.testing.assert_allclose(a["logprobs"]["data"], b["logprobs"]["data"], atol=1e-5)


async def test_rank2_targets_over_protobuf_on_the_tiny_model(tmp_path: Path) -> None:
    """[T, K] target_tokens: logprobs [T, K] whose column k equals the rank-1 logprobs of
    the k-th candidates; datums with different K come back in order (several ArrayRecords)."""
    tokens = [[1, 5, 9], [7, 3]]
    candidates = [[[2, 40], [6, 41], [10, 42]], [[8, 50, 51], [4, 52, 53]]]
    datums = []
    for toks, cands in zip(tokens, candidates, strict=True):
        k = len(cands[0])
        datums.append(
            t.Datum(
                model_input=t.ModelInput.from_ints(toks),
                loss_fn_inputs={
                    "target_tokens": t.TensorData.from_numpy(np.array(cands, np.int64)),
                    "teacher": t.TensorData.from_numpy(np.full((len(toks), k), 1 / k, np.float32)),
                },
            )
        )
    with trio.fail_after(LIMIT):
        engine = TorchEngine(models=[TINY_NAME])
        async with (
            open_local_backend(data_dir=tmp_path, engine=engine) as backend,
            httpx.AsyncClient(
                base_url=backend.base_url, headers={"X-API-Key": backend.api_key}, timeout=60
            ) as c,
        ):
            sid = (await c.post("/api/v1/create_session", json={"sdk_version": "t"})).json()[
                "session_id"
            ]
            mid = (
                await _future(
                    c,
                    await c.post(
                        "/api/v1/create_model",
                        json={
                            "session_id": sid,
                            "model_seq_id": 0,
                            "base_model": TINY_NAME,
                            "lora_config": {"rank": 4, "seed": 0},
                        },
                    ),
                )
            )["model_id"]
            body = upload_body(sid, topk_distill, {"logprobs": 2, "teacher": 2})
            loss_id = (await _future(c, await c.post("/api/v1/create_custom_loss", json=body)))[
                "loss_id"
            ]
            proto = _protobuf.encode_forward_backward_request(
                model_id=mid,
                seq_id=1,
                data=datums,
                loss_fn="custom",
                loss_fn_config={"loss_id": loss_id},
                forward_only=True,
            )
            sub = await c.post(
                "/api/v1/forward_backward",
                content=proto,
                headers={"Content-Type": _protobuf.PROTOBUF_CONTENT_TYPE},
            )
            request_id = sub.json()["request_id"]
            while True:
                r = await c.post(
                    "/api/v1/retrieve_future",
                    json={"request_id": request_id},
                    headers={"Accept": "application/x-protobuf, application/json"},
                )
                if "protobuf" in r.headers.get("content-type", ""):
                    break
                assert r.json().get("type") == "try_again", r.text
            out = _protobuf.decode_forward_backward_output(r.content)
            single = []
            for toks, cands in zip(tokens, candidates, strict=True):
                column = [row[1] for row in cands]
                fwd = {
                    "forward_input": {
                        "data": [datum(toks, [1.0] * len(toks))],
                        "loss_fn": "cross_entropy",
                    },
                    "model_id": mid,
                    "seq_id": 2 + len(single),
                }
                fwd["forward_input"]["data"][0]["loss_fn_inputs"]["target_tokens"]["data"] = column
                single.append(await _future(c, await c.post("/api/v1/forward", json=fwd)))
    shapes = [o["logprobs"].resolved_shape() for o in out.loss_fn_outputs]
    assert shapes == [[3, 2], [2, 3]]
    for o, s in zip(out.loss_fn_outputs, single, strict=True):
        grid = o["logprobs"].to_numpy()
        np.testing.assert_allclose(
            grid[:, 1], s["loss_fn_outputs"][0]["logprobs"]["data"], atol=1e-5
        )
    assert np.isfinite(out.metrics["custom/distill:sum"])
    assert out.metrics["loss:sum"] == pytest.approx(out.metrics["custom/distill:sum"], rel=1e-6)
