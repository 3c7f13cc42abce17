"""The local backend's JWT-exchange mode (PROTOCOL.md 1.3, 3.1 `auth/token`).

In-process (httpx.ASGITransport, FakeEngine inline): no real I/O, so `autojump_clock` is safe.
Token expiry is driven by moving the issuer's wall clock (`app.jwt.clock`).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from server_testing import API_KEY, open_harness

from tinkex_trio import AdamParams, Datum, ModelInput, SamplingParams, open_service
from tinkex_trio.local.testing import FAKE_MODEL_NAME

BASE_URL = "http://testserver"


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    result: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return result


async def test_client_config_and_token_route(tmp_path: Path) -> None:
    async with open_harness(tmp_path, jwt_auth=True, jwt_lifetime=120.0) as h:
        assert (await h.ok("client/config", {"sdk_version": "x"}))["pjwt_auth_enabled"] is True
        token = (await h.ok("auth/token", {}))["jwt"]
        assert token.startswith("eyJ")
        claims = claims_of(token)
        assert {"sub", "org_id", "iat", "exp"} <= set(claims)
        assert claims["exp"] - claims["iat"] == 120.0
        # The JWT works in place of the key; so does the raw key.
        r = await h.client.get("/api/v1/get_server_capabilities", headers={"X-API-Key": token})
        assert r.status_code == 200
        assert (await h.get("get_server_capabilities")).status_code == 200


async def test_expired_or_forged_token_gets_invalid_token_401(tmp_path: Path) -> None:
    async with open_harness(tmp_path, jwt_auth=True, jwt_lifetime=60.0) as h:
        token = (await h.ok("auth/token", {}))["jwt"]
        assert h.app.jwt is not None
        start = h.app.jwt.clock()
        h.app.jwt.clock = lambda: start + 61.0
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        for bad in (token, forged):
            r = await h.client.get("/api/v1/get_server_capabilities", headers={"X-API-Key": bad})
            assert r.status_code == 401
            assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
            assert r.json()["detail"]
            assert bad not in r.text
        # A wrong raw key is a plain 401, without the invalid_token hint.
        r = await h.client.get("/api/v1/get_server_capabilities", headers={"X-API-Key": "tml-x"})
        assert r.status_code == 401
        assert "www-authenticate" not in r.headers


async def test_only_the_api_key_is_exchanged_for_a_token(tmp_path: Path) -> None:
    """A JWT cannot buy a new JWT: a leaked token dies with its expiry (issue 11, item 5)."""
    async with open_harness(tmp_path, jwt_auth=True, jwt_lifetime=60.0) as h:
        token = (await h.ok("auth/token", {}))["jwt"]
        r = await h.client.post("/api/v1/auth/token", json={}, headers={"X-API-Key": token})
        assert r.status_code == 401
        assert r.json()["category"] == "user"
        assert "API key only" in r.json()["detail"]
        assert token not in r.text
        # The token still works everywhere else, and the key still buys tokens.
        r = await h.client.get("/api/v1/get_server_capabilities", headers={"X-API-Key": token})
        assert r.status_code == 200
        assert (await h.ok("auth/token", {}))["jwt"].startswith("eyJ")


async def test_without_jwt_mode_the_token_route_is_404(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        assert (await h.ok("client/config", {"sdk_version": "x"}))["pjwt_auth_enabled"] is False
        assert (await h.post("auth/token", {})).status_code == 404


class KeyRecorder(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.seen: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.path, request.headers.get("x-api-key", "")))
        return await self.inner.handle_async_request(request)


async def test_sdk_trains_and_samples_through_token_expiry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The SDK against the backend in JWT mode; the server's tokens expire mid-run (in virtual
    time, by moving its clock), which the SDK answers with an exchange and a replay."""
    async with open_harness(tmp_path, jwt_auth=True, jwt_lifetime=3600.0) as h:
        rec = KeyRecorder(httpx.ASGITransport(app=h.app))
        async with open_service(
            base_url=BASE_URL, api_key=API_KEY, transport=rec, telemetry=False
        ) as service:
            training = await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
            datum = Datum(
                model_input=ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3, 4]},
            )
            await (await training.forward_backward([datum], "cross_entropy"))
            # Every token issued so far is now expired on the server.
            assert h.app.jwt is not None
            start = h.app.jwt.clock()
            h.app.jwt.clock = lambda: start + 3601.0
            await (await training.optim_step(AdamParams(learning_rate=1e-3)))
            sampler = await training.save_weights_and_get_sampling_client()
            result = await sampler.sample(
                ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=2)
            )
            assert len(result.sequences) == 1
    paths = [p.removeprefix("/api/v1/") for p, _ in rec.seen]
    assert paths.count("auth/token") == 2
    first = paths.index("auth/token")
    assert all(key == API_KEY for _, key in rec.seen[: first + 1])
    # After the first exchange only the exchanges themselves carry the raw key.
    for path, key in rec.seen[first + 1 :]:
        assert key == API_KEY if path.endswith("/auth/token") else key.startswith("eyJ"), path


async def test_whoami_reads_the_exchanged_jwt(tmp_path: Path) -> None:
    """PROTOCOL.md 3.7: whoami makes no request of its own beyond the exchange."""
    import pytest

    from tinkex_trio import InvalidInputError

    async with open_harness(tmp_path, jwt_auth=True, jwt_lifetime=3600.0) as h:
        async with open_service(
            base_url=BASE_URL,
            api_key=API_KEY,
            transport=httpx.ASGITransport(app=h.app),
            telemetry=False,
        ) as service:
            me = await service.create_rest_client().whoami()
            assert me.user_urn
            assert me.org_urn is not None and me.org_urn.startswith("tml:organization:")
    async with open_harness(tmp_path / "plain") as h:
        async with open_service(
            base_url=BASE_URL,
            api_key=API_KEY,
            transport=httpx.ASGITransport(app=h.app),
            telemetry=False,
        ) as service:
            with pytest.raises(InvalidInputError, match="JWT"):
                await service.create_rest_client().whoami()
