"""The backend's state and the helpers every group of endpoints shares.

`Backend` holds the settings, the store, the engine runner, the future registry, the training
lanes, the sampling batcher and the archive builder; the route groups (`_routes_*.py`) each
take it and add only their own handlers. `BackendApp` (`_app.py`) is a `Backend` that also
speaks ASGI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import trio

from tinkex_trio.types import (
    UNSET,
    Checkpoint,
    ParsedTinkerPath,
    UntypedAPIFuture,
)

from ._archive import (
    STREAM_CHUNK,
    ArchiveBuilder,
    archive_token,
    sign,
    verify,
)
from ._engine_api import ModelInfo
from ._futures import DEFAULT_POLL_TIMEOUT, FutureRegistry
from ._http import (
    HTTPError,
    Request,
    Response,
    StreamResponse,
    json_response,
)
from ._scheduler import EngineRunner, SampleBatcher, TrainingLanes
from ._store import CheckpointRow, ModelRow, Store

if TYPE_CHECKING:
    # What trio.open_file returns; trio exports no public name for the class.
    from trio._file_io import AsyncIOWrapper

T = TypeVar("T")

API = "/api/v1"
#: How often expired checkpoints (ttl_seconds) are deleted.
REAP_INTERVAL = 60.0
#: client/config flags (PROTOCOL.md 2.1) unless `client_flags=` overrides them: plain API-key
#: auth, httpx transport for the official SDK, session-wide completion polling (4.8) offered.
DEFAULT_CLIENT_FLAGS: Final[dict[str, Any]] = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "sample_use_retrieve_futures": True,
}
#: PROTOCOL.md 9.5, 10.8: `asample` answers 429 once this many sampling requests wait for the
#: engine. 256 is 16 full engine batches (`SAMPLE_BATCH_MAX`), minutes of CPU decoding: more
#: queued work only adds latency and held memory, while a burst from one SDK (up to 400
#: concurrent submits, 9.5) is pushed back instead of starving other clients. It stays well
#: above the 10 submissions the SDK allows itself while backing off, so a backed-off client
#: refills the queue without another 429 storm.
DEFAULT_MAX_QUEUED_SAMPLES: Final = 256
#: PROTOCOL.md 4.4: a finished result larger than this is first answered metadata-only to a
#: poll that allows it. The SDK reserves the announced bytes from its 50 MiB in-flight response
#: budget (2.1) before fetching, so a dozen 4 MiB payloads still fit at once; below that an
#: extra round trip costs more than the memory it protects.
DEFAULT_METADATA_ONLY_THRESHOLD: Final = 4 * 1024 * 1024


def now() -> float:
    return time.time()


def utc_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def hash_payload(obj: object) -> str:
    return hashlib.sha256(msgspec.json.encode(obj)).hexdigest()


def encode_json(obj: object) -> bytes:
    return msgspec.json.encode(obj)


def or_none(value: T | Any) -> T | None:
    """UNSET → None, for optional request fields."""
    return None if value is UNSET else value


def file_response(
    handle: AsyncIOWrapper[Any], content_type: str, headers: dict[str, str] | None = None
) -> StreamResponse:
    """Stream an open file in `STREAM_CHUNK` pieces (constant memory); closes it when done."""
    size = os.fstat(handle.fileno()).st_size

    async def chunks() -> AsyncIterator[bytes]:
        async with handle:
            while chunk := await handle.read(STREAM_CHUNK):
                yield chunk

    return StreamResponse(
        status=200,
        chunks=chunks(),
        content_type=content_type,
        headers={"content-length": str(size), **(headers or {})},
    )


def run_dir_name(run_id: str) -> str:
    return run_id.replace(":", "_")


@dataclass(frozen=True)
class AppSettings:
    data_dir: Path
    api_key: str
    secret: bytes
    poll_timeout: float = DEFAULT_POLL_TIMEOUT
    engine_in_thread: bool = True
    client_flags: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CLIENT_FLAGS))
    #: None: no limit (every asample is queued).
    max_queued_samples: int | None = DEFAULT_MAX_QUEUED_SAMPLES
    #: None: results are always inlined.
    metadata_only_threshold: int | None = DEFAULT_METADATA_ONLY_THRESHOLD


class Backend:
    """Shared state and helpers of the endpoints. Build it (as a `BackendApp`) with
    `open_backend_app`, which owns the nursery its background work runs in."""

    def __init__(
        self,
        settings: AppSettings,
        store: Store,
        runner: EngineRunner,
        models: list[ModelInfo],
        nursery: trio.Nursery,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.models = {m.name: m for m in models}
        self.nursery = nursery
        self.registry = FutureRegistry(store)
        self.lanes = TrainingLanes(self.registry, self._persist_seq)
        self.batcher = SampleBatcher(runner, self.registry)
        self.archives = ArchiveBuilder(settings.data_dir / "archives")

    def signed_url(self, base_url: str, path: str, expires: int) -> str:
        """`path` on this server, usable without the API key until `expires` (unix time)."""
        signature = sign(self.settings.secret, path, expires)
        return f"{base_url}{path}?expires={expires}&signature={signature}"

    def check_signed_url(self, request: Request, path: str, *, what: str, renew: str) -> None:
        """Refuse a tampered (403) or stale (410) signed URL; `renew` says how to get a new one."""
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            raise HTTPError(403, f"{what} URL has no valid expires parameter") from None
        if not verify(self.settings.secret, path, expires, request.query.get("signature", "")):
            raise HTTPError(403, f"{what} URL signature does not match")
        if expires < now():
            raise HTTPError(410, f"{what} URL has expired; {renew}")

    def model_info(self, base_model: str) -> ModelInfo:
        info = self.models.get(base_model)
        if info is None:
            raise HTTPError(
                400,
                f"unknown base_model {base_model!r}; this backend serves {sorted(self.models)}",
            )
        return info

    def require_session(self, session_id: str) -> None:
        if self.store.get_session(session_id) is None:
            raise HTTPError(404, f"unknown session_id {session_id!r}; call create_session first")

    def model(self, model_id: str) -> ModelRow:
        model = self.store.get_model(model_id)
        if model is None:
            raise HTTPError(404, f"unknown model_id {model_id!r}")
        return model

    def ensure_lane(self, model: ModelRow) -> None:
        if not self.lanes.has_lane(model.model_id):
            last = self.store.max_seq_of_model(model.model_id)
            start = max(model.next_seq_id, -1 if last is None else last + 1)
            self.lanes.open_lane(model.model_id, start)

    def _persist_seq(self, model_id: str, next_seq: int) -> None:
        self.store.update_model(model_id, next_seq_id=next_seq)

    def checkpoint_dir(self, run_id: str, checkpoint_id: str) -> Path:
        return self.settings.data_dir / "checkpoints" / run_dir_name(run_id) / checkpoint_id

    def live_checkpoint(self, run_id: str, checkpoint_id: str) -> CheckpointRow | None:
        ck = self.store.get_checkpoint(run_id, checkpoint_id)
        if ck is not None and ck.expires_at is not None and ck.expires_at <= now():
            self.remove_checkpoint(ck)
            return None
        return ck

    def checkpoint_or_404(self, run_id: str, checkpoint_id: str) -> CheckpointRow:
        ck = self.live_checkpoint(run_id, checkpoint_id)
        if ck is None:
            raise HTTPError(404, f"no checkpoint {checkpoint_id!r} in training run {run_id!r}")
        return ck

    def checkpoint_from_path(
        self, tinker_path: str, field: str, *, allow_external: bool = False
    ) -> CheckpointRow:
        try:
            parsed = ParsedTinkerPath.parse(tinker_path)
        except ValueError as exc:
            raise HTTPError(400, f"{field}: {exc}") from None
        if parsed.kind == "external" and not allow_external:
            raise HTTPError(400, f"{field}: external_weights checkpoints are not supported here")
        ck = self.live_checkpoint(parsed.training_run_id, parsed.checkpoint_id)
        if ck is None:
            raise HTTPError(404, f"{field}: no checkpoint at {tinker_path!r}")
        return ck

    def remove_checkpoint(self, ck: CheckpointRow) -> None:
        self.store.delete_checkpoint(ck.run_id, ck.checkpoint_id)
        self.archives.remove(archive_token(ck.run_id, ck.checkpoint_id, ck.created_at))
        shutil.rmtree(ck.path, ignore_errors=True)

    def checkpoint_wire(self, ck: CheckpointRow) -> Checkpoint:
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

    def future_response(
        self, request_id: str, model_id: str | None = None, sample_ids: list[str] | None = None
    ) -> Response:
        return json_response(
            UntypedAPIFuture(
                request_id=request_id, model_id=model_id, sample_sequence_ids=sample_ids
            )
        )

    def duplicate(
        self, *, model_id: str | None, sampler_id: str | None, seq_id: int, payload_hash: str
    ) -> str | None:
        """The request id of an earlier submission of this seq_id, or None; 409 if it differs."""
        row = self.store.find_future_by_seq(
            model_id=model_id, sampling_session_id=sampler_id, seq_id=seq_id
        )
        if row is None:
            return None
        if row.payload_hash != payload_hash:
            owner = model_id if model_id is not None else sampler_id
            raise HTTPError(
                409,
                f"seq_id {seq_id} of {owner!r} was already submitted with a different payload "
                f"(request {row.request_id})",
            )
        return row.request_id

    def ttl_expiry(self, ttl: int | None) -> float | None:
        if ttl is None:
            return None
        if ttl <= 0:
            raise HTTPError(400, f"ttl_seconds must be positive, got {ttl}")
        return now() + ttl

    def reap_expired(self) -> None:
        for ck in self.store.expired_checkpoints(now()):
            self.remove_checkpoint(ck)

    async def reap_forever(self) -> None:
        while True:
            self.reap_expired()
            await trio.sleep(REAP_INTERVAL)
