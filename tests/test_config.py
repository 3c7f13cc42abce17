"""Config: precedence (arguments > environment > defaults), validation, secret masking."""

from __future__ import annotations

import dataclasses

import pytest

from tinkex_trio.config import DEFAULT_BASE_URL, Config
from tinkex_trio.errors import MissingAPIKeyError, TinkexError

KEY = "tml-abcdefghijklmnopqrstuvwxyz0123"


def test_defaults_without_environment() -> None:
    c = Config.from_env({})
    assert c.api_key is None
    assert c.base_url == DEFAULT_BASE_URL
    assert (c.timeout, c.connect_timeout, c.max_retries) == (60.0, 5.0, 10)
    assert c.tags == () and dict(c.user_metadata) == {} and c.telemetry is True
    assert c.wire_format == "json" and c.log_level is None


def test_environment_is_read() -> None:
    env = {
        "TINKER_API_KEY": KEY,
        "TINKER_BASE_URL": "http://127.0.0.1:8000/tinker/",
        "TINKER_PROJECT_ID": "proj-1",
        "TINKER_TAGS": "b, a,b,,c",
        "TINKER_TELEMETRY": "0",
        "TINKER_LOG": "DEBUG",
        "CLOUDFLARE_ACCESS_CLIENT_ID": "cf-id",
        "CLOUDFLARE_ACCESS_CLIENT_SECRET": "cf-secret",
    }
    c = Config.from_env(env)
    assert c.api_key == KEY
    assert c.base_url == "http://127.0.0.1:8000/tinker"  # trailing / stripped, prefix kept
    assert c.project_id == "proj-1"
    assert c.tags == ("b", "a", "c")  # deduplicated, first occurrence kept
    assert c.telemetry is False
    assert c.log_level == "debug"
    assert (c.cf_access_client_id, c.cf_access_client_secret) == ("cf-id", "cf-secret")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("TRUE", True), ("on", True), ("no", False), ("off", False)],
)
def test_telemetry_env_values(value: str, expected: bool) -> None:
    assert Config.from_env({"TINKER_TELEMETRY": value}).telemetry is expected


def test_arguments_beat_environment_and_none_means_not_given() -> None:
    env = {"TINKER_API_KEY": KEY, "TINKER_BASE_URL": "http://env:1"}
    c = Config.from_env(env, base_url="http://arg:2/", api_key=None, timeout=3)
    assert c.base_url == "http://arg:2"
    assert c.api_key == KEY
    assert c.timeout == 3.0


def test_empty_base_url_env_counts_as_unset() -> None:
    assert Config.from_env({"TINKER_BASE_URL": ""}).base_url == DEFAULT_BASE_URL


def test_resolve_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_PROJECT_ID", "from-os")
    assert Config.resolve().project_id == "from-os"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"base_url": "http://"}, "base_url"),
        ({"base_url": "http://h:99999"}, "port"),
        ({"base_url": "http://h/?q=1"}, "query"),
        ({"timeout": 0}, "timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"tags": "abc"}, "tags"),
        ({"log_level": "loud"}, "log_level"),
        ({"wire_format": "xml"}, "wire_format"),
        ({"api_key": "  "}, "api_key"),
        ({"api_key": "tml-a\nb"}, "api_key"),
        ({"extra_headers": {"X": "a\r\nb"}}, "extra_headers"),
        ({"user_metadata": {"n": 1}}, "user_metadata"),
    ],
)
def test_validation_names_the_setting(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Config(**kwargs)  # type: ignore[arg-type]


def test_unknown_override_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="api_kee"):
        Config.from_env({}, api_kee="x")


def test_is_frozen_and_replace_revalidates() -> None:
    c = Config(api_key=KEY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.timeout = 1.0  # type: ignore[misc]
    assert dataclasses.replace(c, base_url="http://x/").base_url == "http://x"
    with pytest.raises(ValueError):
        dataclasses.replace(c, timeout=0)
    with pytest.raises(TypeError):
        c.extra_headers["a"] = "b"  # type: ignore[index]


def test_api_key_is_masked_in_repr_and_str() -> None:
    c = Config(
        api_key=KEY,
        cf_access_client_secret="very-secret-cloudflare-value",
        extra_headers={"X-Secret": "hidden-header-value"},
    )
    for text in (repr(c), str(c), f"{c}"):
        assert KEY not in text and KEY[:-4] not in text
        assert "very-secret" not in text and "hidden-header-value" not in text
        assert "…0123" in text
    assert "'<set>'" in repr(Config(api_key="tml-short"))


def test_require_api_key() -> None:
    assert Config(api_key=KEY).require_api_key() == KEY
    with pytest.raises(MissingAPIKeyError) as info:
        Config().require_api_key()
    msg = str(info.value)
    assert "TINKER_API_KEY" in msg and "api_key=" in msg
    assert "tinkex-trio serve" in msg and "open_local_backend" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, TinkexError)
