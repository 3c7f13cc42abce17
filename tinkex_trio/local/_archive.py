"""Checkpoint archives (PROTOCOL.md A.4): built once per checkpoint version, served as a stream.

* The archive is a gzip-compressed tar of the checkpoint's regular files at the archive root
  (`adapter_config.json`, `adapter_model.safetensors`, `checkpoint_complete`, plus
  `optimizer.safetensors` for training checkpoints): no directories, links, absolute names or
  `..` (A.4.4). gzip because the SDK asks with `accept: application/gzip` (A.4.1).
* It is built in a worker thread (compression is CPU work, not engine work, so it does not
  take the engine's limiter) and cached under `<data>/archives/`; while it is being built the
  archive endpoint answers 503 (A.4.2).
* The URL handed out in the 302 `Location` is `/archives/<token>`, signed (`_signed_urls.py`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ._durable import fsync_directory, staging_name

logger = logging.getLogger("tinkex_trio.local.archive")

ARCHIVE_ROUTE_PREFIX = "/archives/"


def archive_token(run_id: str, checkpoint_id: str, created_at: float) -> str:
    """A stable file name for one version of a checkpoint (overwrites get a new token)."""
    digest = hashlib.sha256(f"{run_id}\n{checkpoint_id}\n{created_at!r}".encode()).hexdigest()
    return digest[:40] + ".tar.gz"


def build_archive(source_dir: Path, target: Path) -> None:
    """Write the tar.gz of the regular files in `source_dir` (synchronous; run in a thread).

    Staged, flushed and renamed (`_durable.py`), so a reader never sees a partial archive.
    """
    tmp = staging_name(target)
    try:
        with tmp.open("wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for entry in sorted(source_dir.iterdir()):
                if entry.is_symlink() or not entry.is_file():
                    continue
                tar.add(entry, arcname=entry.name, recursive=False)
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


@dataclass
class ArchiveBuilder:
    """Tracks archives being built, so concurrent requests start one build, not many."""

    directory: Path
    _building: set[str] = field(default_factory=set)
    _errors: dict[str, str] = field(default_factory=dict)

    def path_for(self, token: str) -> Path:
        return self.directory / token

    def ready(self, token: str) -> bool:
        return self.path_for(token).is_file()

    def error(self, token: str) -> str | None:
        return self._errors.get(token)

    def start(self, nursery: trio.Nursery, token: str, source_dir: Path) -> None:
        """Start building unless a build is running (or has failed)."""
        if token in self._building or token in self._errors or self.ready(token):
            return
        self._building.add(token)
        nursery.start_soon(self._build, token, source_dir)

    async def _build(self, token: str, source_dir: Path) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            await trio.to_thread.run_sync(build_archive, source_dir, self.path_for(token))
        except OSError as exc:
            logger.exception("building archive %s from %s failed", token, source_dir)
            self._errors[token] = f"could not build the archive: {exc}"
        finally:
            self._building.discard(token)

    def remove(self, token: str) -> None:
        self._errors.pop(token, None)
        self.path_for(token).unlink(missing_ok=True)
