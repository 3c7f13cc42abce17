"""Reading an age identity file and decrypting downloaded `.age` files (PROTOCOL.md 3.2:
`save_weights_external(..., age_encryption_recipients=...)` stores every file as `<file>.age`).

The crypto is pyrage's, an optional dependency (`pip install 'tinkex-trio[age]'`), imported
only when an identity is given. Identity files are what `age` itself reads with `-i`:

* an age identity file: `AGE-SECRET-KEY-1...` lines (as `age-keygen` writes them), `#` comments
  and blank lines allowed, several keys allowed;
* an unencrypted OpenSSH private key (`ssh-ed25519` or `ssh-rsa`, as `ssh-keygen -N ""` writes
  it). Passphrase-protected keys are refused: there is no prompt here.

Secrets: the file's content never appears in an error message or a log line; errors name the
file and, for a bad line, its number.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tinkex_trio.errors import InvalidInputError

if TYPE_CHECKING:
    from pyrage import _Identity as Identity
else:
    Identity = object

#: Identity files are a few hundred bytes; anything much larger is not one.
MAX_IDENTITY_FILE_BYTES: Final = 1 << 20
AGE_SUFFIX: Final = ".age"
_AGE_SECRET_KEY_PREFIX: Final = "AGE-SECRET-KEY-1"
_SSH_PRIVATE_KEY_MARKER: Final = "-----BEGIN OPENSSH PRIVATE KEY-----"


def _require_pyrage() -> None:
    try:
        import pyrage  # noqa: F401
    except ImportError:
        raise InvalidInputError(
            "decrypting age-encrypted checkpoint files needs the package 'pyrage': "
            "pip install 'tinkex-trio[age]'"
        ) from None


def load_identities(path: str | os.PathLike[str]) -> list[Identity]:
    """The identities in the identity file `path` (blocking: a small file read).

    Raises:
        InvalidInputError: pyrage is missing, or the file is missing, unreadable, too large,
            or holds no usable identity (the message names the file, never its content).
    """
    _require_pyrage()
    import pyrage

    file = Path(path)
    where = f"identity file {str(file)!r}"
    try:
        if file.stat().st_size > MAX_IDENTITY_FILE_BYTES:
            raise InvalidInputError(f"{where} is larger than 1 MiB; it is not an identity file")
        data = file.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{where} is a directory, not a file") from None
    except OSError as exc:
        raise InvalidInputError(f"{where} cannot be read: {exc.strerror}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InvalidInputError(f"{where} is not text (an age or OpenSSH identity)") from None
    if _SSH_PRIVATE_KEY_MARKER in text:
        try:
            return [pyrage.ssh.Identity.from_buffer(data)]
        except pyrage.IdentityError:
            raise InvalidInputError(
                f"{where} is not a usable OpenSSH private key: only unencrypted ssh-ed25519 "
                "and ssh-rsa keys are supported (passphrase-protected keys are not)"
            ) from None
    identities: list[Identity] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(_AGE_SECRET_KEY_PREFIX):
            raise InvalidInputError(
                f"line {number} of {where} is not an age identity (AGE-SECRET-KEY-1...) and "
                "the file is not an OpenSSH private key"
            )
        try:
            identities.append(pyrage.x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise InvalidInputError(
                f"line {number} of {where} is not a valid age identity (bad encoding)"
            ) from None
    if not identities:
        raise InvalidInputError(f"{where} holds no identity (only comments or blank lines)")
    return identities


class DecryptFailed(Exception):
    """pyrage could not decrypt a file; the message says why (no matching key, corrupt)."""


def decrypt_file(source: Path, target: Path, identities: Sequence[Identity]) -> None:
    """Decrypt the age file `source` into `target` (blocking; pyrage streams the data, and
    age's plaintext is never longer than its ciphertext).

    Raises:
        DecryptFailed: no identity matches, or `source` is not a valid age file.
    """
    import pyrage

    try:
        pyrage.decrypt_file(str(source), str(target), list(identities))
    except pyrage.DecryptError as exc:
        raise DecryptFailed(str(exc)) from None


__all__ = [
    "AGE_SUFFIX",
    "MAX_IDENTITY_FILE_BYTES",
    "DecryptFailed",
    "Identity",
    "decrypt_file",
    "load_identities",
]
