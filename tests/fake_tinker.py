"""An in-memory Tinker server for client tests: just enough protocol, fully scriptable.

It answers the endpoints the clients use with instant, deterministic results, records every
request, and lets a test inject faults per path. One object serves two ways:

* `fake.mock_transport()`: an `httpx.MockTransport` (no I/O: safe under `autojump_clock`);
* `fake.fault_handler`: a handler for `tests/fault_server.py`, for real 127.0.0.1 sockets.

Faults: `fake.faults[path]` is a list of statuses (or None for "answer normally") consumed one
per request to that path; `fake.poll_try_again` makes each future answer `try_again` that many
times before its result.

`fake.telemetry_batches` holds the bodies of `telemetry` posts (`fake.telemetry_route = False`:
the route answers 404, as a server without it).

`fake.dynamic_config` (None: the route answers 404, as a server without it) is the body of
`client/dynamic_config`; `fake.cancelled` lists the request ids of `cancel_future` calls
(unknown ids answer 404, like the local backend).

JWT exchange (PROTOCOL.md 1.3): with `fake.jwt_lifetime` set, `auth/token` answers the raw key
with a fresh unsigned JWT (`exp`/`iat` from `time.time()`) and `client/config` says
`pjwt_auth_enabled: true`; every route then accepts the raw key or a token in
`fake.valid_jwts`. Any other `eyJ...` key gets 401 with `WWW-Authenticate: Bearer
error="invalid_token"` (clear `valid_jwts` to "expire" the issued tokens).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import time
from collections import defaultdict
from typing import Any

import httpx
from fault_server import RecordedRequest, Reply


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeTinker:
    def __init__(self, *, api_key: str = "tml-test-key") -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.faults: dict[str, list[int | None]] = defaultdict(list)
        self.poll_try_again = 0
        self.client_config: dict[str, Any] = {}
        self.dynamic_config: dict[str, Any] | None = None
        self.cancelled: list[str] = []
        self.sample_request_ids: list[str] = []
        self.sample_sequence_ids = True
        self._ids = itertools.count()
        self._results: dict[str, tuple[int, Any]] = {}
        self._pending_polls: dict[str, int] = {}
        self.finished: dict[str, str] = {}
        self.heartbeats = 0
        self.submitted_seq_ids: dict[str, list[int]] = defaultdict(list)
        self.sample_seq_ids: list[int] = []
        self.jwt_lifetime: float | None = None
        self.issued_jwts: list[str] = []
        self.valid_jwts: set[str] = set()
        # `telemetry` batches received; with `telemetry_route` False the route answers 404.
        self.telemetry_route = True
        self.telemetry_batches: list[dict[str, Any]] = []

    # -- adapters ------------------------------------------------------------------------------

    def mock_transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            body = await request.aread()
            status, headers, content = self.handle(
                request.method, request.url.path, dict(request.headers), body
            )
            return httpx.Response(status, headers=headers, content=content)

        return httpx.MockTransport(handle)

    def fault_handler(self, request: RecordedRequest) -> Reply:
        status, headers, content = self.handle(
            request.method, request.path, request.headers, request.body
        )
        return Reply(status=status, headers=headers, body=content)

    # -- the server ----------------------------------------------------------------------------

    def _json(self, status: int, obj: Any) -> tuple[int, dict[str, str], bytes]:
        return status, {"content-type": "application/json"}, json.dumps(obj).encode()

    def _future(self, result: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        request_id = f"req-{next(self._ids)}"
        self._results[request_id] = (status, result)
        self._pending_polls[request_id] = self.poll_try_again
        return self._json(200, {"request_id": request_id})

    def handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        body = json.loads(raw) if raw else None
        lowered = {k.lower(): v for k, v in headers.items()}
        self.requests.append(Recorded(method, path, lowered, body))
        key = lowered.get("x-api-key")
        if key in self.valid_jwts and path.endswith("/auth/token"):
            return self._json(401, {"detail": "exchange needs the raw key"})
        if key != self.api_key and key not in self.valid_jwts:
            if key is not None and key.startswith("eyJ"):
                status, hdrs, content = self._json(401, {"detail": "token expired"})
                hdrs["www-authenticate"] = 'Bearer error="invalid_token"'
                return status, hdrs, content
            return self._json(401, {"detail": "bad key"})
        queue = self.faults.get(path)
        if queue:
            fault = queue.pop(0)
            if fault is not None:
                return self._json(fault, {"detail": f"injected {fault}"})
        route = path.removeprefix("/api/v1/")
        if route == "client/config":
            flags = dict(self.client_config)
            if self.jwt_lifetime is not None:
                flags.setdefault("pjwt_auth_enabled", True)
            return self._json(200, flags)
        if route == "auth/token" and self.jwt_lifetime is not None:
            return self._json(200, {"jwt": self.issue_jwt()})
        if route == "client/dynamic_config" and self.dynamic_config is not None:
            return self._json(200, self.dynamic_config)
        if route == "telemetry" and self.telemetry_route:
            self.telemetry_batches.append(body)
            return self._json(200, {"status": "accepted"})
        if route == "cancel_future":
            request_id = body["request_id"]
            if request_id not in self._results:
                return self._json(404, {"detail": f"unknown request {request_id}"})
            self.cancelled.append(request_id)
            return self._json(200, {})
        if route == "create_session":
            return self._json(200, {"session_id": "sess-1"})
        if route == "session_heartbeat":
            self.heartbeats += 1
            if body["session_id"] in self.finished:
                return self._json(410, {"detail": "finished"})
            return self._json(200, {})
        if route.startswith("sessions/") and route.endswith("/finish"):
            self.finished[route.split("/")[1]] = body["reason"]["type"]
            return self._json(200, {})
        if route == "create_model":
            model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
            return self._future({"model_id": model_id, "type": "create_model"})
        if route == "get_info":
            return self._json(
                200,
                {
                    "model_id": body["model_id"],
                    "model_data": {"model_name": "fake/model", "arch": "llama"},
                    "is_lora": True,
                    "lora_rank": 8,
                },
            )
        if route in ("forward", "forward_backward"):
            self.submitted_seq_ids[body["model_id"]].append(body["seq_id"])
            key = "forward_input" if route == "forward" else "forward_backward_input"
            data = body[key]["data"]
            outputs = []
            loss = 0.0
            for datum in data:
                n = len(datum["loss_fn_inputs"]["target_tokens"]["data"])
                weights = datum["loss_fn_inputs"].get("weights", {"data": [1.0] * n})["data"]
                lps = [-0.5] * n
                loss += sum(-lp * w for lp, w in zip(lps, weights, strict=True))
                outputs.append({"logprobs": {"data": lps, "dtype": "float32", "shape": [n]}})
            return self._future(
                {
                    "loss_fn_output_type": "ArrayRecord",
                    "loss_fn_outputs": outputs,
                    "metrics": {"loss:sum": loss, "n:mean": float(len(data))},
                }
            )
        if route == "optim_step":
            self.submitted_seq_ids[body["model_id"]].append(body["seq_id"])
            return self._future({"metrics": {"lr:mean": body["adam_params"]["learning_rate"]}})
        if route == "save_weights":
            self.submitted_seq_ids[body["model_id"]].append(body["seq_id"])
            return self._future({"path": f"tinker://{body['model_id']}/weights/{body['path']}"})
        if route == "save_weights_external":
            self.submitted_seq_ids[body["model_id"]].append(body["seq_id"])
            return self._future(
                {
                    "path": f"tinker://{body['model_id']}/external_weights/{body['path']}",
                    "size_bytes": 1234,
                }
            )
        if route == "save_weights_for_sampler":
            self.submitted_seq_ids[body["model_id"]].append(body["seq_id"])
            if "path" in body:
                return self._future(
                    {"path": f"tinker://{body['model_id']}/sampler_weights/{body['path']}"}
                )
            return self._future(
                {"sampling_session_id": f"sess-1:sample:{body['sampling_session_seq_id']}"}
            )
        if route == "load_weights":
            return self._future({"path": body["path"], "type": "load_weights"})
        if route == "create_sampling_session":
            return self._json(
                200,
                {
                    "sampling_session_id": f"{body['session_id']}:sample:{body['sampling_session_seq_id']}"
                },
            )
        if route.startswith("samplers/"):
            return self._json(
                200, {"sampler_id": route.split("/", 1)[1], "base_model": "fake/model"}
            )
        if route == "asample":
            self.sample_seq_ids.append(body["seq_id"])
            n = body["num_samples"]
            prompt = [tok for c in body["prompt"]["chunks"] for tok in c["tokens"]]
            result = {
                "sequences": [
                    {"stop_reason": "length", "tokens": [prompt[-1] + i], "logprobs": [-1.0]}
                    for i in range(n)
                ],
                "type": "sample",
            }
            if body.get("prompt_logprobs"):
                result["prompt_logprobs"] = [None] + [-2.0] * (len(prompt) - 1)
            status, hdrs, content = self._future(result)
            self.sample_request_ids.append(json.loads(content)["request_id"])
            if self.sample_sequence_ids:
                reply = json.loads(content)
                reply["sample_sequence_ids"] = [f"seq-{i}" for i in range(n)]
                content = json.dumps(reply).encode()
            return status, hdrs, content
        if route == "retrieve_future":
            request_id = body["request_id"]
            if request_id not in self._results:
                return self._json(404, {"detail": f"unknown request {request_id}"})
            if self._pending_polls[request_id] > 0:
                self._pending_polls[request_id] -= 1
                return self._json(
                    200, {"type": "try_again", "request_id": request_id, "queue_state": "active"}
                )
            status, result = self._results[request_id]
            return self._json(status, result)
        if route == "get_server_capabilities":
            return self._json(200, {"supported_models": [{"model_name": "fake/model"}]})
        return self._json(404, {"detail": f"no route {path}"})

    def issue_jwt(self) -> str:
        def part(obj: Any) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        assert self.jwt_lifetime is not None
        iat = time.time()
        claims = {
            "sub": "user-1",
            "org_id": "org-1",
            "iat": iat,
            "exp": iat + self.jwt_lifetime,
            "n": len(self.issued_jwts),
        }
        token = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.sig"
        self.issued_jwts.append(token)
        self.valid_jwts.add(token)
        return token

    def paths(self) -> list[str]:
        return [r.path.removeprefix("/api/v1/") for r in self.requests]
