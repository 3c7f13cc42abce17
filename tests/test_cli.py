"""The `tinkex-trio` CLI against a real local backend (started with `tinkex-trio serve`).

The backend runs as a subprocess (`python -m tinkex_trio.cli serve --port 0`); the CLI runs
as a subprocess per command, so each call is exactly what a user types. The checkpoints the
commands work on are made in-process with the SDK (tiny random model).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

pytest.importorskip("torch")
pytest.importorskip("hypercorn")

import tinkex_trio
from tinkex_trio import _cli_args, cli

TINY = "tinkex-trio/SmolLM2-tiny-random"
SERVER_START_TIMEOUT = 120.0
COMMAND_TIMEOUT = 120.0


@dataclass
class Server:
    base_url: str
    api_key: str
    data_dir: Path
    run_id: str
    session_id: str
    training_path: str
    sampler_path: str
    spare_path: str  # a checkpoint the delete test may remove


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def _env(server: Server | None, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "CLOUDFLARE_ACCESS_"))
    }
    if server is not None:
        env["TINKER_BASE_URL"] = server.base_url
        env["TINKER_API_KEY"] = server.api_key
    env["TINKER_TELEMETRY"] = "0"
    env.update(extra)
    return env


def run_cli(server: Server | None, *argv: str, **env: str) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "tinkex_trio.cli", *argv],
        env=_env(server, **env),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if server is not None:
        # The key must never be printed, whatever the command did.
        assert server.api_key not in result.stdout + result.stderr
    return result


async def _make_checkpoints(base_url: str, api_key: str) -> tuple[str, str, str, str, str]:
    async with tinkex_trio.open_service(base_url=base_url, api_key=api_key) as service:
        training = await service.create_lora_training_client(TINY, rank=4)
        saved = await (await training.save_state("first"))
        spare = await (await training.save_state("spare"))
        sampler = await (await training.save_weights_for_sampler("for-sampling"))
        assert sampler.path is not None
        return training.model_id, service.session_id, saved.path, spare.path, sampler.path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("cli-backend")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tinkex_trio.cli",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
        ],
        env=_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        lines: list[str] = []
        base_url = api_key = None
        while time.monotonic() < deadline and (base_url is None or api_key is None):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"export TINKER_BASE_URL=(\S+)", line):
                base_url = m.group(1)
            if m := re.search(r"export TINKER_API_KEY=(\S+)", line):
                api_key = m.group(1)
        assert base_url and api_key, "serve did not start:\n" + "".join(lines)
        run_id, session_id, training_path, spare, sampler_path = trio.run(
            _make_checkpoints, base_url, api_key
        )
        yield Server(
            base_url=base_url,
            api_key=api_key,
            data_dir=data_dir,
            run_id=run_id,
            session_id=session_id,
            training_path=training_path,
            sampler_path=sampler_path,
            spare_path=spare,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- no server needed --------------------------------------------------------------------------


def test_version_table_and_json() -> None:
    r = run_cli(None, "version")
    assert r.code == 0 and r.stdout.strip() == f"tinkex-trio {tinkex_trio.__version__}"
    r = run_cli(None, "--format", "json", "version")
    assert r.code == 0 and r.json()["version"] == tinkex_trio.__version__


def test_missing_credentials_exit_2_with_help() -> None:
    r = run_cli(None, "checkpoint", "list")
    assert r.code == 2
    assert "TINKER_API_KEY" in r.stderr and "tinkex-trio serve" in r.stderr
    assert r.stdout == ""


def test_unreachable_server_exit_3_names_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nobody listens there
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    r = run_cli(None, "--base-url", url, "--api-key", "tml-secret-never-shown", "run", "list")
    assert r.code == 3, r.stderr
    assert url in r.stderr and "tinkex-trio serve" in r.stderr
    assert "tml-secret-never-shown" not in r.stdout + r.stderr
    assert time.monotonic() - started < 60  # fails fast, no minutes of retries


def test_bad_arguments_exit_2() -> None:
    assert run_cli(None, "no-such-command").code == 2
    assert run_cli(None, "checkpoint").code == 2
    r = run_cli(None, "--api-key", "k", "checkpoint", "set-ttl", "tinker://r/weights/x")
    assert r.code == 2 and "SECONDS or --remove" in r.stderr
    assert run_cli(None, "checkpoint", "set-ttl", "tinker://r/weights/x", "0").code == 2
    assert run_cli(None, "--format", "xml", "version").code == 2


def test_serve_without_local_extra_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("torch", "hypercorn") else real(name, *a),
    )
    assert cli.main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'tinkex-trio[local]'" in err and "torch" in err


# --- against the backend -----------------------------------------------------------------------


def test_checkpoint_list_table_and_json(server: Server) -> None:
    r = run_cli(server, "checkpoint", "list")
    assert r.code == 0, r.stderr
    assert server.training_path in r.stdout and server.sampler_path in r.stdout
    assert ":train:" in r.stdout  # rich must not turn ids into emoji

    r = run_cli(server, "checkpoint", "list", "--format", "json")
    paths = {c["tinker_path"]: c for c in r.json()["checkpoints"]}
    assert server.training_path in paths and server.sampler_path in paths
    assert paths[server.training_path]["checkpoint_type"] == "training"

    r = run_cli(server, "--format", "json", "checkpoint", "list", "--run", server.run_id)
    assert {c["tinker_path"] for c in r.json()["checkpoints"]} >= {
        server.training_path,
        server.sampler_path,
    }
    r = run_cli(server, "--format", "json", "checkpoint", "list", "--limit", "1")
    assert len(r.json()["checkpoints"]) == 1


def test_checkpoint_info(server: Server) -> None:
    r = run_cli(server, "--format", "json", "checkpoint", "info", server.training_path)
    assert r.code == 0, r.stderr
    info = r.json()
    assert info["training_run_id"] == server.run_id
    assert info["checkpoint_id"] == "weights/first"
    assert info["weights_info"]["base_model"] == TINY
    assert info["weights_info"]["lora_rank"] == 4
    r = run_cli(server, "checkpoint", "info", server.training_path)
    assert r.code == 0 and TINY in r.stdout and "weights/first" in r.stdout


def test_checkpoint_publish_unpublish_ttl(server: Server) -> None:
    path = server.training_path

    def record() -> dict[str, Any]:
        r = run_cli(server, "--format", "json", "checkpoint", "info", path)
        assert r.code == 0, r.stderr
        checkpoint: dict[str, Any] = r.json()["checkpoint"]
        return checkpoint

    r = run_cli(server, "checkpoint", "publish", path)
    assert r.code == 0 and "Published" in r.stdout
    assert record().get("public") is True
    r = run_cli(server, "--format", "json", "checkpoint", "unpublish", path)
    assert r.code == 0 and r.json() == {"tinker_path": path, "public": False}
    assert not record().get("public")

    r = run_cli(server, "checkpoint", "set-ttl", path, "3600")
    assert r.code == 0 and "3600" in r.stdout
    assert record().get("expires_at")
    r = run_cli(server, "--format", "json", "checkpoint", "set-ttl", path, "--remove")
    assert r.code == 0 and r.json()["ttl_seconds"] is None
    assert record().get("expires_at") is None


def test_checkpoint_download(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "dl"
    r = run_cli(
        server, "--format", "json", "checkpoint", "download", server.training_path,
        "--output-dir", str(out),
    )  # fmt: skip
    assert r.code == 0, r.stderr
    data = r.json()
    target = Path(data["path"])
    assert target.parent == out and target.is_dir()
    assert "adapter_model.safetensors" in data["files"]
    assert (target / "adapter_model.safetensors").is_file()
    assert data["bytes"] > 0

    again = run_cli(
        server, "checkpoint", "download", server.training_path, "--output-dir", str(out)
    )
    assert again.code == 1 and "--force" in again.stderr
    forced = run_cli(
        server, "checkpoint", "download", server.training_path, "--output-dir", str(out), "--force"
    )
    assert forced.code == 0 and "Downloaded" in forced.stdout

    capped = run_cli(
        server, "checkpoint", "download", server.training_path, "--output-dir",
        str(tmp_path / "capped"), "--max-members", "1",
    )  # fmt: skip
    assert capped.code == 1 and "max_members=1" in capped.stderr
    # The output directory is made before the download; nothing (not even a temp file) stays.
    assert list((tmp_path / "capped").iterdir()) == []
    capped = run_cli(
        server, "checkpoint", "download", server.training_path, "--output-dir",
        str(tmp_path / "capped"), "--max-bytes", "1K",
    )  # fmt: skip
    assert capped.code == 1 and "max_extracted_bytes=1024" in capped.stderr
    assert list((tmp_path / "capped").iterdir()) == []
    bad = run_cli(server, "checkpoint", "download", server.training_path, "--max-bytes", "lots")
    assert bad.code == 2 and "500M" in bad.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1", 1),
        ("1K", 1024),
        ("500M", 500 << 20),
        ("64G", 64 << 30),
        ("1.5GiB", 3 << 29),
        ("2tb", 2 << 40),
    ],
)
def test_byte_size_argument(text: str, size: int) -> None:
    assert _cli_args.byte_size(text) == size


def test_checkpoint_delete_then_404(server: Server) -> None:
    r = run_cli(server, "checkpoint", "delete", server.spare_path)
    assert r.code == 0 and "Deleted" in r.stdout
    r = run_cli(server, "checkpoint", "info", server.spare_path)
    assert r.code == 1
    assert "404" in r.stderr and "no checkpoint" in r.stderr
    r = run_cli(server, "checkpoint", "info", "tinker://not-a-path")
    assert r.code == 2 and "bad checkpoint path" in r.stderr


def test_run_list_and_info(server: Server) -> None:
    r = run_cli(server, "--format", "json", "run", "list")
    assert r.code == 0, r.stderr
    assert server.run_id in [run["training_run_id"] for run in r.json()["training_runs"]]
    r = run_cli(server, "run", "list")
    assert r.code == 0 and server.run_id in r.stdout

    r = run_cli(server, "--format", "json", "run", "info", server.run_id)
    info = r.json()
    assert info["training_run"]["base_model"] == TINY
    assert server.training_path in {c["tinker_path"] for c in info["checkpoints"]}
    r = run_cli(server, "run", "info", server.run_id)
    assert r.code == 0 and TINY in r.stdout

    r = run_cli(server, "run", "info", "no-such-run")
    assert r.code == 1 and "404" in r.stderr


def test_session_list_and_info(server: Server) -> None:
    r = run_cli(server, "--format", "json", "session", "list")
    assert r.code == 0, r.stderr
    assert server.session_id in r.json()["sessions"]
    r = run_cli(server, "session", "info", server.session_id, "--format", "json")
    info = r.json()
    assert info["session_id"] == server.session_id
    assert server.run_id in info["training_run_ids"]
    r = run_cli(server, "session", "info", server.session_id)
    assert r.code == 0 and server.run_id in r.stdout


def test_sample_base_model_and_weights(server: Server) -> None:
    r = run_cli(
        server, "--format", "json", "sample", "--model", TINY, "--prompt", "3+4=",
        "--max-tokens", "5", "-n", "2", "--seed", "7",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    data = r.json()
    assert data["model"] == TINY and len(data["samples"]) == 2
    for sample in data["samples"]:
        assert len(sample["tokens"]) == 5 and isinstance(sample["text"], str)

    r = run_cli(
        server, "--format", "json", "sample", "--model-path", server.sampler_path,
        "--prompt", "Hello", "--max-tokens", "3", "--chat", "--temperature", "0",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    data = r.json()
    assert data["model"] == TINY and data["model_path"] == server.sampler_path
    assert 1 <= len(data["samples"][0]["tokens"]) <= 3

    r = run_cli(server, "sample", "--model", TINY, "--prompt", "Hi", "--max-tokens", "2")
    assert r.code == 0 and r.stdout.endswith("\n")

    r = run_cli(server, "sample", "--model", "no/such-model", "--prompt", "x")
    assert r.code == 1 and r.stderr.strip()


def test_wrong_api_key_exit_1(server: Server) -> None:
    r = run_cli(server, "run", "list", "--api-key", "tml-wrong-key-0000")
    assert r.code == 1 and "401" in r.stderr
    assert "tml-wrong-key-0000" not in r.stdout + r.stderr
