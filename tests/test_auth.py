"""JWT-exchange authentication (PROTOCOL.md 1.3) in the SDK.

Rules: schedules run in virtual time (`autojump_clock`) over `httpx.MockTransport` (the shared
`FakeTinker` with `jwt_lifetime` set), with no real I/O. The fake's tokens carry `exp`/`iat`
from the wall clock, which barely moves during a test, so times are asserted to 10 ms. The
credential-command tests run a real subprocess and so do not use the virtual clock.
"""

from __future__ import annotations

import logging
import random

import httpx
import pytest
import trio
import trio.testing
from fake_tinker import FakeTinker

from tinkex_trio import Config, MissingAPIKeyError, open_service
from tinkex_trio._transport import Transport
from tinkex_trio.errors import AuthenticationError

LIFETIME = 1000.0


class FixedRandom(random.Random):
    """uniform() returns a fixed fraction of the way from a to b."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def jwt_fake(lifetime: float = LIFETIME) -> FakeTinker:
    fake = FakeTinker(api_key="tml-raw-credential-SECRET-0123456789")
    fake.jwt_lifetime = lifetime
    return fake


def transport_for(fake: FakeTinker, fraction: float = 0.5, **cfg: object) -> Transport:
    config = Config(api_key=fake.api_key, base_url="http://fake", **cfg)  # type: ignore[arg-type]
    t = Transport(config, transport=fake.mock_transport(), rng=FixedRandom(fraction))
    t.auth.enable_jwt()
    return t


def token_times(fake: FakeTinker, log: list[tuple[float, str]]) -> list[float]:
    return [when for when, path in log if path == "auth/token"]


def recording(fake: FakeTinker) -> tuple[httpx.MockTransport, list[tuple[float, str]]]:
    """The fake's transport, also recording (trio time, route) of every request."""
    inner = fake.mock_transport()
    log: list[tuple[float, str]] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        log.append((trio.current_time(), request.url.path.removeprefix("/api/v1/")))
        return await inner.handle_async_request(request)

    return httpx.MockTransport(handle), log


async def test_service_exchanges_once_and_sends_the_jwt_afterwards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = jwt_fake()
    config = Config(api_key=fake.api_key, base_url="http://fake", telemetry=False)
    async with open_service(config, transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model", rank=8)
        await training.save_state("a")
        await trio.sleep(30)  # a few heartbeats
    paths = fake.paths()
    assert paths[0] == "client/config"
    assert paths.count("auth/token") == 1
    assert len(fake.issued_jwts) == 1
    jwt = fake.issued_jwts[0]
    index = paths.index("auth/token")
    keys = [r.headers["x-api-key"] for r in fake.requests]
    assert keys[0] == fake.api_key  # client/config: the raw credential (1.3)
    assert keys[index] == fake.api_key  # the exchange itself
    assert all(k == jwt for k in keys[index + 1 :])
    assert "heartbeat" in " ".join(paths[index + 1 :])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
async def test_background_refresh_at_45_to_55_percent_of_lifetime(
    autojump_clock: trio.testing.MockClock, fraction: float
) -> None:
    fake = jwt_fake()
    mock, log = recording(fake)
    t = Transport(
        Config(api_key=fake.api_key, base_url="http://fake"),
        transport=mock,
        rng=FixedRandom(fraction),
    )
    t.auth.enable_jwt()
    delay = LIFETIME * (0.45 + 0.10 * fraction)
    async with trio.open_nursery() as nursery:
        await nursery.start(t.auth.refresh_forever)
        await t.request("POST", "/api/v1/create_session", content=b"{}")
        await trio.sleep(2 * delay + 1)
        nursery.cancel_scope.cancel()
    times = token_times(fake, log)
    assert times == pytest.approx([0.0, delay, 2 * delay], abs=0.01)
    # Every request after each exchange used the newest token; none needed a second exchange.
    assert len(fake.issued_jwts) == 3


async def test_service_runs_the_refresher(autojump_clock: trio.testing.MockClock) -> None:
    fake = jwt_fake()
    mock, log = recording(fake)
    config = Config(api_key=fake.api_key, base_url="http://fake", telemetry=False)
    async with open_service(config, transport=mock):
        await trio.sleep(600)
    times = token_times(fake, log)
    assert len(times) == 2
    assert 450.0 - 0.01 <= times[1] - times[0] <= 550.0 + 0.01


async def test_failed_background_refresh_is_retried_every_60_s(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = jwt_fake()
    mock, log = recording(fake)
    t = Transport(
        Config(api_key=fake.api_key, base_url="http://fake", max_retries=0),
        transport=mock,
        rng=FixedRandom(0.5),
    )
    t.auth.enable_jwt()
    async with trio.open_nursery() as nursery:
        await nursery.start(t.auth.refresh_forever)
        await t.request("GET", "/api/v1/get_server_capabilities")
        fake.faults["/api/v1/auth/token"] = [503, 503]
        await trio.sleep(500 + 120 + 1)
        nursery.cancel_scope.cancel()
    assert token_times(fake, log) == pytest.approx([0.0, 500.0, 560.0, 620.0], abs=0.01)
    assert sum("JWT refresh failed" in r.getMessage() for r in caplog.records) == 2


async def test_on_demand_refresh_when_60_s_or_less_are_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = jwt_fake(lifetime=100.0)
    mock, log = recording(fake)
    t = Transport(Config(api_key=fake.api_key, base_url="http://fake"), transport=mock)
    t.auth.enable_jwt()  # no background refresher: only on-demand refreshes happen
    await t.request("GET", "/api/v1/get_server_capabilities")
    await trio.sleep(39)
    await t.request("GET", "/api/v1/get_server_capabilities")  # 61 s left: kept
    assert len(token_times(fake, log)) == 1
    await trio.sleep(2)
    await t.request("GET", "/api/v1/get_server_capabilities")  # 59 s left: refreshed first
    assert token_times(fake, log) == pytest.approx([0.0, 41.0], abs=0.01)
    assert fake.requests[-1].headers["x-api-key"] == fake.issued_jwts[1]


async def test_concurrent_senders_share_one_exchange(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = jwt_fake()
    t = transport_for(fake)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(t.request, "GET", "/api/v1/get_server_capabilities")
    assert fake.paths().count("auth/token") == 1


async def test_invalid_token_401_triggers_one_exchange_and_one_replay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = jwt_fake()
    t = transport_for(fake)
    await t.request("GET", "/api/v1/get_server_capabilities")
    fake.valid_jwts.clear()  # the server no longer accepts the token (expired, revoked)
    resp = await t.request("GET", "/api/v1/get_server_capabilities")
    assert resp.status_code == 200
    assert fake.paths()[1:] == [
        "get_server_capabilities",
        "get_server_capabilities",  # 401 invalid_token
        "auth/token",
        "get_server_capabilities",  # the replay, with the new token
    ]
    assert fake.requests[-1].headers["x-api-key"] == fake.issued_jwts[1]


async def test_invalid_token_is_replayed_only_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = jwt_fake()
    real_issue = fake.issue_jwt

    def issue_unaccepted() -> str:
        token = real_issue()
        fake.valid_jwts.discard(token)
        return token

    fake.issue_jwt = issue_unaccepted  # type: ignore[method-assign]
    t = transport_for(fake)
    with pytest.raises(AuthenticationError) as info:
        await t.request("GET", "/api/v1/get_server_capabilities")
    assert info.value.status_code == 401
    assert fake.paths() == [
        "auth/token",
        "get_server_capabilities",
        "auth/token",
        "get_server_capabilities",
    ]


async def test_401_without_invalid_token_is_not_replayed() -> None:
    fake = jwt_fake()
    fake.faults["/api/v1/get_server_capabilities"] = [401]
    t = transport_for(fake)
    with pytest.raises(AuthenticationError):
        await t.request("GET", "/api/v1/get_server_capabilities")
    assert fake.paths() == ["auth/token", "get_server_capabilities"]


async def test_api_key_mode_sends_the_raw_key_and_never_exchanges(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    config = Config(api_key=fake.api_key, base_url="http://fake", telemetry=False)
    async with open_service(config, transport=fake.mock_transport()):
        await trio.sleep(15)
    assert "auth/token" not in fake.paths()
    assert {r.headers["x-api-key"] for r in fake.requests} == {fake.api_key}


async def test_secrets_never_appear_in_logs_reprs_or_errors(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = jwt_fake(lifetime=100.0)
    config = Config(
        api_key=fake.api_key, base_url="http://fake", telemetry=False, log_level="debug"
    )
    texts: list[str] = [repr(config), str(config)]
    async with open_service(config, transport=fake.mock_transport()) as service:
        await trio.sleep(120)  # two background refreshes, heartbeats
        transport = service._ctx.transport
        texts += [repr(service), repr(transport), repr(transport.auth)]
    # An error after a refused token and a refused exchange names neither secret.
    t = transport_for(fake)
    await t.request("GET", "/api/v1/get_server_capabilities")
    fake.valid_jwts.clear()
    fake.faults["/api/v1/auth/token"] = [401]
    with pytest.raises(AuthenticationError) as info:
        await t.request("GET", "/api/v1/get_server_capabilities")
    texts += [str(info.value), repr(info.value), repr(t.auth)]
    assert len(fake.issued_jwts) >= 2
    texts.append(caplog.text)
    for secret in (fake.api_key, *fake.issued_jwts):
        for text in texts:
            assert secret not in text
    assert "exchanged the credential" in caplog.text  # the auth logger did speak


async def test_whoami_claims_come_from_the_jwt(autojump_clock: trio.testing.MockClock) -> None:
    fake = jwt_fake()
    t = transport_for(fake)
    assert t.auth.claims() is None
    await t.request("GET", "/api/v1/get_server_capabilities")
    claims = t.auth.claims()
    assert claims is not None
    assert (claims["sub"], claims["org_id"]) == ("user-1", "org-1")


# -- TINKER_CREDENTIAL_CMD (real subprocesses: no virtual clock) ---------------------------------


async def test_credential_cmd_supplies_the_credential_in_jwt_mode() -> None:
    fake = jwt_fake()
    config = Config.from_env(
        {"TINKER_CREDENTIAL_CMD": f"echo '  {fake.api_key}  '"},
        base_url="http://fake",
        telemetry=False,
    )
    assert config.api_key is None
    assert fake.api_key not in repr(config)
    with trio.fail_after(10):
        async with open_service(config, transport=fake.mock_transport()):
            pass
    keys = [r.headers["x-api-key"] for r in fake.requests]
    assert keys[:2] == [fake.api_key, fake.api_key]  # client/config, auth/token
    assert set(keys[2:]) == {fake.issued_jwts[0]}


async def test_credential_cmd_is_used_when_the_server_asks_for_it() -> None:
    fake = jwt_fake()
    fake.client_config["credential_default_source"] = "credential_cmd"
    config = Config(
        api_key="tml-some-other-key",
        credential_cmd=f"printf {fake.api_key}",
        base_url="http://fake",
    )
    t = Transport(config, transport=fake.mock_transport())
    t.auth.enable_jwt("credential_cmd")
    with trio.fail_after(10):
        await t.request("GET", "/api/v1/get_server_capabilities")
    # The exchange used the command's output, not api_key (which the fake would refuse).
    assert fake.paths() == ["auth/token", "get_server_capabilities"]
    assert fake.requests[0].headers["x-api-key"] == fake.api_key


async def test_credential_cmd_alone_is_rejected_in_api_key_mode() -> None:
    fake = FakeTinker()
    config = Config(credential_cmd=f"echo {fake.api_key}", base_url="http://fake")
    with trio.fail_after(10), pytest.raises(MissingAPIKeyError):
        async with open_service(config, transport=fake.mock_transport()):
            pass
    assert fake.paths() == ["client/config"]


async def test_failing_credential_cmd_error_shows_no_output() -> None:
    fake = jwt_fake()
    config = Config(credential_cmd="echo tml-leaked-SECRET; exit 3", base_url="http://fake")
    t = Transport(config, transport=fake.mock_transport())
    with trio.fail_after(10), pytest.raises(Exception, match="status 3") as info:
        await t.request("GET", "/api/v1/get_server_capabilities")
    assert "SECRET" not in str(info.value)
