"""REST endpoints (PROTOCOL.md 3.5, A.4): training runs, checkpoints (publish, TTL, signed
archive downloads, external-weights URLs, copies), weights info and sessions. All answer
directly (no futures). The session-level extras (project, trace export, search) live in
`_routes_session_rest.py` and are routed from here.

External weights (PROTOCOL.md 3.5, 9.10): `external_weights_urls` hands out one signed URL per
file of the checkpoint, `/external_files/<run>/<name>/<version>/<file>?expires=&signature=`,
signed like the archive URLs (HMAC-SHA256 of path and expiry with the server secret) and
served by this server. `<version>` names one save of the checkpoint, so a URL stops working
(404) once the export is overwritten or deleted.

copy_weights: the copy is a new training run `copy-<hex>:train:0` in a new, already finished
session (tagged `copy_weights`, in the destination project) whose files are hard links to the
source's (shared storage; copied only where linking fails), keeping the checkpoint kind and
name. The run is untrainable (it has no engine state; training requests get a 400). The
`X-Tinker-Weights-Access-Token` header is accepted and ignored: the local backend has one
user, who may read every checkpoint, so there is nothing for a token to unlock; it is never
stored or logged. Retries carrying the same `X-Idempotency-Key` get the first copy back
instead of a second one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import OrderedDict
from email.utils import format_datetime
from pathlib import Path

import trio

from tinkex_trio.types import (
    UNSET,
    CheckpointsListResponse,
    CopyWeightsRequest,
    CopyWeightsResponse,
    Cursor,
    ExternalWeightsUrlsResponse,
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
    archive_token,
)
from ._backend import (
    API,
    Backend,
    encode_json,
    file_response,
    now,
    or_none,
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
from ._routes_session_rest import LOCAL_OWNER, SessionRestRoutes
from ._store import CheckpointRow, ModelRow

_RUN = r"(?P<run_id>[^/]+)"
_CKPT = r"(?P<checkpoint_id>(?:weights|sampler_weights|external_weights)/[^/]+)"
_EXTERNAL = r"(?P<checkpoint_id>external_weights/[^/]+)"
EXTERNAL_FILES_PREFIX = "/external_files/"
#: Lifetime of signed external-weights file URLs: as for archives. The downloader re-signs
#: when within 5 minutes of `expires` (PROTOCOL.md 9.10).
EXTERNAL_URL_TTL = ARCHIVE_URL_TTL
#: Idempotency keys of recent copy_weights calls remembered (with their answers), so a retried
#: copy returns the first copy. In memory only: a restart forgets them.
COPY_IDEMPOTENCY_MEMORY = 1024
#: Default and largest page sizes of the REST listings (PROTOCOL.md 3.5).
DEFAULT_RUNS_LIMIT = 20
DEFAULT_CHECKPOINTS_LIMIT = 100
MAX_PAGE_LIMIT = 1000


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
        self._copies: OrderedDict[str, bytes] = OrderedDict()

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
            (
                "GET",
                f"{API}/training_runs/{_RUN}/checkpoints/{_EXTERNAL}/external_weights_urls",
                self.external_weights_urls,
            ),
            (
                "GET",
                f"{EXTERNAL_FILES_PREFIX}{_RUN}/(?P<name>[^/]+)/(?P<version>[0-9a-f]{{16}})"
                "/(?P<file>[^/]+)",
                self.external_file,
            ),
            ("POST", f"{API}/copy_weights", self.copy_weights),
            *SessionRestRoutes(self.backend).routes(),
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
        location = self.backend.signed_url(request.base_url(), path, expires)
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
        self.backend.check_signed_url(request, path, what="archive", renew="ask for a new one")
        file_path = self.backend.archives.path_for(token)
        try:
            handle = await trio.open_file(file_path, "rb")
        except FileNotFoundError:
            raise HTTPError(404, "archive no longer exists (checkpoint deleted?)") from None
        return file_response(
            handle,
            "application/gzip",
            {"content-disposition": f'attachment; filename="{token}"'},
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

    # ------------------------------------------------------------ external weights

    async def external_weights_urls(self, request: Request) -> Response:
        ck = self._checkpoint(request)
        files = await trio.to_thread.run_sync(_regular_files, Path(ck.path))
        expires = int(now() + EXTERNAL_URL_TTL)
        name = ck.checkpoint_id.split("/", 1)[1]
        version = archive_token(ck.run_id, ck.checkpoint_id, ck.created_at)[:16]
        base = request.base_url()
        urls: dict[str, str] = {}
        for file in files:
            path = f"{EXTERNAL_FILES_PREFIX}{ck.run_id}/{name}/{version}/{file}"
            urls[file] = self.backend.signed_url(base, path, expires)
        return json_response(ExternalWeightsUrlsResponse(urls=urls, expires=utc_datetime(expires)))

    async def external_file(self, request: Request) -> StreamResponse:
        """One file of an external_weights checkpoint, for a signed URL (no API key needed)."""
        params = request.params
        path = (
            f"{EXTERNAL_FILES_PREFIX}{params['run_id']}/{params['name']}/{params['version']}"
            f"/{params['file']}"
        )
        self.backend.check_signed_url(
            request, path, what="file", renew="ask for new external_weights_urls"
        )
        ck = self.backend.live_checkpoint(params["run_id"], f"external_weights/{params['name']}")
        if (
            ck is None
            or archive_token(ck.run_id, ck.checkpoint_id, ck.created_at)[:16] != params["version"]
        ):
            raise HTTPError(404, "this export no longer exists (deleted or overwritten)")
        file_path = Path(ck.path) / params["file"]
        if params["file"] in (".", "..") or file_path.is_symlink() or not file_path.is_file():
            raise HTTPError(404, f"no file {params['file']!r} in this export")
        return file_response(await trio.open_file(file_path, "rb"), "application/octet-stream")

    # ------------------------------------------------------------------- copies

    async def copy_weights(self, request: Request) -> Response:
        # The X-Tinker-Weights-Access-Token header is deliberately not read (module docstring).
        key = request.header("x-idempotency-key")
        if key is not None and key in self._copies:
            await trio.lowlevel.checkpoint()
            return Response(body=self._copies[key])
        body = decode_request(request.body, CopyWeightsRequest)
        ck = self.backend.checkpoint_from_path(body.source_path, "source_path", allow_external=True)
        source = self.backend.model(ck.run_id)
        expires_at = self.backend.ttl_expiry(or_none(body.ttl_seconds))
        project_id = or_none(body.destination_project_id)
        if project_id is not None and not project_id:
            raise HTTPError(400, "destination_project_id must not be empty")
        if project_id is None and body.session_id is not UNSET:
            owner = self.backend.store.get_session(body.session_id)
            if owner is None:
                raise HTTPError(404, f"unknown session_id {body.session_id!r}")
            project_id = owner.project_id
        stamp = now()
        session_id = f"copy-{uuid.uuid4().hex[:16]}"
        run_id = f"{session_id}:train:0"
        target = self.backend.checkpoint_dir(run_id, ck.checkpoint_id)
        try:
            await trio.to_thread.run_sync(_link_tree, Path(ck.path), target)
        except OSError as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise HTTPError(
                500, f"could not copy the checkpoint files: {exc}", category="server"
            ) from None
        store = self.backend.store
        store.insert_session(
            session_id,
            created_at=stamp,
            tags=["copy_weights"],
            user_metadata=None,
            project_id=project_id,
            display_name=f"copy of {ck.tinker_path}",
            sdk_version=None,
        )
        store.finish_session(session_id, "success")
        store.insert_model(
            model_id=run_id,
            session_id=session_id,
            model_seq_id=0,
            base_model=source.base_model,
            lora_config=source.lora_config,
            optimizer_config=source.optimizer_config,
            user_metadata=source.user_metadata,
            now=stamp,
        )
        # Untrainable: no adapter in the engine, so training requests are refused (400).
        store.update_model(run_id, unloaded=1)
        copy = CheckpointRow(
            run_id=run_id,
            checkpoint_id=ck.checkpoint_id,
            checkpoint_type=ck.checkpoint_type,
            created_at=stamp,
            path=str(target),
            size_bytes=ck.size_bytes,
            public=False,
            expires_at=expires_at,
            user_metadata=ck.user_metadata,
        )
        store.upsert_checkpoint(copy)
        answer = encode_json(CopyWeightsResponse(tinker_path=copy.tinker_path))
        if key is not None:
            self._copies[key] = answer
            while len(self._copies) > COPY_IDEMPOTENCY_MEMORY:
                self._copies.popitem(last=False)
        return Response(body=answer)


def _regular_files(directory: Path) -> list[str]:
    """Names of the regular files directly in `directory` (no links, no subdirectories)."""
    return sorted(p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink())


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link the regular files of `source` into a new `target` (copy where linking fails).

    Links share the bytes on disk while letting either checkpoint be deleted on its own.
    """
    target.mkdir(parents=True, exist_ok=False)
    for entry in source.iterdir():
        if entry.is_symlink() or not entry.is_file():
            continue
        try:
            os.link(entry, target / entry.name)
        except OSError:
            shutil.copy2(entry, target / entry.name)
