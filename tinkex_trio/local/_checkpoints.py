"""Checkpoints: their files, how they are written, their rows in the store, and when they go.

`Checkpoints` is the one owner of checkpoint state; route handlers ask it and never touch the
data directory or the engine themselves.

Layout (under the data directory):

    checkpoints/<run>/<segment>/<name>/   one checkpoint version (PEFT layout, `_engine_api`)
    ephemeral/<sampler>/                  weights behind an unnamed save_weights_for_sampler
    staging/<random>/                     a write in progress
    archives/<token>.tar.gz               built for downloads (`_archive.py`)

`<run>` is the run id with `:` replaced by `_`; `<segment>` is `weights`, `sampler_weights` or
`external_weights` (PROTOCOL.md 5.4).

Writing: the engine saves into a fresh directory under `staging/`; only a complete save is
renamed into place (the same file system, so the rename is atomic), replacing the previous
version, and then its row is written. A reader therefore sees the old version or the new one,
never half of one, and a failed save leaves the old version alone. The staged files and the
rename are flushed to disk (`_durable.py`). What a crash leaves in `staging/` is never read,
and is removed at the next start-up.

Expiry: a checkpoint with `ttl_seconds` expires at a fixed time; an expired one is removed when
next looked up and by `reap_forever` every `REAP_INTERVAL` seconds.

Copies (copy_weights): the copy's files are hard links to the source's (shared storage; copied
where linking fails), so either can be deleted on its own.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import trio

from tinkex_trio.types import Checkpoint, ParsedTinkerPath

from ._archive import ArchiveBuilder, archive_token
from ._durable import STAGING_DIR, fsync_directory, fsync_tree
from ._engine_api import EngineUserError, LoraSpec
from ._http import HTTPError
from ._scheduler import EngineRunner
from ._store import CheckpointRow, ModelRow, Store

#: How often expired checkpoints (ttl_seconds) are deleted.
REAP_INTERVAL: Final = 60.0

Segment = Literal["weights", "sampler_weights", "external_weights"]
#: Checkpoint kind by tinker-path segment (PROTOCOL.md 5.4, 7.8).
CHECKPOINT_TYPES: Final[dict[Segment, Literal["training", "sampler", "external"]]] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}


def run_dir_name(run_id: str) -> str:
    return run_id.replace(":", "_")


def utc_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Checkpoints:
    """Checkpoint files, rows, expiry, archives and copies of one data directory."""

    def __init__(self, data_dir: Path, store: Store, runner: EngineRunner) -> None:
        self._data_dir = data_dir
        self._store = store
        self._runner = runner
        self.archives = ArchiveBuilder(data_dir / "archives")

    # ------------------------------------------------------------------ layout

    def _directory(self, run_id: str, checkpoint_id: str) -> Path:
        return self._data_dir / "checkpoints" / run_dir_name(run_id) / checkpoint_id

    def _staging(self) -> Path:
        """A fresh, empty directory for one write; renamed into place once complete.

        Whatever a crash leaves here is removed at the next start-up (`_durable.py`).
        """
        directory = self._data_dir / STAGING_DIR / uuid.uuid4().hex
        directory.mkdir(parents=True)
        return directory

    async def _move_into_place(self, staged: Path, final: Path) -> None:
        """Flush the staged files, then swap them in for `final` and flush the rename."""
        await self._runner.run_blocking(_commit_directory, staged, final)

    # ----------------------------------------------------------------- lookups

    def live(self, run_id: str, checkpoint_id: str) -> CheckpointRow | None:
        """The checkpoint, or None if there is none or it has expired (it is removed then)."""
        ck = self._store.get_checkpoint(run_id, checkpoint_id)
        if ck is not None and ck.expires_at is not None and ck.expires_at <= time.time():
            self.remove(ck)
            return None
        return ck

    def get(self, run_id: str, checkpoint_id: str) -> CheckpointRow:
        """The live checkpoint; 404 if there is none."""
        ck = self.live(run_id, checkpoint_id)
        if ck is None:
            raise HTTPError(404, f"no checkpoint {checkpoint_id!r} in training run {run_id!r}")
        return ck

    def from_path(
        self, tinker_path: str, field: str, *, allow_external: bool = False
    ) -> CheckpointRow:
        """The live checkpoint a request's `tinker://` path names; 400 if the path is bad
        (or names an export where none is allowed), 404 if there is no such checkpoint."""
        try:
            parsed = ParsedTinkerPath.parse(tinker_path)
        except ValueError as exc:
            raise HTTPError(400, f"{field}: {exc}") from None
        if parsed.kind == "external" and not allow_external:
            raise HTTPError(400, f"{field}: external_weights checkpoints are not supported here")
        ck = self.live(parsed.training_run_id, parsed.checkpoint_id)
        if ck is None:
            raise HTTPError(404, f"{field}: no checkpoint at {tinker_path!r}")
        return ck

    def of_run(self, run_id: str) -> list[CheckpointRow]:
        """The run's live checkpoints, newest first."""
        rows = self._store.checkpoints_of_run(run_id)
        return [c for c in rows if self.live(c.run_id, c.checkpoint_id) is not None]

    def page(self, *, limit: int, offset: int) -> tuple[list[CheckpointRow], int]:
        """One page of every live checkpoint, newest first, and the total count."""
        self.reap_expired()
        return self._store.list_checkpoints(limit=limit, offset=offset)

    @staticmethod
    def wire(ck: CheckpointRow) -> Checkpoint:
        return Checkpoint(
            checkpoint_id=ck.checkpoint_id,
            checkpoint_type=ck.checkpoint_type,
            time=utc_datetime(ck.created_at),
            tinker_path=ck.tinker_path,
            size_bytes=ck.size_bytes,
            public=ck.public,
            user_metadata=ck.user_metadata,
            expires_at=None if ck.expires_at is None else utc_datetime(ck.expires_at),
        )

    @staticmethod
    def expiry(ttl_seconds: int | None) -> float | None:
        """When a checkpoint saved now with `ttl_seconds` expires; 400 if it is not positive."""
        if ttl_seconds is None:
            return None
        if ttl_seconds <= 0:
            raise HTTPError(400, f"ttl_seconds must be positive, got {ttl_seconds}")
        return time.time() + ttl_seconds

    @staticmethod
    def version(ck: CheckpointRow) -> str:
        """A name for this save of the checkpoint: an overwrite gets a new one."""
        return archive_token(ck.run_id, ck.checkpoint_id, ck.created_at)

    # ----------------------------------------------------------------- writing

    async def save(
        self,
        model: ModelRow,
        segment: Segment,
        name: str,
        *,
        overwrite: bool,
        expires_at: float | None,
        user_metadata: dict[str, str] | None,
        transform: Callable[[Path], int] | None = None,
    ) -> CheckpointRow:
        """Save the model's adapter as `<segment>/<name>` (with the optimizer state for
        `weights`) and record it. Run it in the model's lane, so it sees every earlier step.

        `transform` (blocking, run in a worker thread) rewrites the staged files before they
        go into place and returns the bytes stored (the age encryption of an export), so no
        reader ever sees the files before it.

        Raises:
            EngineUserError: the checkpoint exists and `overwrite` is false.
        """
        checkpoint_id = f"{segment}/{name}"
        existing = self.live(model.model_id, checkpoint_id)
        if existing is not None and not overwrite:
            raise EngineUserError(
                f"checkpoint {checkpoint_id!r} already exists in {model.model_id!r}; "
                "pass overwrite=True to replace it"
            )
        staged = self._staging()
        final = self._directory(model.model_id, checkpoint_id)
        try:
            size = await self._runner.save_state(
                model.model_id, staged, with_optimizer=segment == "weights"
            )
            if transform is not None:
                size = await trio.to_thread.run_sync(transform, staged)
            if existing is not None:
                self.remove(existing)
            await self._move_into_place(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        row = CheckpointRow(
            run_id=model.model_id,
            checkpoint_id=checkpoint_id,
            checkpoint_type=CHECKPOINT_TYPES[segment],
            created_at=time.time(),
            path=str(final),
            size_bytes=size,
            public=False,
            expires_at=expires_at,
            user_metadata=user_metadata,
        )
        self._store.upsert_checkpoint(row)
        return row

    async def save_for_sampler(self, model: ModelRow, sampling_session_id: str) -> Path:
        """Save the model's adapter for an unnamed save_weights_for_sampler: weights only, no
        checkpoint row (the sampling session is the only handle on them). Returns the directory."""
        staged = self._staging()
        final = self._data_dir / "ephemeral" / run_dir_name(sampling_session_id)
        try:
            await self._runner.save_state(model.model_id, staged, with_optimizer=False)
            await self._move_into_place(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return final

    async def load(
        self, adapter_id: str, base_model: str, ck: CheckpointRow, *, with_optimizer: bool
    ) -> LoraSpec:
        """Create (or replace) the engine's adapter `adapter_id` from a checkpoint."""
        return await self._runner.load_state(
            adapter_id, base_model, Path(ck.path), with_optimizer=with_optimizer
        )

    async def copy(
        self, ck: CheckpointRow, run_id: str, *, expires_at: float | None
    ) -> CheckpointRow:
        """Copy a checkpoint into the (new) run `run_id`, keeping its kind and name.

        Raises:
            HTTPError: 500 if the files cannot be linked or copied.
        """
        staged = self._staging()
        final = self._directory(run_id, ck.checkpoint_id)
        try:
            await trio.to_thread.run_sync(_link_files, Path(ck.path), staged)
            await self._move_into_place(staged, final)
        except OSError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            raise HTTPError(
                500, f"could not copy the checkpoint files: {exc}", category="server"
            ) from None
        row = CheckpointRow(
            run_id=run_id,
            checkpoint_id=ck.checkpoint_id,
            checkpoint_type=ck.checkpoint_type,
            created_at=time.time(),
            path=str(final),
            size_bytes=ck.size_bytes,
            public=False,
            expires_at=expires_at,
            user_metadata=ck.user_metadata,
        )
        self._store.upsert_checkpoint(row)
        return row

    # ------------------------------------------------------------- other changes

    def set_public(self, ck: CheckpointRow, public: bool) -> None:
        """Publish or unpublish; 409 if the checkpoint already is so (PROTOCOL.md 3.5)."""
        if ck.public == public:
            state = "public" if public else "private"
            raise HTTPError(409, f"checkpoint {ck.tinker_path!r} is already {state}")
        self._store.set_checkpoint_public(ck.run_id, ck.checkpoint_id, public)

    def set_expiry(self, ck: CheckpointRow, expires_at: float | None) -> None:
        self._store.set_checkpoint_expiry(ck.run_id, ck.checkpoint_id, expires_at)

    def remove(self, ck: CheckpointRow) -> None:
        """Forget the checkpoint and delete its files and cached archive."""
        self._store.delete_checkpoint(ck.run_id, ck.checkpoint_id)
        self.archives.remove(self.version(ck))
        shutil.rmtree(ck.path, ignore_errors=True)

    def reap_expired(self) -> None:
        for ck in self._store.expired_checkpoints(time.time()):
            self.remove(ck)

    async def reap_forever(self) -> None:
        while True:
            self.reap_expired()
            await trio.sleep(REAP_INTERVAL)

    def start_archive(self, nursery: trio.Nursery, ck: CheckpointRow) -> None:
        """Start building this checkpoint version's archive in `nursery` (once)."""
        self.archives.start(nursery, self.version(ck), Path(ck.path))

    # ------------------------------------------------------------------- files

    async def file_names(self, ck: CheckpointRow) -> list[str]:
        """Names of the checkpoint's regular files (no links, no subdirectories)."""
        return await trio.to_thread.run_sync(_regular_files, Path(ck.path))

    @staticmethod
    def file(ck: CheckpointRow, name: str) -> Path | None:
        """The checkpoint's regular file `name`, or None (links and other names refused)."""
        path = Path(ck.path) / name
        if name in (".", "..") or "/" in name or path.is_symlink() or not path.is_file():
            return None
        return path


def _commit_directory(staged: Path, final: Path) -> None:
    fsync_tree(staged)
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged.replace(final)
    fsync_directory(final.parent)


def _regular_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink())


def _link_files(source: Path, target: Path) -> None:
    """Hard-link the regular files of `source` into `target` (copy where linking fails).

    Links share the bytes on disk while letting either checkpoint be deleted on its own.
    """
    for entry in source.iterdir():
        if entry.is_symlink() or not entry.is_file():
            continue
        try:
            os.link(entry, target / entry.name)
        except OSError:
            shutil.copy2(entry, target / entry.name)


__all__ = ["CHECKPOINT_TYPES", "REAP_INTERVAL", "Checkpoints", "Segment", "run_dir_name"]
