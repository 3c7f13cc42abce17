"""`LocalBackendSettings`: one frozen value from `tinkex-trio serve` or the keyword arguments to
the app, checked before anything starts; and no import cycle between the CLI and the server."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import httpx
import pytest
import trio

from tinkex_trio.local import LocalBackendOptions, LocalBackendSettings, open_local_backend
from tinkex_trio.local.server import _settings_from_argv
from tinkex_trio.local.testing import FakeEngine

LIMIT = 30


def test_the_keyword_form_names_every_setting() -> None:
    fields = {f.name for f in dataclasses.fields(LocalBackendSettings)}
    assert set(typing.get_type_hints(LocalBackendOptions)) == fields


def test_settings_are_normalised_and_frozen(tmp_path: Path) -> None:
    flags = {"fwdbwd_max_chunk_len": 2}
    settings = LocalBackendSettings(
        data_dir=str(tmp_path),  # type: ignore[arg-type]
        models=["a", "b"],  # type: ignore[arg-type]
        extra_models={"m": str(tmp_path)},  # type: ignore[dict-item]
        client_flags=flags,
    )
    assert settings.data_dir == tmp_path and settings.models == ("a", "b")
    assert settings.extra_models == {"m": tmp_path}
    flags["fwdbwd_max_chunk_len"] = 99  # the caller's dict is copied, not shared
    assert settings.client_flags == {"fwdbwd_max_chunk_len": 2}
    with pytest.raises(TypeError):
        settings.client_flags["proto_fwdbwd"] = True  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_client_config_is_built_from_the_settings() -> None:
    config = LocalBackendSettings(jwt_auth=True, client_flags={"proto_compress_fwdbwd": True})
    answer = config.client_config()
    assert answer.pjwt_auth_enabled is True and answer.proto_compress_fwdbwd is True
    assert answer.sample_use_retrieve_futures is True and answer.use_pyqwest_transport is False
    assert LocalBackendSettings().client_config().pjwt_auth_enabled is False
    # Server-side custom losses are served (PROTOCOL.md 8.8), unless a flag turns them off.
    assert answer.custom_loss_server_side is True
    off = LocalBackendSettings(client_flags={"custom_loss_server_side": False})
    assert off.client_config().custom_loss_server_side is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"client_flags": {"fwdbwd_max_chunk": 2}}, r"unknown flags \['fwdbwd_max_chunk'\]"),
        ({"client_flags": {"fwdbwd_max_chunk_len": "2"}}, r"client_flags: Expected `int`"),
        ({"max_queued_samples": 0}, "max_queued_samples must be >= 1"),
        ({"metadata_only_threshold": -1}, "metadata_only_threshold must be >= 0"),
        ({"jwt_lifetime": 0.0}, "jwt_lifetime must be positive"),
        ({"poll_timeout": -1.0}, "poll_timeout must be >= 0"),
        ({"port": 70000}, "port must be in 0..65535"),
        ({"dtype": "float16"}, r"dtype must be one of \['bfloat16', 'float32'\]"),
        ({"max_model_memory": 0}, "max_model_memory must be >= 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_option(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LocalBackendSettings(**options)  # type: ignore[arg-type]


def test_build_overrides_settings_with_keywords(tmp_path: Path) -> None:
    base = LocalBackendSettings(data_dir=tmp_path, max_queued_samples=5)
    assert LocalBackendSettings.build(base) is base
    built = LocalBackendSettings.build(base, max_queued_samples=None, jwt_auth=True)
    assert built.data_dir == tmp_path and built.max_queued_samples is None and built.jwt_auth
    with pytest.raises(TypeError, match="max_queued"):
        LocalBackendSettings.build(base, max_queued=3)


def test_serve_flags_become_settings(tmp_path: Path) -> None:
    settings = _settings_from_argv(
        [
            "--data-dir",
            str(tmp_path),
            "--port",
            "0",
            "--api-key",
            "tml-cli",
            "--model",
            f"mine={tmp_path}",
            "--max-queued-samples",
            "7",
            "--jwt",
            "--jwt-lifetime",
            "60",
            "--dtype",
            "bfloat16",
            "--max-model-memory",
            "8G",
        ]
    )
    assert settings == LocalBackendSettings(
        data_dir=tmp_path,
        port=0,
        api_key="tml-cli",
        extra_models={"mine": tmp_path},
        max_queued_samples=7,
        jwt_auth=True,
        jwt_lifetime=60.0,
        dtype="bfloat16",
        max_model_memory=8 << 30,
    )
    # Without --api-key the stored (or a new) key is resolved once, here.
    resolved = _settings_from_argv(["--data-dir", str(tmp_path)]).api_key
    assert resolved == (tmp_path / "api_key").read_text().strip()
    assert resolved is not None and resolved.startswith("tml-")


def test_serve_refuses_a_bad_flag_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _settings_from_argv(["--max-queued-samples", "0"])
    assert info.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


async def test_settings_reach_the_app_and_keywords_override_them(tmp_path: Path) -> None:
    settings = LocalBackendSettings(
        data_dir=tmp_path, api_key="tml-settings", client_flags={"fwdbwd_max_chunk_len": 3}
    )
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(settings, engine=FakeEngine(), jwt_auth=True) as backend,
            httpx.AsyncClient(
                base_url=backend.base_url, headers={"X-API-Key": backend.api_key}
            ) as client,
        ):
            assert backend.api_key == "tml-settings" and backend.data_dir == tmp_path
            r = await client.post("/api/v1/client/config", json={"sdk_version": "t"})
            assert r.json()["fwdbwd_max_chunk_len"] == 3
            assert r.json()["pjwt_auth_enabled"] is True


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [("tinkex_trio.local.server", "tinkex_trio.cli"), ("tinkex_trio.cli", "tinkex_trio.local")],
)
def test_cli_and_server_do_not_import_each_other(module: str, must_not_load: str) -> None:
    code = (
        f"import sys, {module}; "
        f"loaded = [m for m in sys.modules if m == {must_not_load!r} "
        f"or m.startswith({must_not_load + '.'!r})]; "
        "print(loaded); assert not loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
