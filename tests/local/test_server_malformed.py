"""Malformed requests against every route of the local backend (issue 11, "every input bounded").

A generated table: for every route, a valid request (real ids of a real session, model,
checkpoint and sampler), then the same request with each of its fields, one at a time,
replaced by each value of `BAD_VALUES` (out-of-range integers, huge strings, wrong types,
nulls, containers), plus whole-body garbage (not JSON, nested 100,000 deep, wrong content
types, a 200 MB body) and path and query garbage for the GET routes. Every answer must be
below 500, no request may hang, and a normal request must work after each case. Then every
future the sweep managed to create must finish within the seq-gap timeout: none waits forever.

In-process (httpx.ASGITransport, FakeEngine inline), so `autojump_clock` is safe and "no hang"
is checked exactly in virtual time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from custom_loss_graphs import neg_ll, upload_body
from server_testing import POLL, Harness, datum, open_harness

from tinkex_trio.local._routes_futures import MAX_RETRIEVE_FUTURES_TIMEOUT
from tinkex_trio.local.testing import FAKE_MODEL_NAME
from tinkex_trio.types._bounds import MAX_TTL_SECONDS

GAP_TIMEOUT = 60.0
#: No single request may take longer than this (virtual seconds): the longest long poll is
#: `retrieve_futures` with a large `timeout`, capped by the server.
REQUEST_DEADLINE = max(POLL, MAX_RETRIEVE_FUTURES_TIMEOUT) + 1.0

# Values that must never produce a 5xx wherever they appear. Strings starting with "RAW:" are
# spliced into the JSON text unquoted (numbers JSON allows but Python's json would not write).
BAD_VALUES: list[Any] = [
    2**31,
    2**62,
    2**63,
    2**70,
    -1,
    -(2**70),
    0,
    1.5,
    1e308,
    -1e308,
    "RAW:1e999",
    "RAW:-1e999",
    "",
    "x" * 5000,
    "\u0000\ud7ff",
    None,
    True,
    [],
    {},
    [2**70, -1],
    {"x": 2**70},
]


def _encode(body: Any) -> bytes:
    text = json.dumps(body)
    for raw in ("1e999", "-1e999"):
        text = text.replace(json.dumps(f"RAW:{raw}"), raw)
    return text.encode()


def _replace(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(body, dict):
        return {k: (_replace(v, rest, value) if k == head else v) for k, v in body.items()}
    return [(_replace(v, rest, value) if i == head else v) for i, v in enumerate(body)]


def _paths(body: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every node of a JSON body but the root, containers included."""
    if isinstance(body, dict):
        items: list[tuple[Any, Any]] = list(body.items())
    elif isinstance(body, list):
        items = list(enumerate(body))
    else:
        return
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


@dataclass
class Case:
    method: str
    path: str
    content: bytes | None
    label: str
    headers: dict[str, str] | None = None


@dataclass
class World:
    """Real ids to put in valid requests."""

    session: str
    finish_session: str
    model: str
    unload_model: str
    checkpoint: str  # "weights/<name>" of `model`
    doomed_checkpoint: str  # deleted by a valid DELETE
    sampler: str
    request_id: str


async def _world(h: Harness) -> World:
    sid = await h.session()
    doomed_sid = await h.session()
    mid = await h.model(sid, 0)
    unload = await h.model(sid, 1)
    saved = []
    for seq, name in ((1, "keep"), (2, "doomed")):
        sub = await h.ok("save_weights", {"model_id": mid, "seq_id": seq, "path": name})
        saved.append((await h.result(sub["request_id"]))["path"])
    sampler = (
        await h.ok(
            "create_sampling_session",
            {"session_id": sid, "sampling_session_seq_id": 0, "base_model": FAKE_MODEL_NAME},
        )
    )["sampling_session_id"]
    return World(
        session=sid,
        finish_session=doomed_sid,
        model=mid,
        unload_model=unload,
        checkpoint="weights/keep",
        doomed_checkpoint="weights/doomed",
        sampler=sampler,
        request_id=sub["request_id"],
    )


def _post_templates(w: World) -> dict[str, Any]:
    fb_input = {
        "data": [datum([1, 2, 3])],
        "loss_fn": "cross_entropy",
        "loss_fn_config": {"x": 1.0},
    }
    ck = f"tinker://{w.model}/{w.checkpoint}"
    return {
        "client/config": {"sdk_version": "t"},
        "client/dynamic_config": {"sdk_version": "t"},
        "auth/token": {},
        "telemetry": {
            "events": [
                {
                    "event": "x",
                    "event_id": "e",
                    "event_session_index": 0,
                    "severity": "INFO",
                    "timestamp": "t",
                }
            ],
            "platform": "p",
            "sdk_version": "t",
            "session_id": w.session,
        },
        "create_session": {
            "tags": ["a"],
            "user_metadata": {"k": "v"},
            "sdk_version": "t",
            "project_id": "p",
            "display_name": "d",
        },
        "session_heartbeat": {"session_id": w.session},
        f"sessions/{w.finish_session}/finish": {"reason": {"type": "success"}, "detail": None},
        "create_model": {
            "session_id": w.session,
            "model_seq_id": 7,
            "base_model": FAKE_MODEL_NAME,
            "user_metadata": {"k": "v"},
            "lora_config": {"rank": 4, "seed": 1, "train_mlp": True},
            "optimizer_config": {"type": "adamw"},
        },
        "get_info": {"model_id": w.model},
        "forward": {"forward_input": fb_input, "model_id": w.model, "seq_id": 3},
        "forward_backward": {"forward_backward_input": fb_input, "model_id": w.model, "seq_id": 4},
        "optim_step": {
            "model_id": w.model,
            "seq_id": 5,
            "adam_params": {"learning_rate": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8},
        },
        "save_weights": {
            "model_id": w.model,
            "path": "n",
            "seq_id": 6,
            "ttl_seconds": 60,
            "overwrite": True,
            "user_metadata": {"k": "v"},
        },
        "save_weights_for_sampler": {
            "model_id": w.model,
            "path": "s",
            "seq_id": 7,
            "ttl_seconds": 60,
        },
        "save_weights_external": {"model_id": w.model, "path": "e", "seq_id": 8},
        "load_weights": {"path": ck, "optimizer": True, "model_id": w.model, "seq_id": 9},
        "unload_model": {"model_id": w.unload_model},
        "copy_weights": {"source_path": ck, "ttl_seconds": 60, "destination_project_id": "p"},
        "weights_info": {"tinker_path": ck},
        "create_sampling_session": {
            "session_id": w.session,
            "sampling_session_seq_id": 5,
            "base_model": FAKE_MODEL_NAME,
        },
        "asample": {
            "num_samples": 2,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {
                "max_tokens": 3,
                "seed": 1,
                "stop": [5],
                "temperature": 0.5,
                "top_k": 5,
                "top_p": 0.9,
            },
            "sampling_session_id": w.sampler,
            "seq_id": 1,
            "prompt_logprobs": True,
            "topk_prompt_logprobs": 2,
        },
        "retrieve_future": {"request_id": w.request_id, "allow_metadata_only": True},
        "retrieve_futures": {
            "target": {"sampling_session_id": w.sampler, "cloned_sampler_id": 0},
            "prev_cursor": 0,
            "retrieved_request_ids": [w.request_id],
            "timeout": 0.5,
        },
        "cancel_future": {"request_id": w.request_id},
        "create_custom_loss": upload_body(
            w.session, neg_ll, {"logprobs": 1, "weights": 1}, seq_id=3
        ),
        "sessions/search": {
            "project_ids": ["p"],
            "user_metadata": {"k": "v"},
            "display_name": "d",
            "owner": {"type": "user", "owner_urns": ["tml:user:local"]},
            "statuses": [{"type": "client_finished", "reasons": ["success"]}],
            "limit": 5,
            "cursor": {"last_created_at": "2026-01-01T00:00:00Z", "last_session_id": "s"},
        },
    }


def _put_templates(w: World) -> dict[str, Any]:
    return {
        f"sessions/{w.session}/project": {"project_id": "p"},
        f"training_runs/{w.model}/checkpoints/{w.checkpoint}/ttl": {"ttl_seconds": 3600},
    }


def _get_paths(w: World) -> list[str]:
    ck = f"training_runs/{w.model}/checkpoints/{w.checkpoint}"
    return [
        "healthz",
        "get_server_capabilities",
        "sessions",
        f"sessions/{w.session}",
        f"sessions/{w.session}/trace_export",
        "training_runs",
        f"training_runs/{w.model}",
        f"training_runs/{w.model}/checkpoints",
        "checkpoints",
        f"{ck}/archive",
        f"training_runs/{w.model}/checkpoints/external_weights/e/external_weights_urls",
        f"samplers/{w.sampler}",
        "audit",
        "billing/usage/events",
        "billing/usage/checkpoints/current",
    ]


BAD_BODIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"not json"),
    ("truncated", b'{"a": '),
    ("array", b"[]"),
    ("null", b"null"),
    ("number", b"1e999"),
    ("string", b'"x"'),
    ("nested arrays", b"[" * 100_000 + b"]" * 100_000),
    ("nested objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ("invalid utf-8", b'{"sdk_version": "\xff\xfe"}'),
    ("duplicate keys", b'{"a": 1, "a": 2}'),
]
BAD_SEGMENTS = ["x" * 5000, "%00", "..", "%2e%2e", "\u00e9", "a:b:c", "-1", str(2**70)]
BAD_QUERIES = [
    {"limit": str(2**70)},
    {"limit": "-1"},
    {"offset": "-1"},
    {"offset": str(2**70)},
    {"limit": "x"},
    {"limit": "1e3"},
    {"day": "2026-13-45"},
    {"event_type": "x" * 5000},
    {"project_id": ""},
    {"start_time": "1e999", "end_time": "-1"},
    {"start_time": "9999-12-31T23:00:00Z", "end_time": "0001-01-01T00:00:00Z"},
    {"start_time": "2026-01-01T00:30:00Z", "end_time": "2026-01-01T01:00:00+14:00"},
]


def _cases(w: World) -> list[Case]:
    cases: list[Case] = []
    bodies = [("POST", p, b) for p, b in _post_templates(w).items()]
    bodies += [("PUT", p, b) for p, b in _put_templates(w).items()]
    for method, path, template in bodies:
        cases.append(Case(method, path, _encode(template), f"{method} {path} valid"))
        for node in _paths(template):
            for value in BAD_VALUES:
                cases.append(
                    Case(
                        method,
                        path,
                        _encode(_replace(template, node, value)),
                        f"{method} {path} {node}={str(value)[:20]!r}",
                    )
                )
        for label, content in BAD_BODIES:
            cases.append(Case(method, path, content, f"{method} {path} body {label}"))
        cases.append(
            Case(
                method,
                path,
                b"\x00\x01garbage",
                f"{method} {path} protobuf garbage",
                {"content-type": "application/x-protobuf", "content-encoding": "zstd"},
            )
        )
    for path in _get_paths(w):
        cases.append(Case("GET", path, None, f"GET {path}"))
        for query in BAD_QUERIES:
            query_string = "&".join(f"{k}={v}" for k, v in query.items())
            cases.append(Case("GET", f"{path}?{query_string}", None, f"GET {path} {query}"))
        segments = path.split("/")
        for index in range(1, len(segments)):
            for bad in BAD_SEGMENTS:
                bent = "/".join([*segments[:index], bad, *segments[index + 1 :]])
                cases.append(Case("GET", bent, None, f"GET {bent[:80]}"))
    doomed = f"training_runs/{w.model}/checkpoints/{w.doomed_checkpoint}"
    for method in ("POST", "DELETE"):
        cases.append(Case(method, f"{doomed}/publish", b"", f"{method} publish"))
    cases.append(Case("DELETE", doomed, b"", "DELETE checkpoint"))
    signed = (
        "archives/" + "0" * 40 + ".tar.gz",
        "trace_exports/" + "0" * 32 + ".json",
        f"external_files/{w.model}/e/{'0' * 16}/adapter_config.json",
    )
    for name in signed:
        cases.append(Case("GET", f"/{name}?expires=1&signature=x", None, f"GET {name}"))
        cases.append(Case("GET", f"/{name}?expires={2**70}&signature=", None, f"GET {name} big"))
    return cases


def _url(path: str) -> str:
    return path if path.startswith("/") else f"/api/v1/{path}"


async def test_malformed_request_sweep(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path, seq_gap_timeout=GAP_TIMEOUT) as h:
        world = await _world(h)
        cases = _cases(world)
        assert len(cases) >= 1000, len(cases)
        print(f"malformed-request sweep: {len(cases)} cases")
        statuses: dict[int, int] = {}
        futures: list[str] = []
        for case in cases:
            with trio.fail_after(REQUEST_DEADLINE):
                r = await h.client.request(
                    case.method, _url(case.path), content=case.content, headers=case.headers
                )
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            # 503 with retry-after is the protocol's "not yet" (an archive being built, A.4.2).
            retry_later = r.status_code == 503 and "retry-after" in r.headers
            assert r.status_code < 500 or retry_later, (case.label, r.status_code, r.text[:300])
            if r.status_code >= 400:
                body = r.json()
                assert body["detail"], case.label
                assert len(r.content) < 20_000, (case.label, len(r.content))
            elif r.headers.get("content-type", "").startswith("application/json"):
                body = r.json()
                if isinstance(body, dict) and "request_id" in body and "type" not in body:
                    futures.append(body["request_id"])
            with trio.fail_after(REQUEST_DEADLINE):
                alive = await h.post("session_heartbeat", {"session_id": world.session})
            assert alive.status_code == 200, (case.label, alive.text)
        # A 200 MB body, with and without the key: refused (413 / 401), the server unharmed.
        huge = b"[" + b"1," * (100 * 1024 * 1024) + b"1]"
        for headers in (None, {"X-API-Key": "tml-wrong"}):
            r = await h.client.post("/api/v1/create_session", content=huge, headers=headers)
            assert r.status_code == (413 if headers is None else 401), r.text
        del huge
        assert (await h.post("session_heartbeat", {"session_id": world.session})).is_success
        # Every accepted request finishes: nothing waits forever for a seq_id gap.
        with trio.fail_after(GAP_TIMEOUT + 2 * POLL):
            for request_id in futures:
                await h.result(request_id)
        assert statuses.get(200, 0) > 50 and sum(statuses.values()) == len(cases)
        # The backend still trains and samples for real after all of it.
        fresh = await h.model(world.session, model_seq_id=99)
        sub = await h.ok(
            "forward_backward",
            {
                "forward_backward_input": {"data": [datum([1, 2])], "loss_fn": "cross_entropy"},
                "model_id": fresh,
                "seq_id": 1,
            },
        )
        assert "loss:sum" in (await h.result(sub["request_id"]))["metrics"]


async def test_sweep_covers_every_route(tmp_path: Path, autojump_clock: object) -> None:
    """A new route without malformed-request cases fails here, not in production."""
    async with open_harness(tmp_path) as h:
        world = await _world(h)
        covered = {(c.method, _url(c.path.split("?")[0])) for c in _cases(world)}
        for route in h.app.router._routes:
            assert any(
                method == route.method and route.pattern.fullmatch(path) for method, path in covered
            ), f"no sweep case for {route.method} {route.pattern.pattern}"


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("save_weights", {"path": "a", "seq_id": 1, "ttl_seconds": 2**62}, "ttl_seconds"),
        ("save_weights", {"path": "a", "seq_id": 1, "ttl_seconds": 0}, "ttl_seconds"),
        ("save_weights", {"path": "a", "seq_id": 2**70}, "seq_id"),
        ("save_weights", {"path": "a", "seq_id": 2**62 + 1}, "seq_id"),
        (
            "save_weights",
            {"path": "a", "seq_id": 1, "user_metadata": {"k": "v" * 5000}},
            "user_metadata",
        ),
        ("optim_step", {"seq_id": 1, "adam_params": {"learning_rate": -1.0}}, "learning_rate"),
        ("optim_step", {"seq_id": 1, "adam_params": {"beta1": 1.5}}, "beta1"),
    ],
)
async def test_bounded_fields_are_named_4xx_user_errors(
    tmp_path: Path, autojump_clock: object, route: str, body: dict[str, Any], field: str
) -> None:
    async with open_harness(tmp_path) as h:
        mid = await h.model(await h.session())
        r = await h.post(route, {"model_id": mid, **body})
        assert r.status_code == 400, r.text
        assert r.json()["category"] == "user"
        assert field in r.json()["detail"]


async def test_issue_cases(tmp_path: Path, autojump_clock: object) -> None:
    """The inputs of issue 11 that were stored or answered 5xx."""
    async with open_harness(tmp_path) as h:
        sid = await h.session()
        r = await h.post(
            "create_model",
            {"session_id": sid, "model_seq_id": 2**70, "base_model": FAKE_MODEL_NAME},
        )
        assert r.status_code == 400 and "model_seq_id" in r.json()["detail"]
        r = await h.post("create_session", {"sdk_version": "v" * 2000})
        assert r.status_code == 400 and "sdk_version" in r.json()["detail"]
        meta = {f"k{i}": "v" for i in range(65)}
        r = await h.post("create_session", {"sdk_version": "t", "user_metadata": meta})
        assert r.status_code == 400 and "user_metadata" in r.json()["detail"]
        mid = await h.model(sid)
        ck = f"training_runs/{mid}/checkpoints/weights/a"
        await h.result(
            (await h.ok("save_weights", {"model_id": mid, "seq_id": 1, "path": "a"}))["request_id"]
        )
        r = await h.client.put(f"/api/v1/{ck}/ttl", json={"ttl_seconds": 2**62})
        assert r.status_code == 400 and "ttl_seconds" in r.json()["detail"]
        r = await h.client.put(f"/api/v1/{ck}/ttl", json={"ttl_seconds": MAX_TTL_SECONDS})
        assert r.status_code == 200
        for listing in ("checkpoints", f"training_runs/{mid}/checkpoints"):
            assert (await h.get(listing)).status_code == 200
        r = await h.post(
            "asample",
            {
                "base_model": FAKE_MODEL_NAME,
                "num_samples": 1,
                "prompt": {"chunks": [{"tokens": [1]}]},
                "sampling_params": {"stop": [10**9]},
            },
        )
        assert r.status_code == 400 and "stop" in r.json()["detail"]


async def test_a_seq_gap_fails_after_the_timeout_naming_it(
    tmp_path: Path, autojump_clock: object
) -> None:
    """seq_id 2**62 - 1 waits for 1..2**62 - 2; after `seq_gap_timeout` it fails naming the gap,
    and the model carries on after it."""
    async with open_harness(tmp_path, seq_gap_timeout=GAP_TIMEOUT) as h:
        mid = await h.model(await h.session())
        start = trio.current_time()
        far = await h.ok("optim_step", {"model_id": mid, "seq_id": 2**62 - 1})
        near = await h.ok("optim_step", {"model_id": mid, "seq_id": 3})
        far_result = await h.result(far["request_id"])
        assert trio.current_time() - start == GAP_TIMEOUT
        near_result = await h.result(near["request_id"])
        for result, seq in ((far_result, 2**62 - 1), (near_result, 3)):
            assert result["category"] == "user"
            assert f"seq_id {seq} of" in result["error"]
            assert "missing seq_ids 1..2" in result["error"]
        assert h.engine.calls.count(("optim_step", mid)) == 0
        # The lane moved past the gap: the next seq_id runs at once.
        sub = await h.ok("optim_step", {"model_id": mid, "seq_id": 2**62})
        assert "metrics" in await h.result(sub["request_id"])


async def test_gap_wait_is_measured_from_the_first_stall(
    tmp_path: Path, autojump_clock: object
) -> None:
    """Later arrivals behind the same gap do not restart its clock; a filled gap runs all."""
    async with open_harness(tmp_path, seq_gap_timeout=GAP_TIMEOUT) as h:
        mid = await h.model(await h.session())
        t0 = trio.current_time()
        first = await h.ok("optim_step", {"model_id": mid, "seq_id": 3})
        await trio.sleep(GAP_TIMEOUT / 2)
        await h.ok("optim_step", {"model_id": mid, "seq_id": 4})
        r = await h.result(first["request_id"])
        assert "missing seq_ids 1..2" in r["error"]
        assert trio.current_time() - t0 < GAP_TIMEOUT + POLL
        # A gap that is filled in time runs everything in order.
        late = await h.ok("optim_step", {"model_id": mid, "seq_id": 6})
        await trio.sleep(GAP_TIMEOUT - 1)
        fill = await h.ok("optim_step", {"model_id": mid, "seq_id": 5})
        for sub in (fill, late):
            assert "metrics" in await h.result(sub["request_id"])
