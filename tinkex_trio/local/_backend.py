"""The backend's state, shared by every group of endpoints.

`Backend` holds the settings and what serves them: the store, the engine runner, the future
registry, the training lanes, the sampling batcher, the checkpoints and the URL signer. It adds
only the lookups every group needs, each answering a 4xx of its own when the thing looked up
is missing. The route groups (`_routes_*.py`) each take the `Backend` and add their handlers;
`BackendApp` (`_app.py`) has one and speaks ASGI. `open_backend_app` builds it and owns the
nursery its background work runs in.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Final

import trio

from tinkex_trio import types as t

from ._checkpoints import Checkpoints
from ._custom_graph import CustomLossStore
from ._engine_api import ModelInfo
from ._expiry import SessionExpiry
from ._futures import FutureRegistry
from ._http import HTTPError, Response, json_response
from ._memory_trim import trim_heap
from ._scheduler import EngineRunner, SampleBatcher, TrainingLanes
from ._settings import LocalBackendSettings
from ._signed_urls import SignedUrls
from ._stability import StabilityRecordings
from ._store import ModelRow, SessionRow, Store

API = "/api/v1"
#: The owner reported for every session and run: the local backend has one user.
LOCAL_OWNER: Final = "tml:user:local"
#: The project of every session created without one and never assigned to one (PROTOCOL.md
#: 7.9 `SessionSummary.project_id` is required): stable across restarts, since it is stored
#: nowhere. Search by it, and list its training runs, like any other project.
DEFAULT_PROJECT_ID: Final = "local-default"
#: Largest page of any REST listing (training runs, checkpoints, sessions; PROTOCOL.md 3.5).
MAX_PAGE_LIMIT: Final = 1000
#: The finish reason stored for a session that stopped heart-beating (`session_timeout`).
EXPIRED_REASON: Final = "expired"


def now() -> float:
    return time.time()


def project_of(session: SessionRow | None) -> str:
    """The project a session belongs to: its own, else `DEFAULT_PROJECT_ID`."""
    if session is None or session.project_id is None:
        return DEFAULT_PROJECT_ID
    return session.project_id


def hash_payload(obj: object) -> str:
    """What makes two submissions of one seq_id the same request (PROTOCOL.md 5.2)."""
    return hashlib.sha256(t.encode(obj)).hexdigest()


class Backend:
    """Shared state and lookups of the endpoints (see the module docstring)."""

    def __init__(
        self,
        settings: LocalBackendSettings,
        api_key: str,
        secret: bytes,
        store: Store,
        runner: EngineRunner,
        models: list[ModelInfo],
        nursery: trio.Nursery,
    ) -> None:
        self.settings = settings
        self.api_key = api_key
        """The key clients send: the settings' key, or the one stored in the data directory."""
        self.secret = secret
        """Signs URLs and JWTs; kept in the data directory across restarts."""
        self.store = store
        self.runner = runner
        self.models = {m.name: m for m in models}
        self.nursery = nursery
        """Where background work (archive builds, trace exports) runs."""
        self.client_config = settings.client_config()
        self.registry = FutureRegistry(store)
        self.lanes = TrainingLanes(
            self.registry, self._persist_seq, gap_timeout=settings.seq_gap_timeout
        )
        self.batcher = SampleBatcher(runner, self.registry)
        self.checkpoints = Checkpoints(settings.data_dir, store, runner)
        self.urls = SignedUrls(secret)
        self.stability = StabilityRecordings(trio.current_time)
        """What `record_stability_info` samplers saw, for stable_reinforce (`_stability.py`)."""
        self.custom_losses = CustomLossStore()
        """Server-side custom losses by loss_id (PROTOCOL.md 8.8), in memory."""
        self.expiry = SessionExpiry(settings.session_timeout, self._expire_session)
        """Open sessions' deadlines; its task runs in the app's nursery (`open_backend_app`)."""
        for session_id in store.open_sessions():
            self.expiry.start(session_id)

    # --------------------------------------------------------------- lifecycle

    def session_seen(self, session_id: str) -> None:
        """A sign of life of the session (a heartbeat, a request of its runs or samplers)."""
        self.expiry.seen(session_id)

    def finish_session(self, session_id: str, reason: str) -> None:
        """Finish the session (once) and release what it holds in the engine."""
        self.expiry.forget(session_id)
        self.store.finish_session(session_id, reason)
        self.release_session(session_id)

    def _expire_session(self, session_id: str) -> None:
        self.store.finish_session(session_id, EXPIRED_REASON)
        self.release_session(session_id)

    def release_session(self, session_id: str) -> None:
        """Release the engine state of the session's training runs and its samplers' logs.

        The runs stay in the store (listed, their checkpoints usable; a new training client
        revives one from a checkpoint) but take no more requests: they are marked unloaded at
        once, and each adapter is dropped, with its optimizer state and any offloaded copy,
        once its lane has run what it had already accepted.
        """
        for model_id in self.store.models_of_session(session_id):
            model = self.store.get_model(model_id)
            if model is None or model.unloaded:
                continue
            self.store.update_model(model_id, unloaded=1)
            if self.lanes.has_lane(model_id):
                self.lanes.close_lane(model_id, functools.partial(self._drop, model_id))
        for sampler_id in self.store.samplers_of_session(session_id):
            self.registry.forget_sampling_session(sampler_id)

    async def _drop(self, model_id: str) -> None:
        await self.runner.drop_adapter(model_id)
        await self.runner.run_blocking(trim_heap)

    # ----------------------------------------------------------------- lookups

    def model_info(self, base_model: str) -> ModelInfo:
        info = self.models.get(base_model)
        if info is None:
            raise HTTPError(
                400,
                f"unknown base_model {base_model!r}; this backend serves {sorted(self.models)}",
            )
        return info

    def session(self, session_id: str) -> SessionRow:
        session = self.store.get_session(session_id)
        if session is None:
            raise HTTPError(404, f"unknown session_id {session_id!r}; call create_session first")
        return session

    def model(self, model_id: str) -> ModelRow:
        model = self.store.get_model(model_id)
        if model is None:
            raise HTTPError(404, f"unknown model_id {model_id!r}")
        return model

    # ----------------------------------------------------------------- futures

    @staticmethod
    def future_response(
        request_id: str, model_id: str | None = None, sample_ids: list[str] | None = None
    ) -> Response:
        """The submit answer of a long operation (PROTOCOL.md 4.1)."""
        return json_response(
            t.UntypedAPIFuture(
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

    # ------------------------------------------------------------------- lanes

    def ensure_lane(self, model: ModelRow) -> None:
        if not self.lanes.has_lane(model.model_id):
            last = self.store.max_seq_of_model(model.model_id)
            start = max(model.next_seq_id, -1 if last is None else last + 1)
            self.lanes.open_lane(model.model_id, start)

    def _persist_seq(self, model_id: str, next_seq: int) -> None:
        self.store.update_model(model_id, next_seq_id=next_seq)
