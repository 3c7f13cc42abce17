"""RestClient: exact requests, typed responses, pagination, input checks, archive retries.

Two kinds of tests (STYLE.md, DESIGN.md "Tests"):

* Over `httpx.MockTransport` with a scripted router: every method's exact method, path, query
  and body, and the retry schedules in virtual time (`autojump_clock`; no real I/O here).
* Over real sockets on 127.0.0.1 (the fault server, when the test helpers provide it): the
  same router served over HTTP, asserting outcomes under `trio.fail_after`, never timings.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from _router_server import serve

from tinkex_trio._policy import ARCHIVE_ATTEMPTS, ARCHIVE_RETRY_DELAY
from tinkex_trio._transport import Transport
from tinkex_trio.config import Config
from tinkex_trio.errors import (
    APIStatusError,
    ConflictError,
    InternalServerError,
    InvalidInputError,
    NotFoundError,
    RequestFailedError,
    TinkexError,
)
from tinkex_trio.rest import TRACE_EXPORT_POLL_INTERVAL, RestClient
from tinkex_trio.types import (
    Checkpoint,
    CheckpointsListResponse,
    CopyWeightsResponse,
    ExternalWeightsUrlsResponse,
    FailureReasonTrainingRun,
    GetSamplerResponse,
    GetSessionResponse,
    ListSessionsResponse,
    SearchOwnerAccessible,
    SearchOwnerUsers,
    SearchStatusActive,
    SearchStatusClientFinished,
    ServerCapabilities,
    SessionSearchCursor,
    SessionSearchRequest,
    SessionSearchResponse,
    SessionStatusClientFinished,
    SessionStatusFailed,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
    encode,
)

BASE = "http://api.test"
RUN = "sess-1:train:0"
PATH = f"tinker://{RUN}/weights/step-100"
SAMPLER_PATH = f"tinker://{RUN}/sampler_weights/s-1"
V1 = "/api/v1"


def checkpoint_json(name: str = "step-100", kind: str = "weights") -> dict[str, Any]:
    return {
        "checkpoint_id": f"{kind}/{name}",
        "checkpoint_type": "training" if kind == "weights" else "sampler",
        "time": "2026-01-05T10:20:00Z",
        "tinker_path": f"tinker://{RUN}/{kind}/{name}",
        "size_bytes": 167772160,
        "public": False,
        "expires_at": None,
    }


def run_json(run_id: str = RUN) -> dict[str, Any]:
    return {
        "training_run_id": run_id,
        "base_model": "Qwen/Qwen3-8B",
        "model_owner": "tml:user:42",
        "is_lora": True,
        "lora_rank": 16,
        "corrupted": False,
        "last_request_time": "2026-01-05T10:22:31Z",
        "last_checkpoint": checkpoint_json(),
        "last_sampler_checkpoint": None,
        "user_metadata": {"exp": "a"},
    }


Reply = httpx.Response | Callable[[httpx.Request], httpx.Response]


class Router:
    """Scripted server: (method, path) -> a list of replies, the last one repeating.

    Records every request with the trio time it arrived.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []
        self.times: list[float] = []

    def on(self, method: str, path: str, *replies: Reply) -> None:
        self.routes[(method, V1 + path)] = list(replies)

    def reply(self, request: httpx.Request, body: bytes) -> httpx.Response:
        replies = self.routes.get((request.method, request.url.path))
        if replies is None:
            return httpx.Response(404, json={"detail": f"no route {request.url.path}"})
        outcome = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(outcome, httpx.Response):
            return httpx.Response(
                outcome.status_code, headers=outcome.headers, content=outcome.content
            )
        return outcome(request)

    def handle(self, request: httpx.Request, body: bytes, now: float) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(body)
        self.times.append(now)
        return self.reply(request, body)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport handler."""
        body = await request.aread()
        return self.handle(request, body, trio.current_time())

    def serve(self, request: httpx.Request) -> httpx.Response:
        """The real server's handler (runs in a server thread, so no trio time)."""
        return self.handle(request, request.content, math.nan)

    def only(self) -> tuple[httpx.Request, bytes]:
        assert len(self.requests) == 1, [str(r.url) for r in self.requests]
        return self.requests[0], self.bodies[0]


def ok(payload: object) -> httpx.Response:
    return httpx.Response(200, json=payload)


def client(router: Router, **cfg: Any) -> RestClient:
    """A client talking to `router` in memory (for virtual-time tests)."""
    config = Config(api_key="tml-test", base_url=BASE, **cfg)
    return RestClient(Transport(config, transport=httpx.MockTransport(router)))


MakeClient = Callable[[Router], RestClient]


@pytest.fixture(params=["memory", "127.0.0.1"])
async def make_client(request: pytest.FixtureRequest) -> AsyncIterator[MakeClient]:
    """Clients for a Router, in memory or over real sockets (default H11 pool) on 127.0.0.1."""
    transports: list[Transport] = []
    with contextlib.ExitStack() as stack:

        def make(router: Router) -> RestClient:
            if request.param == "memory":
                rest = client(router)
            else:
                base = stack.enter_context(serve(router.serve))
                # Per-read timeouts bound every real-socket test.
                config = Config(api_key="tml-test", base_url=base, timeout=10, max_retries=1)
                rest = RestClient(Transport(config))
            transports.append(rest.transport)
            return rest

        yield make
        for transport in transports:
            await transport.aclose()


def query(request: httpx.Request) -> dict[str, str]:
    return dict(request.url.params)


# --- every method: exact request, typed response ---------------------------------------------


async def test_get_server_capabilities(make_client: MakeClient) -> None:
    router = Router()
    router.on("GET", "/get_server_capabilities", ok({"supported_models": [{"model_name": "m"}]}))
    caps = await make_client(router).get_server_capabilities()
    assert isinstance(caps, ServerCapabilities)
    assert caps.supported_models[0].model_name == "m"
    request, _ = router.only()
    assert request.url.path == f"{V1}/get_server_capabilities"


async def test_list_and_get_sessions(make_client: MakeClient) -> None:
    router = Router()
    router.on("GET", "/sessions", ok({"sessions": ["s1", "s2"]}))
    router.on(
        "GET",
        "/sessions/sess-1",
        ok({"training_run_ids": [RUN], "sampler_ids": [], "user_metadata": None}),
    )
    rest = make_client(router)
    sessions = await rest.list_sessions(limit=5, offset=10, access_scope="accessible")
    assert isinstance(sessions, ListSessionsResponse)
    assert sessions.sessions == ["s1", "s2"]
    assert query(router.requests[0]) == {"limit": "5", "offset": "10", "access_scope": "accessible"}
    session = await rest.get_session("sess-1")
    assert isinstance(session, GetSessionResponse)
    assert session.training_run_ids == [RUN]
    assert router.requests[1].url.path == f"{V1}/sessions/sess-1"
    assert query(router.requests[1]) == {"access_scope": "owned"}


async def test_list_training_runs_defaults_and_project(make_client: MakeClient) -> None:
    router = Router()
    router.on(
        "GET",
        "/training_runs",
        ok({"training_runs": [run_json()], "cursor": {"offset": 0, "limit": 20, "total_count": 1}}),
    )
    rest = make_client(router)
    runs = await rest.list_training_runs()
    assert isinstance(runs, TrainingRunsResponse)
    assert runs.training_runs[0].last_checkpoint is not None
    assert runs.training_runs[0].last_checkpoint.size_bytes == 167772160
    assert query(router.requests[0]) == {"limit": "20", "offset": "0", "access_scope": "owned"}
    await rest.list_training_runs(limit=3, offset=6, project_id="proj-1")
    assert query(router.requests[1]) == {
        "limit": "3",
        "offset": "6",
        "access_scope": "owned",
        "project_id": "proj-1",
    }


async def test_get_training_run_by_id_and_path(make_client: MakeClient) -> None:
    router = Router()
    router.on("GET", f"/training_runs/{RUN}", ok(run_json()))
    rest = make_client(router)
    run = await rest.get_training_run(RUN, access_scope="accessible")
    assert isinstance(run, TrainingRun)
    assert run.lora_rank == 16
    by_path = await rest.get_training_run_by_tinker_path(SAMPLER_PATH)
    assert by_path == run
    for request in router.requests:
        assert request.url.raw_path.decode() == f"{V1}/training_runs/{RUN}?access_scope=" + (
            "accessible" if request is router.requests[0] else "owned"
        )


async def test_list_checkpoints_and_user_checkpoints(make_client: MakeClient) -> None:
    router = Router()
    router.on("GET", f"/training_runs/{RUN}/checkpoints", ok({"checkpoints": [checkpoint_json()]}))
    router.on(
        "GET",
        "/checkpoints",
        ok(
            {
                "checkpoints": [checkpoint_json("a"), checkpoint_json("b", "sampler_weights")],
                "cursor": {"offset": 4, "limit": 2, "total_count": 9},
            }
        ),
    )
    rest = make_client(router)
    per_run = await rest.list_checkpoints(RUN)
    assert isinstance(per_run, CheckpointsListResponse)
    assert per_run.cursor is None
    assert per_run.checkpoints[0].checkpoint_type == "training"
    assert query(router.requests[0]) == {}
    mine = await rest.list_user_checkpoints(limit=2, offset=4)
    assert [c.checkpoint_type for c in mine.checkpoints] == ["training", "sampler"]
    assert mine.cursor is not None and mine.cursor.total_count == 9
    assert query(router.requests[1]) == {"limit": "2", "offset": "4"}
    await rest.list_user_checkpoints()
    assert query(router.requests[2]) == {"limit": "100", "offset": "0"}


async def test_weights_info(make_client: MakeClient) -> None:
    router = Router()
    router.on(
        "POST",
        "/weights_info",
        ok({"base_model": "Qwen/Qwen3-8B", "is_lora": True, "lora_rank": 16, "train_mlp": True}),
    )
    info = await make_client(router).get_weights_info_by_tinker_path(PATH)
    assert isinstance(info, WeightsInfoResponse)
    assert (info.base_model, info.lora_rank, info.train_mlp) == ("Qwen/Qwen3-8B", 16, True)
    request, body = router.only()
    assert json.loads(body) == {"tinker_path": PATH}
    assert request.headers["content-type"] == "application/json"


CHECKPOINT_ROUTE = f"/training_runs/{RUN}/checkpoints/weights/step-100"


@pytest.mark.parametrize(
    ("call", "method", "suffix", "body"),
    [
        (lambda r: r.delete_checkpoint(RUN, "weights/step-100"), "DELETE", "", None),
        (lambda r: r.delete_checkpoint_by_tinker_path(PATH), "DELETE", "", None),
        (lambda r: r.delete_checkpoint_from_tinker_path(PATH), "DELETE", "", None),
        (lambda r: r.publish_checkpoint(RUN, "weights/step-100"), "POST", "/publish", None),
        (lambda r: r.publish_checkpoint_from_tinker_path(PATH), "POST", "/publish", None),
        (lambda r: r.unpublish_checkpoint(RUN, "weights/step-100"), "DELETE", "/publish", None),
        (lambda r: r.unpublish_checkpoint_from_tinker_path(PATH), "DELETE", "/publish", None),
        (
            lambda r: r.set_checkpoint_ttl(RUN, "weights/step-100", 86400),
            "PUT",
            "/ttl",
            {"ttl_seconds": 86400},
        ),
        (
            lambda r: r.set_checkpoint_ttl_from_tinker_path(PATH, None),
            "PUT",
            "/ttl",
            {"ttl_seconds": None},
        ),
    ],
)
async def test_checkpoint_mutations(
    make_client: MakeClient,
    call: Callable[[RestClient], Any],
    method: str,
    suffix: str,
    body: object,
) -> None:
    router = Router()
    router.on(method, CHECKPOINT_ROUTE + suffix, httpx.Response(200, json={}))
    assert await call(make_client(router)) is None
    request, sent = router.only()
    assert request.method == method
    assert request.url.raw_path.decode() == V1 + CHECKPOINT_ROUTE + suffix
    if body is None:
        assert sent == b""
    else:
        assert json.loads(sent) == body
    if method != "GET":
        assert request.headers["x-idempotency-key"]


async def test_get_sampler(make_client: MakeClient) -> None:
    router = Router()
    router.on(
        "GET",
        "/samplers/sess-1:sample:0",
        ok({"sampler_id": "sess-1:sample:0", "base_model": "m", "model_path": None}),
    )
    sampler = await make_client(router).get_sampler("sess-1:sample:0")
    assert isinstance(sampler, GetSamplerResponse)
    assert sampler.model_path is None
    assert router.only()[0].url.raw_path.decode() == f"{V1}/samplers/sess-1:sample:0"


EXTERNAL_PATH = f"tinker://{RUN}/external_weights/dl"
TOKEN = "wat-secret-123"


async def test_get_external_weights_urls(make_client: MakeClient) -> None:
    router = Router()
    route = f"/training_runs/{RUN}/checkpoints/external_weights/dl/external_weights_urls"
    router.on(
        "GET",
        route,
        ok(
            {
                "urls": {"adapter_config.json": "https://s.test/a?sig=1"},
                "expires": "2026-01-05T11:00:00Z",
            }
        ),
    )
    urls = await make_client(router).get_external_weights_urls(EXTERNAL_PATH)
    assert isinstance(urls, ExternalWeightsUrlsResponse)
    assert urls.urls == {"adapter_config.json": "https://s.test/a?sig=1"}
    assert urls.expires == datetime(2026, 1, 5, 11, tzinfo=UTC)
    assert router.only()[0].url.raw_path.decode() == V1 + route


async def test_copy_weights_token_only_in_header(make_client: MakeClient) -> None:
    router = Router()
    router.on("POST", "/copy_weights", ok({"tinker_path": "tinker://copy:train:0/weights/a"}))
    rest = make_client(router)
    copied = await rest.copy_weights(
        PATH, destination_project_id="proj-archive", ttl_seconds=3600, weights_access_token=TOKEN
    )
    assert isinstance(copied, CopyWeightsResponse)
    assert copied.tinker_path == "tinker://copy:train:0/weights/a"
    request, body = router.only()
    assert json.loads(body) == {
        "source_path": PATH,
        "destination_project_id": "proj-archive",
        "ttl_seconds": 3600,
    }
    assert TOKEN.encode() not in body
    assert request.headers["x-tinker-weights-access-token"] == TOKEN
    # A bare uuid4, not the `stainless-python-retry-` form (PROTOCOL.md 1.4).
    key = request.headers["x-idempotency-key"]
    assert len(key) == 36 and key.count("-") == 4
    assert TOKEN not in repr(rest)


async def test_copy_weights_defaults_and_one_key_across_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = Router()
    router.on(
        "POST",
        "/copy_weights",
        httpx.Response(500, json={"detail": "boom"}),
        httpx.Response(503, json={"detail": "boom"}),
        ok({"tinker_path": "tinker://c:train:0/weights/step-100"}),
    )
    rest = client(router, project_id="proj-default", max_retries=1)
    await rest.copy_weights(PATH)
    assert json.loads(router.bodies[0]) == {
        "source_path": PATH,
        "destination_project_id": "proj-default",
    }
    assert len(router.requests) == 3
    assert len({r.headers["x-idempotency-key"] for r in router.requests}) == 1
    assert all("x-tinker-weights-access-token" not in r.headers for r in router.requests)

    router = Router()
    router.on("POST", "/copy_weights", ok({"tinker_path": "tinker://c:train:0/weights/x"}))
    await client(router).copy_weights(PATH)
    assert json.loads(router.only()[1]) == {"source_path": PATH}


async def test_copy_weights_does_not_follow_redirects_with_the_token() -> None:
    router = Router()
    router.on(
        "POST",
        "/copy_weights",
        httpx.Response(307, headers={"Location": "https://elsewhere.test/steal"}),
    )
    with pytest.raises(APIStatusError):
        await client(router, max_retries=0).copy_weights(PATH, weights_access_token=TOKEN)
    assert [r.url.host for r in router.requests] == ["api.test"]


async def test_copy_weights_bad_token_is_not_echoed() -> None:
    router = Router()
    for bad in ("", "  ", "s3cr3t\nX", "s3cr3t\r"):
        with pytest.raises(InvalidInputError, match="weights_access_token") as info:
            await client(router).copy_weights(PATH, weights_access_token=bad)
        assert "s3cr3t" not in str(info.value)
    assert router.requests == []


async def test_assign_session_project(make_client: MakeClient) -> None:
    router = Router()
    router.on("PUT", "/sessions/sess-1/project", ok({}))
    assert await make_client(router).assign_session_project("sess-1", "proj-2") is None
    request, body = router.only()
    assert json.loads(body) == {"project_id": "proj-2"}
    assert request.headers["content-type"] == "application/json"


TRACE_ROUTE = "/sessions/sess-1/trace_export"


async def test_export_session_trace_polls_every_5_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = Router()
    router.on(
        "GET",
        TRACE_ROUTE,
        ok({"status": "pending"}),
        ok({"status": "pending", "url": None}),
        ok({"status": "ready", "url": "https://s.test/trace.json?sig=1"}),
    )
    ready = await client(router).export_session_trace("sess-1")
    assert (ready.status, ready.url) == ("ready", "https://s.test/trace.json?sig=1")
    assert router.times == [0.0, TRACE_EXPORT_POLL_INTERVAL, 2 * TRACE_EXPORT_POLL_INTERVAL]
    assert TRACE_EXPORT_POLL_INTERVAL == 5.0


async def test_export_session_trace_failed_and_ready_without_url(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = Router()
    router.on(
        "GET", TRACE_ROUTE, ok({"status": "pending"}), ok({"status": "failed", "error": "disk"})
    )
    with pytest.raises(RequestFailedError, match="disk"):
        await client(router).export_session_trace("sess-1")
    assert router.times == [0.0, 5.0]
    router = Router()
    router.on("GET", TRACE_ROUTE, ok({"status": "ready"}))
    with pytest.raises(TinkexError, match="no url"):
        await client(router).export_session_trace("sess-1")


def summary_json(i: int, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "session_id": f"sess-{i}",
        "created_at": f"2026-01-05T10:{59 - i:02d}:00Z",
        "owner": "tml:user:42",
        "project_id": None,
        "checkpoints_count": i,
        **({"status": status} if status is not None else {}),
    }


async def test_search_sessions_request_and_typed_statuses(make_client: MakeClient) -> None:
    router = Router()
    failed = {
        "type": "failed",
        "category": "user",
        "message": "bad batch",
        "reason": {"type": "training_run", "training_run_id": RUN},
    }
    finished = {"type": "client_finished", "reason": {"type": "errored"}, "detail": "x"}
    router.on(
        "POST",
        "/sessions/search",
        ok(
            {
                "sessions": [summary_json(0, failed), summary_json(1, finished), summary_json(2)],
                "next_cursor": {
                    "last_created_at": "2026-01-05T10:57:00Z",
                    "last_session_id": "sess-2",
                },
            }
        ),
    )
    request = SessionSearchRequest(
        project_ids=["proj-1"],
        user_metadata={"team": "rl"},
        display_name="nightly",
        owner=SearchOwnerAccessible(),
        statuses=[SearchStatusActive(), SearchStatusClientFinished(reasons=["errored"])],
        limit=3,
    )
    page = await make_client(router).search_sessions(request)
    assert isinstance(page, SessionSearchResponse)
    s0, s1, s2 = page.sessions
    assert isinstance(s0.status, SessionStatusFailed)
    assert s0.status.reason == FailureReasonTrainingRun(training_run_id=RUN)
    assert isinstance(s1.status, SessionStatusClientFinished)
    assert s1.status.reason.type == "errored"
    assert s2.status is None and s2.checkpoints_count == 2
    assert page.next_cursor == SessionSearchCursor(
        last_created_at=datetime(2026, 1, 5, 10, 57, tzinfo=UTC), last_session_id="sess-2"
    )
    _, body = router.only()
    assert json.loads(body) == {
        "project_ids": ["proj-1"],
        "user_metadata": {"team": "rl"},
        "display_name": "nightly",
        "owner": {"type": "accessible"},
        "statuses": [{"type": "active"}, {"type": "client_finished", "reasons": ["errored"]}],
        "limit": 3,
    }
    # Defaults are sent, unset filters omitted (PROTOCOL.md 7.9).
    assert json.loads(encode(SessionSearchRequest())) == {"owner": {"type": "own"}, "limit": 50}


async def test_iter_search_sessions_follows_next_cursor(make_client: MakeClient) -> None:
    everything = [summary_json(i) for i in range(5)]

    def reply(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        start = 0
        if "cursor" in sent:
            start = int(sent["cursor"]["last_session_id"].split("-")[1]) + 1
        page = everything[start : start + sent["limit"]]
        more = start + sent["limit"] < len(everything)
        cursor = (
            {"last_created_at": page[-1]["created_at"], "last_session_id": page[-1]["session_id"]}
            if more
            else None
        )
        return ok({"sessions": page, "next_cursor": cursor})

    router = Router()
    router.on("POST", "/sessions/search", reply)
    rest = make_client(router)
    seen = [s.session_id async for s in rest.iter_search_sessions(SessionSearchRequest(limit=2))]
    assert seen == [f"sess-{i}" for i in range(5)]
    cursors = [json.loads(b).get("cursor") for b in router.bodies]
    assert cursors == [
        None,
        {"last_created_at": "2026-01-05T10:58:00Z", "last_session_id": "sess-1"},
        {"last_created_at": "2026-01-05T10:56:00Z", "last_session_id": "sess-3"},
    ]


def test_official_spellings_are_aliases() -> None:
    pairs = [
        ("delete_checkpoint_from_tinker_path", "delete_checkpoint_by_tinker_path"),
        (
            "get_checkpoint_archive_url_from_tinker_path",
            "get_checkpoint_archive_url_by_tinker_path",
        ),
        ("set_checkpoint_ttl_by_tinker_path", "set_checkpoint_ttl_from_tinker_path"),
        ("publish_checkpoint_by_tinker_path", "publish_checkpoint_from_tinker_path"),
        ("unpublish_checkpoint_by_tinker_path", "unpublish_checkpoint_from_tinker_path"),
        ("get_training_run_from_tinker_path", "get_training_run_by_tinker_path"),
        ("get_weights_info_from_tinker_path", "get_weights_info_by_tinker_path"),
        ("get_external_weights_urls_by_tinker_path", "get_external_weights_urls"),
        ("get_external_weights_urls_from_tinker_path", "get_external_weights_urls"),
    ]
    for alias, name in pairs:
        assert getattr(RestClient, alias) is getattr(RestClient, name), alias


# --- pagination ------------------------------------------------------------------------------


def paged(items: list[dict[str, Any]], key: str, *, cursor: bool = True) -> Reply:
    def reply(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        limit = int(request.url.params["limit"])
        payload: dict[str, Any] = {key: items[offset : offset + limit]}
        if cursor:
            payload["cursor"] = {"offset": offset, "limit": limit, "total_count": len(items)}
        return ok(payload)

    return reply


async def test_iter_training_runs_walks_every_page(make_client: MakeClient) -> None:
    router = Router()
    runs = [run_json(f"sess-{i}:train:0") for i in range(5)]
    router.on("GET", "/training_runs", paged(runs, "training_runs"))
    seen = [
        run.training_run_id async for run in make_client(router).iter_training_runs(page_size=2)
    ]
    assert seen == [r["training_run_id"] for r in runs]
    assert [query(r)["offset"] for r in router.requests] == ["0", "2", "4"]
    assert {query(r)["limit"] for r in router.requests} == {"2"}


async def test_iter_user_checkpoints_with_and_without_cursor(make_client: MakeClient) -> None:
    checkpoints = [checkpoint_json(f"step-{i}") for i in range(7)]
    for cursor in (True, False):
        router = Router()
        router.on("GET", "/checkpoints", paged(checkpoints, "checkpoints", cursor=cursor))
        seen: list[Checkpoint] = [
            c async for c in make_client(router).iter_user_checkpoints(page_size=3)
        ]
        assert [c.checkpoint_id for c in seen] == [c["checkpoint_id"] for c in checkpoints]
        assert [query(r)["offset"] for r in router.requests] == ["0", "3", "6"]


async def test_iter_sessions_stops_on_short_page(make_client: MakeClient) -> None:
    router = Router()
    sessions = [{"id": f"s{i}"} for i in range(4)]

    def reply(request: httpx.Request) -> httpx.Response:
        offset, limit = int(request.url.params["offset"]), int(request.url.params["limit"])
        return ok({"sessions": [s["id"] for s in sessions[offset : offset + limit]]})

    router.on("GET", "/sessions", reply)
    seen = [
        s async for s in make_client(router).iter_sessions(page_size=2, access_scope="accessible")
    ]
    assert seen == ["s0", "s1", "s2", "s3"]
    assert [query(r)["offset"] for r in router.requests] == ["0", "2", "4"]
    assert {query(r)["access_scope"] for r in router.requests} == {"accessible"}


async def test_iteration_ends_on_empty_page_despite_overstated_total(
    make_client: MakeClient,
) -> None:
    router = Router()
    router.on(
        "GET",
        "/training_runs",
        ok({"training_runs": [], "cursor": {"offset": 0, "limit": 20, "total_count": 99}}),
    )
    assert [r async for r in make_client(router).iter_training_runs()] == []
    assert len(router.requests) == 1


# --- input checks: nothing is sent -----------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda r: r.list_training_runs(limit=-1), "limit"),
        (lambda r: r.list_training_runs(limit=0), "limit"),
        (lambda r: r.list_training_runs(offset=-5), "offset"),
        (lambda r: r.list_training_runs(access_scope="mine"), "access_scope"),
        (lambda r: r.list_training_runs(project_id=""), "project_id"),
        (lambda r: r.list_user_checkpoints(limit=-1), "limit"),
        (lambda r: r.list_sessions(limit=True), "limit"),
        (lambda r: r.get_session(""), "session_id"),
        (lambda r: r.get_session("a/b"), "session_id"),
        (lambda r: r.get_training_run("x?y"), "training_run_id"),
        (lambda r: r.get_training_run_by_tinker_path("tinker://run/weights"), "tinker_path"),
        (lambda r: r.list_checkpoints(".."), "training_run_id"),
        (lambda r: r.get_sampler("a#b"), "sampler_id"),
        (lambda r: r.delete_checkpoint(RUN, "step-100"), "checkpoint_id"),
        (lambda r: r.delete_checkpoint(RUN, "bogus/step-100"), "checkpoint_id"),
        (lambda r: r.delete_checkpoint_by_tinker_path("https://x/weights/y"), "tinker_path"),
        (lambda r: r.publish_checkpoint_from_tinker_path("tinker://r/w/x"), "tinker_path"),
        (lambda r: r.unpublish_checkpoint("", "weights/x"), "training_run_id"),
        (lambda r: r.set_checkpoint_ttl_from_tinker_path(PATH, -1), "ttl_seconds"),
        (lambda r: r.set_checkpoint_ttl(RUN, "weights/x", 0), "ttl_seconds"),
        (lambda r: r.set_checkpoint_ttl(RUN, "weights/x", 2**62), "ttl_seconds must be an int"),
        (lambda r: r.get_weights_info_by_tinker_path("tinker://a/b/c/d"), "tinker_path"),
        (lambda r: r.get_checkpoint_archive_url(RUN, "weights/a/b"), "checkpoint_id"),
        (lambda r: r.get_checkpoint_archive_url_by_tinker_path("tinker:/x"), "tinker_path"),
        (
            lambda r: r.get_checkpoint_archive_url_by_tinker_path("tinker://r%2f/weights/x"),
            "tinker_path",
        ),
        (lambda r: r.get_external_weights_urls(PATH), "external_weights"),
        (lambda r: r.get_external_weights_urls("tinker://r/external_weights/a?b"), "tinker_path"),
        (lambda r: r.copy_weights("tinker://r/weights"), "tinker_path"),
        (lambda r: r.copy_weights(PATH, destination_project_id=""), "destination_project_id"),
        (lambda r: r.copy_weights(PATH, ttl_seconds=0), "ttl_seconds"),
        (lambda r: r.assign_session_project("a/b", "p"), "session_id"),
        (lambda r: r.assign_session_project("s", ""), "project_id"),
        (lambda r: r.export_session_trace(""), "session_id"),
        (lambda r: r.search_sessions(SessionSearchRequest(limit=0)), "limit"),
        (lambda r: r.search_sessions(SessionSearchRequest(limit=201)), "limit"),
        (
            lambda r: r.search_sessions(
                SessionSearchRequest(owner=SearchOwnerUsers(owner_urns=[]))
            ),
            "owner_urns",
        ),
        (
            lambda r: r.search_sessions(
                SessionSearchRequest(owner=SearchOwnerUsers(owner_urns=["u"] * 11))
            ),
            "owner_urns",
        ),
        (
            lambda r: r.search_sessions(
                SessionSearchRequest(statuses=[SearchStatusClientFinished(reasons=[])])
            ),
            "reasons",
        ),
        (lambda r: r.search_sessions({"limit": 5}), "SessionSearchRequest"),
    ],
)
async def test_bad_input_raises_before_sending(
    call: Callable[[RestClient], Any], argument: str
) -> None:
    router = Router()
    with pytest.raises(InvalidInputError, match=argument):
        await call(client(router))
    assert router.requests == []


async def test_iterators_check_page_size_before_sending() -> None:
    router = Router()
    rest = client(router)
    for iterator in (
        rest.iter_training_runs(page_size=0),
        rest.iter_user_checkpoints(page_size=-3),
        rest.iter_sessions(page_size=0),
        rest.iter_search_sessions(SessionSearchRequest(limit=0)),
    ):
        with pytest.raises(InvalidInputError, match=r"page_size|limit"):
            await iterator.__anext__()
    assert router.requests == []


# --- retries in virtual time (no real I/O) ---------------------------------------------------


async def test_rest_calls_use_layer_b(autojump_clock: trio.testing.MockClock) -> None:
    router = Router()
    router.on(
        "GET",
        f"/training_runs/{RUN}",
        httpx.Response(500, json={"detail": "boom"}),
        httpx.Response(500, json={"detail": "boom"}),
        ok(run_json()),
    )
    run = await client(router, max_retries=0).get_training_run(RUN)
    assert run.training_run_id == RUN
    assert router.times == [0.0, 1.0, 3.0]  # layer B sleeps min(2**k, 30)


async def test_rest_404_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    router = Router()
    with pytest.raises(NotFoundError):
        await client(router).get_session("missing")
    assert len(router.requests) == 1


ARCHIVE_ROUTE = f"/training_runs/{RUN}/checkpoints/weights/step-100/archive"
SIGNED = "https://storage.test/archive.tar?sig=abc"


async def test_archive_url_302(autojump_clock: trio.testing.MockClock) -> None:
    router = Router()
    router.on(
        "GET",
        ARCHIVE_ROUTE,
        httpx.Response(
            302, headers={"Location": SIGNED, "Expires": "Tue, 06 Jan 2026 09:30:00 GMT"}
        ),
    )
    result = await client(router).get_checkpoint_archive_url(RUN, "weights/step-100")
    assert result.url == SIGNED
    assert result.expires == datetime(2026, 1, 6, 9, 30, tzinfo=UTC)
    request, _ = router.only()
    assert request.url.raw_path.decode() == V1 + ARCHIVE_ROUTE
    assert request.headers["accept"] == "application/gzip"


async def test_archive_url_without_expires_defaults_to_15_minutes(
    make_client: MakeClient,
) -> None:
    router = Router()
    router.on("GET", ARCHIVE_ROUTE, httpx.Response(302, headers={"Location": SIGNED}))
    before = datetime.now(UTC)
    result = await make_client(router).get_checkpoint_archive_url_from_tinker_path(PATH)
    assert (
        before + timedelta(minutes=14) < result.expires < datetime.now(UTC) + timedelta(minutes=16)
    )


async def test_archive_503_waits_then_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    router = Router()
    router.on(
        "GET",
        ARCHIVE_ROUTE,
        httpx.Response(503),
        httpx.Response(503),
        httpx.Response(302, headers={"Location": SIGNED}),
    )
    result = await client(router, max_retries=0).get_checkpoint_archive_url_by_tinker_path(PATH)
    assert result.url == SIGNED
    assert router.times == [0.0, ARCHIVE_RETRY_DELAY, 2 * ARCHIVE_RETRY_DELAY]


async def test_archive_503_layer_a_then_archive_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Layer A retries each 503 twice (Retry-After: 1 s), then the archive loop waits 30 s.
    router = Router()
    busy = httpx.Response(503, headers={"Retry-After": "1"})
    router.on(
        "GET",
        ARCHIVE_ROUTE,
        busy,
        busy,
        busy,
        busy,
        httpx.Response(302, headers={"Location": SIGNED}),
    )
    result = await client(router, max_retries=2).get_checkpoint_archive_url(RUN, "weights/step-100")
    assert result.url == SIGNED
    assert router.times == [0.0, 1.0, 2.0, 32.0, 33.0]


async def test_archive_503_gives_up_after_all_rounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = Router()
    router.on("GET", ARCHIVE_ROUTE, httpx.Response(503, json={"detail": "building"}))
    with pytest.raises(InternalServerError) as info:
        await client(router, max_retries=0).get_checkpoint_archive_url(RUN, "weights/step-100")
    assert info.value.status_code == 503
    assert router.times == [i * ARCHIVE_RETRY_DELAY for i in range(ARCHIVE_ATTEMPTS)]


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (httpx.Response(302), 302),
        (httpx.Response(307, headers={"Location": SIGNED}), 307),
        (httpx.Response(200, json={"url": SIGNED}), 200),
        (httpx.Response(404, json={"detail": "no"}), 404),
    ],
)
async def test_archive_other_answers_raise(
    autojump_clock: trio.testing.MockClock, reply: httpx.Response, status: int
) -> None:
    router = Router()
    router.on("GET", ARCHIVE_ROUTE, reply)
    with pytest.raises(APIStatusError) as info:
        await client(router, max_retries=0).get_checkpoint_archive_url(RUN, "weights/step-100")
    assert info.value.status_code == status
    assert len(router.requests) == 1


async def test_archive_503_then_302_over_real_sockets() -> None:
    """The 503-then-302 sequence over 127.0.0.1; layer A absorbs the 503 (retry-after-ms)."""
    router = Router()
    router.on(
        "GET",
        ARCHIVE_ROUTE,
        httpx.Response(503, headers={"retry-after-ms": "20"}),
        httpx.Response(
            302, headers={"Location": SIGNED, "Expires": "Tue, 06 Jan 2026 09:30:00 GMT"}
        ),
    )
    with serve(router.serve) as base:
        transport = Transport(Config(api_key="tml-test", base_url=base, timeout=10, max_retries=2))
        try:
            with trio.fail_after(30):
                result = await RestClient(transport).get_checkpoint_archive_url_by_tinker_path(PATH)
        finally:
            await transport.aclose()
    assert (result.url, result.expires) == (SIGNED, datetime(2026, 1, 6, 9, 30, tzinfo=UTC))
    assert [r.url.raw_path.decode() for r in router.requests] == [V1 + ARCHIVE_ROUTE] * 2
    assert {r.headers["x-api-key"] for r in router.requests} == {"tml-test"}


async def test_fault_server_pages_and_mutations() -> None:
    """Pagination over two pages and a TTL update, recorded by the shared fault server."""
    fault_server = pytest.importorskip("fault_server")
    reply = fault_server.Reply
    async with fault_server.open_fault_server() as srv:
        srv.script(
            "GET",
            f"{V1}/training_runs",
            reply.json(
                {
                    "training_runs": [run_json("r-0"), run_json("r-1")],
                    "cursor": {"offset": 0, "limit": 2, "total_count": 3},
                }
            ),
            reply.json(
                {
                    "training_runs": [run_json("r-2")],
                    "cursor": {"offset": 2, "limit": 2, "total_count": 3},
                }
            ),
        )
        srv.always("PUT", f"{V1}{CHECKPOINT_ROUTE}/ttl", reply.json({}))
        transport = Transport(Config(api_key="tml-test", base_url=srv.base_url, max_retries=0))
        rest = RestClient(transport)
        try:
            with trio.fail_after(30):
                runs = [
                    r.training_run_id
                    async for r in rest.iter_training_runs(page_size=2, project_id="p")
                ]
                await rest.set_checkpoint_ttl_by_tinker_path(PATH, 3600)
        finally:
            await transport.aclose()
    assert runs == ["r-0", "r-1", "r-2"]
    listed, put = srv.requests[:2], srv.requests[2]
    assert [r.query for r in listed] == [
        "limit=2&offset=0&access_scope=owned&project_id=p",
        "limit=2&offset=2&access_scope=owned&project_id=p",
    ]
    assert (put.method, put.path) == ("PUT", f"{V1}{CHECKPOINT_ROUTE}/ttl")
    assert put.json() == {"ttl_seconds": 3600}
    assert put.headers["x-api-key"] == "tml-test"


async def test_publish_conflict_is_an_answer_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """409 "already public/private" is final, although 409 is retryable elsewhere (9.3)."""
    router = Router()
    path = f"/training_runs/{RUN}/checkpoints/weights/a/publish"
    router.on("POST", path, httpx.Response(409, json={"detail": "already public"}))
    router.on("DELETE", path, httpx.Response(503), httpx.Response(409, json={"detail": "private"}))
    rest = client(router)
    with pytest.raises(ConflictError, match="already public"):
        await rest.publish_checkpoint(RUN, "weights/a")
    assert len(router.requests) == 1 and trio.current_time() == 0
    with pytest.raises(ConflictError, match="private"):
        await rest.unpublish_checkpoint(RUN, "weights/a")
    # A 503 is still retried (layer B, 1 s), then the 409 ends it.
    assert len(router.requests) == 3 and trio.current_time() == 1
