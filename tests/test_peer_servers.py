"""Our SDK against a server that answers like other Tinker-compatible servers (SkyRL tx 0.3.0,
hatchery-core 0.3.0): its own checkpoint path layout (`tinker://<run>/checkpoints/<name>`),
`null` in optional response fields (a checkpoint's `time`, `public`, a response's `type`), no
`client/config`, `client/dynamic_config` or `sessions/{id}/finish` endpoint.

Nothing is refused and nothing is logged at WARNING; the missing finish endpoint is logged
once per process, at debug. Real sockets (the scriptable fault server), so outcomes only,
under `trio.fail_after`.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from fault_server import RecordedRequest, Reply, open_fault_server

from tinkex_trio import Config, _optional_endpoints, open_service

RUN = "peer-1:train:0"
PEER_PATH = f"tinker://{RUN}/checkpoints/c1"
LIMIT = 30


class PeerServer:
    """Answers the calls of the test the way SkyRL tx / hatchery-core do."""

    def __init__(self) -> None:
        self.sessions = 0
        self.results: dict[str, Any] = {}

    def _future(self, request_id: str, result: dict[str, Any]) -> Reply:
        self.results[request_id] = result
        return Reply.json({"request_id": request_id, "model_id": None})

    def __call__(self, request: RecordedRequest) -> Reply:
        path = request.path.removeprefix("/api/v1/")
        if path == "create_session":
            self.sessions += 1
            return Reply.json(
                {
                    "session_id": f"peer-{self.sessions}",
                    "info_message": None,
                    "warning_message": None,
                    "error_message": None,
                    "type": None,
                }
            )
        if path == "session_heartbeat":
            return Reply.json({"type": None})
        if path == "create_model":
            return self._future(f"create-{self.sessions}", {"model_id": RUN, "type": None})
        if path == "get_info":
            asked = request.json()
            assert isinstance(asked, dict)
            return Reply.json(
                {
                    "model_id": asked["model_id"],
                    "model_data": {"arch": None, "model_name": "peer/model", "tokenizer_id": None},
                    "optimizer_config": None,
                    "is_lora": None,
                    "lora_rank": None,
                    "model_name": None,
                    "type": None,
                }
            )
        if path == "load_weights":
            body = request.json()
            assert isinstance(body, dict)
            return self._future(
                f"load-{len(self.results)}", {"path": body["path"], "model_id": None, "type": None}
            )
        if path == "retrieve_future":
            body = request.json()
            assert isinstance(body, dict)
            return Reply.json(self.results[body["request_id"]])
        if path == f"training_runs/{RUN}/checkpoints":
            return Reply.json(
                {
                    "checkpoints": [
                        {
                            "checkpoint_id": "checkpoints/c1",
                            "checkpoint_type": "training",
                            "time": None,
                            "tinker_path": PEER_PATH,
                            "size_bytes": None,
                            "public": None,
                            "user_metadata": None,
                            "expires_at": None,
                        }
                    ],
                    "cursor": None,
                }
            )
        # client/config, client/dynamic_config, sessions/{id}/finish: not there.
        return Reply.json({"detail": "Not Found"}, status=404)


async def test_our_sdk_accepts_what_peer_servers_answer(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_optional_endpoints, "_missing", set())
    caplog.set_level(logging.DEBUG, logger="tinkex_trio")
    peer = PeerServer()
    listings = []
    with trio.fail_after(LIMIT):
        async with open_fault_server(peer) as server:
            config = Config(api_key="tml-peer", base_url=server.base_url, telemetry=False)
            for _ in range(2):  # two sessions, two exits, in one process
                async with open_service(config) as service:
                    training = await service.create_lora_training_client("peer/model", rank=4)
                    loaded = await (await training.load_state(PEER_PATH))
                    assert loaded.path == PEER_PATH
                    await (await training.load_state_with_optimizer(PEER_PATH))
                    resumed = await service.create_training_client_from_state(PEER_PATH)
                    assert resumed.model_id == f"peer-{peer.sessions}:train:1"
                    rest = service.create_rest_client()
                    listings.append(await rest.list_checkpoints(training.model_id))
            load_bodies = [r.json() for r in server.requests_to("/api/v1/load_weights")]
            finishes = server.requests_to("/api/v1/sessions/*/finish")

    # The peer's own path layout went out as given, on every call that takes one.
    assert len(load_bodies) == 6
    assert all(isinstance(b, dict) and b["path"] == PEER_PATH for b in load_bodies)
    # Null optional fields decoded: `time` stays unknown, `public` takes its default.
    for listing in listings:
        [checkpoint] = listing.checkpoints
        assert checkpoint.time is None and checkpoint.public is False
        assert checkpoint.tinker_path == PEER_PATH and listing.cursor is None
    # Each exit tried to finish; the 404 is no warning, and is logged once per process.
    assert len(finishes) == 2
    sdk_records = [r for r in caplog.records if r.name.startswith("tinkex_trio")]
    assert [r for r in sdk_records if r.levelno >= logging.WARNING] == []
    for endpoint in ("sessions/{session_id}/finish", "client/config", "client/dynamic_config"):
        missing = [r for r in sdk_records if f"no {endpoint} endpoint" in r.getMessage()]
        assert len(missing) == 1 and missing[0].levelno == logging.DEBUG, endpoint


async def test_method_not_allowed_is_a_missing_endpoint_too(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that routes these paths for other methods only answers 405."""
    monkeypatch.setattr(_optional_endpoints, "_missing", set())
    caplog.set_level(logging.DEBUG, logger="tinkex_trio")
    peer = PeerServer()
    with trio.fail_after(LIMIT):
        async with open_fault_server(peer) as server:
            for path in (
                "/api/v1/client/config",
                "/api/v1/client/dynamic_config",
                "/api/v1/sessions/*/finish",
            ):
                server.always(
                    "POST", path, Reply.json({"detail": "Method Not Allowed"}, status=405)
                )
            config = Config(api_key="tml-peer", base_url=server.base_url, telemetry=False)
            async with open_service(config) as service:
                training = await service.create_lora_training_client("peer/model", rank=4)
                assert training.model_id == RUN
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert sum("(HTTP 405)" in r.getMessage() for r in caplog.records) == 3


async def test_a_real_finish_failure_still_warns(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only "no such endpoint" (404/405) is quiet: a server error at finish is a WARNING."""
    monkeypatch.setattr(_optional_endpoints, "_missing", set())
    peer = PeerServer()
    with trio.fail_after(LIMIT):
        async with open_fault_server(peer) as server:
            server.always("POST", "/api/v1/sessions/*/finish", Reply.json({}, status=400))
            config = Config(api_key="tml-peer", base_url=server.base_url, telemetry=False)
            async with open_service(config):
                pass
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not finish session peer-1" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "path",
    ["weights/x", "tinker://", "tinker:///", "tinker://run/check points/c1", "tinker://a\nb"],
)
async def test_malformed_paths_are_still_refused_before_sending(path: str) -> None:
    peer = PeerServer()
    with trio.fail_after(LIMIT):
        async with open_fault_server(peer) as server:
            config = Config(api_key="tml-peer", base_url=server.base_url, telemetry=False)
            async with open_service(config) as service:
                training = await service.create_lora_training_client("peer/model", rank=4)
                sent = len(server.requests)
                from tinkex_trio.errors import InvalidInputError

                with pytest.raises(InvalidInputError, match="path"):
                    await training.load_state(path)
                with pytest.raises(InvalidInputError, match="path"):
                    await service.create_training_client_from_state(path)
                with pytest.raises(InvalidInputError, match="model_path"):
                    await service.create_sampling_client(model_path=path)
                assert len(server.requests) == sent
