"""Encrypting an external-weights export to age recipients (PROTOCOL.md 3.2
`save_weights_external`, `age_encryption_recipients`).

The official SDK documents the contract: with recipients, "every exported file is encrypted to
them and stored with a `.age` suffix; decrypt with `age -d -i <identity>`". So each file of the
staged export becomes `<file>.age` (binary age format, one header for all recipients) and the
plaintext is removed before the export is moved into place: the signed URLs only ever serve
ciphertext.

The crypto is pyrage's (a binding of the `rage` implementation of age); nothing here touches
key material beyond handing the public keys to it. Accepted recipients are the two forms the
SDK names: native X25519 keys (`age1...`) and SSH public keys (`ssh-ed25519 ...`,
`ssh-rsa ...`). A recipient that does not parse is a 400 naming its index; the key itself is
public, but only its first characters are echoed, enough to recognise it.

pyrage is imported on first use: it is in the `local` extra, and a backend installed without it
still serves everything else and answers an encryption request with a clear 501.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ._http import HTTPError

if TYPE_CHECKING:
    from pyrage import _Recipient as Recipient
else:
    Recipient = object

#: PROTOCOL.md 3.2: at most this many age recipients on save_weights_external.
MAX_AGE_RECIPIENTS: Final = 10
#: The suffix of every encrypted file (the official SDK's documentation, and age's own habit).
AGE_SUFFIX: Final = ".age"
#: SSH key types age accepts as recipients.
SSH_RECIPIENT_PREFIXES: Final = ("ssh-ed25519 ", "ssh-rsa ")
_ECHOED_CHARS: Final = 16
_ACCEPTED: Final = (
    "an age X25519 recipient ('age1...') or an SSH public key ('ssh-ed25519 AAAA...' or "
    "'ssh-rsa AAAA...')"
)


def _require_pyrage() -> None:
    try:
        import pyrage  # noqa: F401
    except ImportError:
        raise HTTPError(
            501,
            "this local backend cannot encrypt exports: the package 'pyrage' is not installed "
            "(pip install 'tinkex-trio[local]'); omit age_encryption_recipients to export "
            "unencrypted files",
            category="server",
        ) from None


def parse_recipients(values: Sequence[str]) -> list[Recipient]:
    """The recipients of `age_encryption_recipients`, parsed; 400 naming the first bad one."""
    if len(values) > MAX_AGE_RECIPIENTS:
        raise HTTPError(
            400,
            f"age_encryption_recipients holds {len(values)} keys; at most "
            f"{MAX_AGE_RECIPIENTS} are allowed",
        )
    _require_pyrage()
    import pyrage

    parsed: list[Recipient] = []
    for index, value in enumerate(values):
        text = value.strip()
        try:
            if text.startswith("age1"):
                parsed.append(pyrage.x25519.Recipient.from_str(text))
                continue
            if text.startswith(SSH_RECIPIENT_PREFIXES):
                parsed.append(pyrage.ssh.Recipient.from_str(text))
                continue
        except pyrage.RecipientError as exc:
            raise HTTPError(
                400,
                f"age_encryption_recipients[{index}] ({_echo(text)}) does not parse: {exc}; "
                f"each recipient must be {_ACCEPTED}",
            ) from None
        raise HTTPError(
            400,
            f"age_encryption_recipients[{index}] ({_echo(text)}) is not {_ACCEPTED}",
        )
    return parsed


def _echo(value: str) -> str:
    shown = value[:_ECHOED_CHARS]
    return repr(shown + "..." if len(value) > _ECHOED_CHARS else shown)


def encryptor(recipients: Sequence[Recipient]) -> Callable[[Path], int]:
    """A step for `Checkpoints.save`: encrypt every file of a staged export in place."""

    def encrypt(directory: Path) -> int:
        return encrypt_directory(directory, recipients)

    return encrypt


def encrypt_directory(directory: Path, recipients: Sequence[Recipient]) -> int:
    """Replace every regular file `f` of `directory` by `f.age`, encrypted to `recipients`;
    return the bytes now stored. Blocking (file I/O and crypto): run it in a worker thread.
    pyrage streams the files, so memory stays flat whatever their size."""
    import pyrage

    total = 0
    for path in sorted(directory.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        target = path.with_name(path.name + AGE_SUFFIX)
        pyrage.encrypt_file(str(path), str(target), list(recipients))
        path.unlink()
        total += target.stat().st_size
    return total


__all__ = [
    "AGE_SUFFIX",
    "MAX_AGE_RECIPIENTS",
    "Recipient",
    "encrypt_directory",
    "encryptor",
    "parse_recipients",
]
