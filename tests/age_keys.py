"""Key pairs for the age-encryption tests (tests/ is on sys.path, so import by name)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def ssh_keypair(directory: Path, kind: str) -> tuple[Path, str]:
    """A fresh unencrypted OpenSSH key pair made by ssh-keygen: (private key file, public key).

    `kind` is `ed25519` or `rsa`; skips the test when ssh-keygen is not installed.
    """
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    key = directory / f"id_{kind}"
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", "test", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    return key, key.with_name(key.name + ".pub").read_text().strip()
