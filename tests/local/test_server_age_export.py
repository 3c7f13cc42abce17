"""save_weights_external with `age_encryption_recipients` (PROTOCOL.md 3.2): every exported file
is served as `<file>.age`, decryptable by each recipient's identity to the exact bytes of an
unencrypted export of the same weights; bad recipients are a 4xx `user` error naming the index.

Real time: the encryption runs in a worker thread, which autojump cannot see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyrage
import pytest
import trio
from age_keys import ssh_keypair
from server_testing import Harness, open_harness

LIMIT = 30


async def _export(h: Harness, mid: str, seq: int, name: str, **fields: Any) -> dict[str, Any]:
    sub = await h.ok(
        "save_weights_external", {"model_id": mid, "seq_id": seq, "path": name, **fields}
    )
    result: dict[str, Any] = await h.result(sub["request_id"])
    return result


async def _files(h: Harness, mid: str, name: str) -> dict[str, bytes]:
    route = f"training_runs/{mid}/checkpoints/external_weights/{name}/external_weights_urls"
    urls = (await h.get(route)).json()["urls"]
    files = {}
    for file, url in urls.items():
        got = await h.client.get(url, headers={"X-API-Key": ""})
        assert got.status_code == 200, got.text
        files[file] = got.content
    return files


async def test_encrypted_export_decrypts_to_the_plain_export(tmp_path: Path) -> None:
    x25519 = pyrage.x25519.Identity.generate()
    ed_key, ed_pub = ssh_keypair(tmp_path, "ed25519")
    rsa_key, rsa_pub = ssh_keypair(tmp_path, "rsa")
    recipients = [str(x25519.to_public()), ed_pub, rsa_pub]
    with trio.fail_after(LIMIT):
        async with open_harness(tmp_path / "data") as h:
            mid = await h.model(await h.session())
            plain = await _export(h, mid, 1, "plain")
            secret = await _export(h, mid, 2, "secret", age_encryption_recipients=recipients)
            plain_files = await _files(h, mid, "plain")
            secret_files = await _files(h, mid, "secret")
            listed = (await h.get(f"training_runs/{mid}/checkpoints")).json()["checkpoints"]
    assert secret["path"] == f"tinker://{mid}/external_weights/secret"
    assert "adapter_model.safetensors" in plain_files
    assert sorted(secret_files) == sorted(f + ".age" for f in plain_files)
    # Stored bytes are the ciphertext's: each file grows by age's header and tags.
    assert secret["size_bytes"] == sum(len(b) for b in secret_files.values()) > plain["size_bytes"]
    by_id = {c["checkpoint_id"]: c for c in listed}
    assert by_id["external_weights/secret"]["size_bytes"] == secret["size_bytes"]
    identities = {
        "x25519": x25519,
        "ssh-ed25519": pyrage.ssh.Identity.from_buffer(ed_key.read_bytes()),
        "ssh-rsa": pyrage.ssh.Identity.from_buffer(rsa_key.read_bytes()),
    }
    for file, content in plain_files.items():
        ciphertext = secret_files[file + ".age"]
        assert content not in ciphertext or not content
        for kind, identity in identities.items():
            assert pyrage.decrypt(ciphertext, [identity]) == content, (kind, file)
    # A stranger's identity opens nothing.
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(
            secret_files["adapter_model.safetensors.age"], [pyrage.x25519.Identity.generate()]
        )
    # Nothing unencrypted was left on disk beside the export.
    stored = list((tmp_path / "data" / "checkpoints").rglob("*"))
    secret_dir = [p for p in stored if p.is_dir() and p.name == "secret"]
    assert len(secret_dir) == 1
    assert all(p.name.endswith(".age") for p in secret_dir[0].iterdir())
    assert not list((tmp_path / "data" / "staging").iterdir())


@pytest.mark.parametrize(
    ("recipients", "index", "words"),
    [
        (["age1notbech32"], 0, "does not parse"),
        ([str(pyrage.x25519.Identity.generate().to_public()), "AGE-SECRET-KEY-1ABC"], 1, "is not"),
        (
            [str(pyrage.x25519.Identity.generate().to_public()), "ssh-ed25519 AAAAnotakey"],
            1,
            "parse",
        ),
        (["ssh-dss AAAAB3NzaC1kc3MAAACBA"], 0, "is not"),
    ],
    ids=["bad-bech32", "secret-key-as-recipient", "bad-ssh-key", "unsupported-ssh-type"],
)
async def test_bad_recipients_are_user_errors_naming_the_index(
    tmp_path: Path, autojump_clock: object, recipients: list[str], index: int, words: str
) -> None:
    async with open_harness(tmp_path) as h:
        mid = await h.model(await h.session())
        refused = await h.post(
            "save_weights_external",
            {"model_id": mid, "seq_id": 1, "path": "x", "age_encryption_recipients": recipients},
        )
        assert refused.status_code == 400, refused.text
        body = refused.json()
        assert body["category"] == "user"
        assert f"age_encryption_recipients[{index}]" in body["detail"]
        assert words in body["detail"]
        # The secret key is never echoed in full.
        assert "AGE-SECRET-KEY-1ABC" not in body["detail"]
        assert (
            await h.get(f"training_runs/{mid}/checkpoints/external_weights/x/external_weights_urls")
        ).status_code == 404
        # The refused request consumed its seq_id: the next one runs.
        await _export(h, mid, 2, "after")


async def test_too_many_recipients(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        mid = await h.model(await h.session())
        keys = [str(pyrage.x25519.Identity.generate().to_public()) for _ in range(11)]
        refused = await h.post(
            "save_weights_external",
            {"model_id": mid, "seq_id": 1, "path": "x", "age_encryption_recipients": keys},
        )
        assert refused.status_code == 400
        assert "at most 10" in refused.json()["detail"]
