"""External weights through our SDK and CLI: `download()` / `tinkex-trio checkpoint download`
fetch every file of `tinker://<run>/external_weights/<name>` through its signed URL and decrypt
the age-encrypted ones (`<file>.age`) with the identity file the user names.

Against the local backend on 127.0.0.1 (Hypercorn, FakeEngine): real sockets, so outcomes only,
under `trio.fail_after`. The encrypted export must come out byte for byte equal to an
unencrypted export of the same weights; every refusal leaves `output_dir` as it was.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pyrage
import pytest
import trio

pytest.importorskip("hypercorn")

from age_keys import ssh_keypair

from tinkex_trio import AdminClient, RestClient, TrainingClient, download, open_service
from tinkex_trio.download import (
    ArchiveLimitError,
    DecryptionError,
    IdentityRequiredError,
    UnsafeArchiveError,
)
from tinkex_trio.errors import InvalidInputError
from tinkex_trio.local import LocalBackend, open_local_backend
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine
from tinkex_trio.types import ExternalWeightsUrlsResponse

LIMIT = 60


@dataclass
class Exports:
    backend: LocalBackend
    rest: RestClient
    admin: AdminClient
    training: TrainingClient
    plain: str
    secret: str
    x25519_file: Path
    ssh_file: Path


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@asynccontextmanager
async def open_exports(tmp_path: Path) -> AsyncIterator[Exports]:
    """A plain and an encrypted export of the same weights, and two identity files."""
    x25519 = pyrage.x25519.Identity.generate()
    x25519_file = tmp_path / "key.txt"
    x25519_file.write_text(f"# created: today\n# public key: {x25519.to_public()}\n{x25519}\n")
    ssh_file, ssh_public = ssh_keypair(tmp_path, "ed25519")
    async with (
        open_local_backend(data_dir=tmp_path / "data", engine=FakeEngine()) as backend,
        open_service(base_url=backend.base_url, api_key=backend.api_key, telemetry=False) as svc,
    ):
        training = await svc.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
        plain = await (await training.save_weights_external("plain"))
        secret = await (
            await training.save_weights_external(
                "secret", age_encryption_recipients=[str(x25519.to_public()), ssh_public]
            )
        )
        yield Exports(
            backend,
            svc.create_rest_client(),
            svc.create_admin_client(),
            training,
            plain.path,
            secret.path,
            x25519_file,
            ssh_file,
        )


async def test_download_decrypts_to_the_plain_export(tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[tuple[int, int | None]] = []
    with trio.fail_after(LIMIT):
        async with open_exports(tmp_path) as ex:
            plain_dir = await download(ex.rest, ex.plain, output_dir=out)
            by_age = await download(
                ex.rest,
                ex.secret,
                output_dir=out,
                identity=ex.x25519_file,
                progress=lambda done, total: seen.append((done, total)),
            )
            by_ssh = await download(
                ex.rest, ex.secret, output_dir=out / "ssh", identity=str(ex.ssh_file)
            )
    plain = _files(plain_dir)
    assert "adapter_model.safetensors" in plain and "adapter_config.json" in plain
    assert by_age == out / f"{ex.secret[len('tinker://') :].replace('/', '_')}"
    assert _files(by_age) == plain
    assert _files(by_ssh) == plain
    # Progress counts the ciphertext across all files (no total is known before the end) and
    # ends with (n, n).
    assert seen[-1][0] == seen[-1][1] and seen[-1][0] > sum(len(b) for b in plain.values())
    assert all(total is None for _, total in seen[:-1])
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert _entries(out) == sorted(["ssh", by_age.name, plain_dir.name])


async def test_refusals_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stranger = tmp_path / "stranger.txt"
    stranger.write_text(str(pyrage.x25519.Identity.generate()) + "\n")
    with trio.fail_after(LIMIT):
        async with open_exports(tmp_path) as ex:
            with pytest.raises(IdentityRequiredError, match="identity="):
                await download(ex.rest, ex.secret, output_dir=out)
            # Refused before any file was fetched: the server logged no read.
            audit = await ex.admin.get_audit_log("checkpoints")
            assert "checkpoint_read" not in [e.event for e in audit.entries]
            with pytest.raises(DecryptionError, match="could not decrypt"):
                await download(ex.rest, ex.secret, output_dir=out, identity=stranger)
            with pytest.raises(ArchiveLimitError, match="max_extracted_bytes=100"):
                await download(
                    ex.rest,
                    ex.secret,
                    output_dir=out,
                    identity=ex.x25519_file,
                    max_extracted_bytes=100,
                )
            with pytest.raises(ArchiveLimitError, match="max_members=1"):
                await download(
                    ex.rest, ex.secret, output_dir=out, identity=ex.x25519_file, max_members=1
                )
    assert _entries(out) == []


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "does not exist"),
        ("not a key\n", "line 1"),
        ("# only a comment\n\n", "holds no identity"),
        ("AGE-SECRET-KEY-1NOTBECH32\n", "not a valid age identity"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
            "OpenSSH private key",
        ),
    ],
    ids=["missing", "garbage", "empty", "bad-age-key", "bad-ssh-key"],
)
async def test_bad_identity_files_are_refused_before_sending(
    tmp_path: Path, content: str | None, words: str
) -> None:
    identity = tmp_path / "identity"
    if content is not None:
        identity.write_text(content)
    with trio.fail_after(LIMIT):
        async with open_exports(tmp_path) as ex:
            with pytest.raises(InvalidInputError, match=words) as caught:
                await download(ex.rest, ex.secret, output_dir=tmp_path / "out", identity=identity)
            # An identity only makes sense for external weights.
            saved = await (await ex.training.save_state("w"))
            with pytest.raises(InvalidInputError, match="external_weights"):
                await download(
                    ex.rest, saved.path, output_dir=tmp_path / "out", identity=ex.x25519_file
                )
    assert "NOTBECH32" not in str(caught.value)  # the file's content is never echoed
    assert _entries(tmp_path / "out") == []


async def test_unsafe_file_names_are_refused(tmp_path: Path) -> None:
    """A server (ours is patched to misbehave) naming a file outside the target."""
    with trio.fail_after(LIMIT):
        async with open_exports(tmp_path) as ex:
            real = RestClient.get_external_weights_urls

            async def hostile(self: RestClient, path: str) -> ExternalWeightsUrlsResponse:
                answer = await real(self, path)
                url = next(iter(answer.urls.values()))
                return ExternalWeightsUrlsResponse(
                    urls={"../escape.safetensors": url}, expires=answer.expires
                )

            RestClient.get_external_weights_urls = hostile  # type: ignore[method-assign]
            try:
                with pytest.raises(UnsafeArchiveError, match="escape"):
                    await download(ex.rest, ex.plain, output_dir=tmp_path / "out")
            finally:
                RestClient.get_external_weights_urls = real  # type: ignore[method-assign]
    assert _entries(tmp_path / "out") == []
    assert not (tmp_path / "escape.safetensors").exists()


async def test_cli_downloads_and_decrypts_with_identity(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with trio.fail_after(LIMIT):
        async with open_exports(tmp_path) as ex:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("TINKER_")},
                "TINKER_BASE_URL": ex.backend.base_url,
                "TINKER_API_KEY": ex.backend.api_key,
                "TINKER_TELEMETRY": "0",
            }
            command = [sys.executable, "-m", "tinkex_trio.cli", "checkpoint", "download"]
            refused = await trio.run_process(
                [*command, ex.secret, "--output-dir", str(out)],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            done = await trio.run_process(
                [*command, ex.secret, "--output-dir", str(out), "--identity", str(ex.x25519_file)],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            plain_dir = await download(ex.rest, ex.plain, output_dir=tmp_path / "plain")
    assert refused.returncode == 1
    assert b"age-encrypted" in refused.stderr and b"--identity FILE" in refused.stderr
    assert done.returncode == 0, done.stderr.decode()
    [target] = out.iterdir()
    assert _files(target) == _files(plain_dir)


async def test_urls_are_signed_again_near_their_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PROTOCOL.md 9.10: within 5 minutes of `expires`, ask for fresh URLs before the next file.
    The backend's URLs live an hour; a margin of two hours makes every file need fresh ones."""
    from datetime import timedelta

    # `tinkex_trio.download` the attribute is the function; the module is in sys.modules.
    download_module = sys.modules["tinkex_trio.download"]

    asked: list[str] = []
    real = RestClient.get_external_weights_urls

    async def counting(self: RestClient, path: str) -> ExternalWeightsUrlsResponse:
        asked.append(path)
        return await real(self, path)

    monkeypatch.setattr(RestClient, "get_external_weights_urls", counting)
    with trio.fail_after(LIMIT):
        async with open_exports(tmp_path) as ex:
            plain = await download(ex.rest, ex.plain, output_dir=tmp_path / "a")
            assert asked == [ex.plain]
            monkeypatch.setattr(download_module, "RESIGN_MARGIN", timedelta(hours=2))
            again = await download(ex.rest, ex.plain, output_dir=tmp_path / "b")
    files = _files(plain)
    assert asked == [ex.plain] * (2 + len(files))
    assert _files(again) == files
