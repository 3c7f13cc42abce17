"""Durable writes in the data directory, and the clean-up of interrupted ones at start-up.

Every file the backend keeps (checkpoints, archives, trace exports, the API key and secret,
offloaded adapters) is written the same way: into a staging name first, flushed to disk
(`fsync` of each file, then of its directory), and renamed into place (`rename` is atomic on
one file system), then the parent directory is flushed so the rename itself survives a power
cut. A reader therefore sees the old version or the new one, never part of one.

What a crash leaves behind is only ever under a staging name: `staging/<random>/` directories
and hidden `.<name>.tmp-<pid>` files or directories. `remove_leftovers` deletes
them at start-up, before anything is served, and reports what it removed (the caller logs it).
Nothing else is touched: a staging name is never read, so deleting it cannot lose a finished
write.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "STAGING_DIR",
    "DataDirectoryError",
    "Leftover",
    "check_data_dir",
    "fsync_directory",
    "fsync_tree",
    "leftover_size",
    "remove_leftovers",
    "staging_name",
    "write_file_atomically",
]

#: The directory of in-progress multi-file writes (checkpoints, offloaded adapters).
STAGING_DIR: Final = "staging"
#: The directories that may hold single staged files or directories next to their final name.
_SCANNED: Final = ("archives", "traces", "checkpoints", "ephemeral")
#: How deep below those directories staged names can sit (checkpoints/<run>/<segment>/<name>).
_MAX_DEPTH: Final = 3
#: A staged single file or directory: hidden, so no name a user can choose matches it (checkpoint
#: names cannot start with a dot). Archives written before that rule used a visible suffix.
_STAGED_NAME: Final = re.compile(r"\..+\.tmp(-\d+)?")
_LEGACY_ARCHIVE_STAGED: Final = re.compile(r".+\.tar\.gz\.tmp-\d+")


def staging_name(final: Path) -> Path:
    """Where a single-file write of `final` is staged: a hidden sibling named for this process."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every regular file directly in `directory`, then the directory itself."""
    for entry in directory.iterdir():
        if entry.is_file() and not entry.is_symlink():
            with entry.open("rb") as f:
                os.fsync(f.fileno())
    fsync_directory(directory)


def write_file_atomically(path: Path, content: bytes, *, mode: int = 0o644) -> None:
    """Write `content` as `path`: staged, flushed, renamed, parent flushed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_name(path)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        staged.replace(path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@dataclass(frozen=True)
class Leftover:
    """A staged write found at start-up (and removed): where, and how many bytes it held."""

    path: Path
    size: int


def leftover_size(path: Path) -> int:
    """Bytes under `path` (a file, or every file below a directory)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                pass
    return total


def _staged_entries(data_dir: Path) -> Iterator[Path]:
    staging = data_dir / STAGING_DIR
    if staging.is_dir():
        yield from sorted(staging.iterdir())
    for name in data_dir.iterdir() if data_dir.is_dir() else ():
        if _STAGED_NAME.fullmatch(name.name):
            yield name
    for top in _SCANNED:
        yield from _staged_below(data_dir / top, _MAX_DEPTH)


def _staged_below(directory: Path, depth: int) -> Iterator[Path]:
    if depth < 0 or not directory.is_dir() or directory.is_symlink():
        return
    for entry in sorted(directory.iterdir()):
        if _STAGED_NAME.fullmatch(entry.name) or _LEGACY_ARCHIVE_STAGED.fullmatch(entry.name):
            yield entry
        elif entry.is_dir() and not entry.is_symlink():
            yield from _staged_below(entry, depth - 1)


def remove_leftovers(data_dir: Path) -> list[Leftover]:
    """Delete what interrupted writes left in `data_dir`; return what was removed.

    Run at start-up only, before any write of this process can be in progress.
    """
    removed: list[Leftover] = []
    for entry in _staged_entries(data_dir):
        size = leftover_size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(Leftover(entry, size))
    return removed


class DataDirectoryError(ValueError):
    """The data directory cannot be used: not a directory, not creatable, or not writable.

    The message is one line naming the path, the cause and the fix; `tinkex-trio serve`
    prints it and exits with status 2.
    """


_FIX: Final = "pass --data-dir (data_dir=) a writable directory"


def check_data_dir(data_dir: Path) -> None:
    """Make sure `data_dir` exists (creating it) and that files can be created in it.

    Checked by trying, not by permission bits: root ignores those, while a read-only mount or
    an immutable directory refuses even root.

    Raises:
        DataDirectoryError: with the path, the cause and the fix.
    """
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirectoryError(
            f"data directory {data_dir} is not a directory; {_FIX}, or move the file away"
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirectoryError(
            f"cannot create data directory {data_dir} ({exc.strerror or exc}); {_FIX}"
        ) from None
    probe = data_dir / f".write-probe.tmp-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise DataDirectoryError(
            f"data directory {data_dir} is not writable ({exc.strerror or exc}); make it "
            f"writable, or {_FIX}"
        ) from None
