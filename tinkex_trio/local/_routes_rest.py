"""REST endpoints (PROTOCOL.md 3.5, A.4): training runs, checkpoints (publish, TTL, signed
archive downloads), weights info and sessions. All answer directly (no futures).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from email.utils import format_datetime
from pathlib import Path

import trio

from tinkex_trio.types import (
    CheckpointsListResponse,
    Cursor,
    GetSessionResponse,
    ListSessionsResponse,
    SetCheckpointTtlRequest,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoRequest,
    WeightsInfoResponse,
    decode_request,
)

from ._archive import (
    ARCHIVE_ROUTE_PREFIX,
    ARCHIVE_URL_TTL,
    STREAM_CHUNK,
    archive_token,
    sign,
    verify,
)
from ._backend import (
    API,
    Backend,
    encode_json,
    now,
    utc_datetime,
)
from ._http import (
    Handler,
    HTTPError,
    Request,
    Response,
    StreamResponse,
    json_response,
)
from ._store import CheckpointRow, ModelRow

_RUN = r"(?P<run_id>[^/]+)"
_CKPT = r"(?P<checkpoint_id>(?:weights|sampler_weights)/[^/]+)"
#: Default and largest page sizes of the REST listings (PROTOCOL.md 3.5).
DEFAULT_RUNS_LIMIT = 20
DEFAULT_CHECKPOINTS_LIMIT = 100
MAX_PAGE_LIMIT = 1000
#: The owner reported for every run: the local backend has one user.
LOCAL_OWNER = "tml:user:local"


def _int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, f"query parameter {name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise HTTPError(400, f"query parameter {name}={value} must be in {lo}..{hi}")
    return value


class RestRoutes:
    """The REST endpoints; state and shared helpers live in `Backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", f"{API}/training_runs", self.list_training_runs),
            ("GET", f"{API}/training_runs/{_RUN}", self.get_training_run),
            ("GET", f"{API}/training_runs/{_RUN}/checkpoints", self.run_checkpoints),
            ("DELETE", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}", self.delete_checkpoint),
            ("POST", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}/publish", self.publish),
            ("DELETE", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}/publish", self.unpublish),
            ("PUT", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}/ttl", self.set_ttl),
            ("GET", f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}/archive", self.archive_url),
            ("GET", f"{API}/checkpoints", self.list_checkpoints),
            ("POST", f"{API}/weights_info", self.weights_info),
            ("GET", f"{API}/sessions", self.list_sessions),
            ("GET", f"{API}/sessions/(?P<session_id>[^/]+)", self.get_session),
            ("GET", f"{ARCHIVE_ROUTE_PREFIX}(?P<token>[0-9a-f]{{40}}\\.tar\\.gz)", self.download),
        ]

    def _training_run(self, model: ModelRow) -> TrainingRun:
        checkpoints = self.backend.store.checkpoints_of_run(model.model_id)
        last = next((c for c in checkpoints if c.checkpoint_type == "training"), None)
        last_sampler = next((c for c in checkpoints if c.checkpoint_type == "sampler"), None)
        rank = model.lora_config.get("rank")
        return TrainingRun(
            training_run_id=model.model_id,
            base_model=model.base_model,
            model_owner=LOCAL_OWNER,
            is_lora=True,
            last_request_time=utc_datetime(model.last_request_time),
            corrupted=model.corrupted,
            lora_rank=int(rank) if rank is not None else None,
            last_checkpoint=self.backend.checkpoint_wire(last) if last else None,
            last_sampler_checkpoint=self.backend.checkpoint_wire(last_sampler)
            if last_sampler
            else None,
            user_metadata=model.user_metadata,
        )

    def _checkpoint(self, request: Request) -> CheckpointRow:
        """The live checkpoint named by the route's run_id and checkpoint_id, else 404."""
        return self.backend.checkpoint_or_404(
            request.params["run_id"], request.params["checkpoint_id"]
        )

    async def list_training_runs(self, request: Request) -> Response:
        limit = _int_query(request, "limit", DEFAULT_RUNS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = _int_query(request, "offset", 0, 0, 2**31)
        models, total = self.backend.store.list_models(limit=limit, offset=offset)
        return json_response(
            TrainingRunsResponse(
                training_runs=[self._training_run(m) for m in models],
                cursor=Cursor(offset=offset, limit=limit, total_count=total),
            )
        )

    async def get_training_run(self, request: Request) -> Response:
        return json_response(self._training_run(self.backend.model(request.params["run_id"])))

    async def run_checkpoints(self, request: Request) -> Response:
        run_id = request.params["run_id"]
        self.backend.model(run_id)
        rows = [
            c
            for c in self.backend.store.checkpoints_of_run(run_id)
            if self.backend.live_checkpoint(c.run_id, c.checkpoint_id) is not None
        ]
        return json_response(
            CheckpointsListResponse(checkpoints=[self.backend.checkpoint_wire(c) for c in rows])
        )

    async def list_checkpoints(self, request: Request) -> Response:
        limit = _int_query(request, "limit", DEFAULT_CHECKPOINTS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = _int_query(request, "offset", 0, 0, 2**31)
        self.backend.reap_expired()
        rows, total = self.backend.store.list_checkpoints(limit=limit, offset=offset)
        return json_response(
            CheckpointsListResponse(
                checkpoints=[self.backend.checkpoint_wire(c) for c in rows],
                cursor=Cursor(offset=offset, limit=limit, total_count=total),
            )
        )

    async def delete_checkpoint(self, request: Request) -> Response:
        ck = self._checkpoint(request)
        self.backend.remove_checkpoint(ck)
        return json_response({})

    async def publish(self, request: Request) -> Response:
        return self._set_public(request, True)

    async def unpublish(self, request: Request) -> Response:
        return self._set_public(request, False)

    def _set_public(self, request: Request, public: bool) -> Response:
        """Publish or unpublish; 409 if the checkpoint already is so (PROTOCOL.md 3.5)."""
        ck = self._checkpoint(request)
        if ck.public == public:
            state = "public" if public else "private"
            raise HTTPError(409, f"checkpoint {ck.tinker_path!r} is already {state}")
        self.backend.store.set_checkpoint_public(ck.run_id, ck.checkpoint_id, public)
        return json_response({})

    async def set_ttl(self, request: Request) -> Response:
        ck = self._checkpoint(request)
        body = decode_request(request.body, SetCheckpointTtlRequest)
        self.backend.store.set_checkpoint_expiry(
            ck.run_id, ck.checkpoint_id, self.backend.ttl_expiry(body.ttl_seconds)
        )
        return json_response({})

    async def archive_url(self, request: Request) -> Response:
        ck = self._checkpoint(request)
        token = archive_token(ck.run_id, ck.checkpoint_id, ck.created_at)
        error = self.backend.archives.error(token)
        if error is not None:
            raise HTTPError(500, error, category="server")
        if not self.backend.archives.ready(token):
            self.backend.archives.start(self.backend.nursery, token, Path(ck.path))
            raise HTTPError(
                503,
                f"the archive of {ck.tinker_path!r} is being built; retry shortly",
                category="server",
                headers={"retry-after": "1"},
            )
        expires = int(now() + ARCHIVE_URL_TTL)
        path = ARCHIVE_ROUTE_PREFIX + token
        location = f"{request.base_url()}{path}?expires={expires}&signature={sign(self.backend.settings.secret, path, expires)}"
        return Response(
            status=302,
            body=encode_json({"url": location}),
            headers={
                "location": location,
                "expires": format_datetime(utc_datetime(expires), usegmt=True),
            },
        )

    async def download(self, request: Request) -> StreamResponse:
        token = request.params["token"]
        path = ARCHIVE_ROUTE_PREFIX + token
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            raise HTTPError(403, "archive URL has no valid expires parameter") from None
        if not verify(
            self.backend.settings.secret, path, expires, request.query.get("signature", "")
        ):
            raise HTTPError(403, "archive URL signature does not match")
        if expires < now():
            raise HTTPError(410, "archive URL has expired; ask for a new one")
        file_path = self.backend.archives.path_for(token)
        try:
            handle = await trio.open_file(file_path, "rb")
        except FileNotFoundError:
            raise HTTPError(404, "archive no longer exists (checkpoint deleted?)") from None
        size = os.fstat(handle.fileno()).st_size

        async def chunks() -> AsyncIterator[bytes]:
            async with handle:
                while chunk := await handle.read(STREAM_CHUNK):
                    yield chunk

        return StreamResponse(
            status=200,
            chunks=chunks(),
            content_type="application/gzip",
            headers={
                "content-length": str(size),
                "content-disposition": f'attachment; filename="{token}"',
            },
        )

    async def weights_info(self, request: Request) -> Response:
        body = decode_request(request.body, WeightsInfoRequest)
        ck = self.backend.checkpoint_from_path(body.tinker_path, "tinker_path")
        model = self.backend.model(ck.run_id)
        lora = model.lora_config
        return json_response(
            WeightsInfoResponse(
                base_model=model.base_model,
                is_lora=True,
                lora_rank=lora.get("rank"),
                train_unembed=lora.get("train_unembed"),
                train_mlp=lora.get("train_mlp"),
                train_attn=lora.get("train_attn"),
                optimizer_config=model.optimizer_config,
            )
        )

    async def list_sessions(self, request: Request) -> Response:
        limit = _int_query(request, "limit", DEFAULT_RUNS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = _int_query(request, "offset", 0, 0, 2**31)
        ids, _total = self.backend.store.list_sessions(limit=limit, offset=offset)
        return json_response(ListSessionsResponse(sessions=ids))

    async def get_session(self, request: Request) -> Response:
        session_id = request.params["session_id"]
        session = self.backend.store.get_session(session_id)
        if session is None:
            raise HTTPError(404, f"unknown session_id {session_id!r}")
        return json_response(
            GetSessionResponse(
                training_run_ids=self.backend.store.models_of_session(session_id),
                sampler_ids=self.backend.store.samplers_of_session(session_id),
                user_metadata=session.user_metadata,
                display_name=session.display_name,
            )
        )
