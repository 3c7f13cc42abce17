"""Checkpoints: the saves (save_weights, save_weights_for_sampler, save_weights_external;
PROTOCOL.md 3.2), their REST endpoints (listing, delete, publish, TTL, weights_info; 3.5),
archive downloads (A.4), external-weights file URLs (3.5, 9.10) and copy_weights (3.5).

Files, rows and expiry belong to `Checkpoints` (`_checkpoints.py`); these handlers check the
request and ask it. The saves are training requests: they run in the model's lane, in
`seq_id` order (`_submit.py`).

External weights: `external_weights_urls` hands out one signed URL per file of the checkpoint,
`/external_files/<run>/<name>/<version>/<file>?expires=&signature=` (`_signed_urls.py`), served
by this server. `<version>` names one save of the checkpoint, so a URL stops working (404) once
the export is overwritten or deleted.

copy_weights: the copy is a new training run `copy-<hex>:train:0` in a new, already finished
session (tagged `copy_weights`, in the destination project) sharing the source's files, keeping
the checkpoint kind and name. The run is untrainable (it has no engine state; training requests
get a 400). The `X-Tinker-Weights-Access-Token` header is accepted and ignored: the local backend
has one user, who may read every checkpoint, so there is nothing for a token to unlock; it is
never stored or logged. Retries carrying the same `X-Idempotency-Key` get the first copy back
instead of a second one.
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from email.utils import format_datetime
from typing import Final

import trio

from tinkex_trio.types import (
    UNSET,
    CheckpointArchiveUrlResponse,
    CheckpointsListResponse,
    CopyWeightsRequest,
    CopyWeightsResponse,
    Cursor,
    EmptyResponse,
    ExternalWeightsUrlsResponse,
    SaveWeightsExternalRequest,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerRequest,
    SaveWeightsForSamplerResponse,
    SaveWeightsRequest,
    SaveWeightsResponse,
    SetCheckpointTtlRequest,
    WeightsInfoRequest,
    WeightsInfoResponse,
    decode_request,
)

from ._age_export import encryptor, parse_recipients
from ._archive import ARCHIVE_ROUTE_PREFIX
from ._backend import API, MAX_PAGE_LIMIT, Backend, now
from ._checkpoints import utc_datetime
from ._convert import or_none
from ._http import (
    Handler,
    HTTPError,
    Request,
    Response,
    StreamResponse,
    file_response,
    int_query,
    json_response,
)
from ._scheduler import JobFn
from ._store import CheckpointRow, ModelRow, SamplingSessionRow
from ._submit import TrainingSubmitter

_RUN = r"(?P<run_id>[^/]+)"
_CKPT = r"(?P<checkpoint_id>(?:weights|sampler_weights|external_weights)/[^/]+)"
_EXTERNAL = r"(?P<checkpoint_id>external_weights/[^/]+)"
EXTERNAL_FILES_PREFIX: Final = "/external_files/"
#: Idempotency keys of recent copy_weights calls remembered (with their answers), so a retried
#: copy returns the first copy. In memory only: a restart forgets them.
COPY_IDEMPOTENCY_MEMORY: Final = 1024
#: Default page size of the checkpoint listing (PROTOCOL.md 3.5).
DEFAULT_CHECKPOINTS_LIMIT: Final = 100
#: Checkpoint names become one path segment of a `tinker://` path (PROTOCOL.md 5.4): no `/`.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-]{0,199}")


def _check_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise HTTPError(
            400,
            f"{what} {name!r} is not a valid checkpoint name: use letters, digits, '.', '_' and "
            "'-' (no '/'), at most 200 characters",
        )
    return name


class CheckpointRoutes:
    """The checkpoint endpoints; checkpoint state lives in `Backend.checkpoints`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.checkpoints = backend.checkpoints
        self.submitter = TrainingSubmitter(backend)
        self._copies: OrderedDict[str, CopyWeightsResponse] = OrderedDict()

    def routes(self) -> list[tuple[str, str, Handler]]:
        checkpoint = f"{API}/training_runs/{_RUN}/checkpoints/{_CKPT}"
        return [
            ("POST", f"{API}/save_weights", self.save_weights),
            ("POST", f"{API}/save_weights_for_sampler", self.save_weights_for_sampler),
            ("POST", f"{API}/save_weights_external", self.save_weights_external),
            ("GET", f"{API}/training_runs/{_RUN}/checkpoints", self.run_checkpoints),
            ("GET", f"{API}/checkpoints", self.list_checkpoints),
            ("DELETE", checkpoint, self.delete_checkpoint),
            ("POST", f"{checkpoint}/publish", self.publish),
            ("DELETE", f"{checkpoint}/publish", self.unpublish),
            ("PUT", f"{checkpoint}/ttl", self.set_ttl),
            ("GET", f"{checkpoint}/archive", self.archive_url),
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
            ("POST", f"{API}/weights_info", self.weights_info),
        ]

    def _checkpoint(self, request: Request) -> CheckpointRow:
        """The live checkpoint named by the route's run_id and checkpoint_id, else 404."""
        return self.checkpoints.get(request.params["run_id"], request.params["checkpoint_id"])

    # ------------------------------------------------------------------- saves

    async def save_weights(self, request: Request) -> Response:
        body = self.submitter.decode(request, SaveWeightsRequest)
        checkpoints = self.checkpoints

        def prepare(model: ModelRow) -> JobFn:
            name = _check_name(body.path, "path")
            expires_at = checkpoints.expiry(or_none(body.ttl_seconds))
            if not body.overwrite and checkpoints.live(model.model_id, f"weights/{name}"):
                raise HTTPError(
                    400,
                    f"checkpoint 'weights/{name}' already exists in {model.model_id!r}; "
                    "pass overwrite=True to replace it",
                )

            async def job() -> SaveWeightsResponse:
                row = await checkpoints.save(
                    model,
                    "weights",
                    name,
                    overwrite=body.overwrite,
                    expires_at=expires_at,
                    user_metadata=or_none(body.user_metadata),
                )
                return SaveWeightsResponse(path=row.tinker_path)

            return job

        return await self.submitter.submit(body, "SaveWeights", prepare)

    async def save_weights_for_sampler(self, request: Request) -> Response:
        body = self.submitter.decode(request, SaveWeightsForSamplerRequest)
        checkpoints, store = self.checkpoints, self.backend.store

        def prepare(model: ModelRow) -> JobFn:
            expires_at = checkpoints.expiry(or_none(body.ttl_seconds))
            if body.path is not UNSET:
                name = _check_name(body.path, "path")

                async def named_job() -> SaveWeightsForSamplerResponse:
                    row = await checkpoints.save(
                        model,
                        "sampler_weights",
                        name,
                        overwrite=True,
                        expires_at=expires_at,
                        user_metadata=or_none(body.user_metadata),
                    )
                    return SaveWeightsForSamplerResponse(path=row.tinker_path)

                return named_job
            if body.sampling_session_seq_id is UNSET:
                raise HTTPError(
                    400, "save_weights_for_sampler needs path or sampling_session_seq_id"
                )
            sampler_id = f"{model.session_id}:sample:{body.sampling_session_seq_id}"
            if store.get_sampling_session(sampler_id) is not None:
                raise HTTPError(
                    400,
                    f"sampling session {sampler_id!r} already exists (sampling_session_seq_id reused)",
                )

            async def unnamed_job() -> SaveWeightsForSamplerResponse:
                directory = await checkpoints.save_for_sampler(model, sampler_id)
                store.insert_sampling_session(
                    SamplingSessionRow(
                        sampling_session_id=sampler_id,
                        session_id=model.session_id,
                        base_model=model.base_model,
                        model_path=None,
                        adapter_dir=str(directory),
                        created_at=now(),
                    )
                )
                # `path` stays null: a 0.15 client asserts it is (PROTOCOL.md A.3.8).
                return SaveWeightsForSamplerResponse(sampling_session_id=sampler_id)

            return unnamed_job

        return await self.submitter.submit(body, "SaveWeightsForSampler", prepare)

    async def save_weights_external(self, request: Request) -> Response:
        """Write `external_weights/<name>`: the PEFT adapter files only (no optimizer state),
        for download through signed per-file URLs (`external_weights_urls`). An existing
        export of the same name is replaced (the download flow of PROTOCOL.md 9.10 reuses one
        name). With `age_encryption_recipients`, every file is stored (and served) as
        `<file>.age`, encrypted to all of them (`_age_export.py`); an empty list means none.
        """
        body = self.submitter.decode(request, SaveWeightsExternalRequest)
        checkpoints = self.checkpoints

        def prepare(model: ModelRow) -> JobFn:
            name = _check_name(body.path, "path")
            expires_at = checkpoints.expiry(or_none(body.ttl_seconds))
            recipients = parse_recipients(or_none(body.age_encryption_recipients) or [])
            transform = encryptor(recipients) if recipients else None

            async def job() -> SaveWeightsExternalResponse:
                row = await checkpoints.save(
                    model,
                    "external_weights",
                    name,
                    overwrite=True,
                    expires_at=expires_at,
                    user_metadata=None,
                    transform=transform,
                )
                return SaveWeightsExternalResponse(path=row.tinker_path, size_bytes=row.size_bytes)

            return job

        return await self.submitter.submit(body, "SaveWeightsExternal", prepare)

    # -------------------------------------------------------------------- REST

    async def run_checkpoints(self, request: Request) -> Response:
        run_id = request.params["run_id"]
        self.backend.model(run_id)
        rows = self.checkpoints.of_run(run_id)
        return json_response(
            CheckpointsListResponse(checkpoints=[self.checkpoints.wire(c) for c in rows])
        )

    async def list_checkpoints(self, request: Request) -> Response:
        limit = int_query(request, "limit", DEFAULT_CHECKPOINTS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = int_query(request, "offset", 0, 0, 2**31)
        rows, total = self.checkpoints.page(limit=limit, offset=offset)
        return json_response(
            CheckpointsListResponse(
                checkpoints=[self.checkpoints.wire(c) for c in rows],
                cursor=Cursor(offset=offset, limit=limit, total_count=total),
            )
        )

    async def delete_checkpoint(self, request: Request) -> Response:
        self.checkpoints.remove(self._checkpoint(request))
        return json_response(EmptyResponse())

    async def publish(self, request: Request) -> Response:
        self.checkpoints.set_public(self._checkpoint(request), True)
        return json_response(EmptyResponse())

    async def unpublish(self, request: Request) -> Response:
        self.checkpoints.set_public(self._checkpoint(request), False)
        return json_response(EmptyResponse())

    async def set_ttl(self, request: Request) -> Response:
        ck = self._checkpoint(request)
        body = decode_request(request.body, SetCheckpointTtlRequest)
        self.checkpoints.set_expiry(ck, self.checkpoints.expiry(body.ttl_seconds))
        return json_response(EmptyResponse())

    async def weights_info(self, request: Request) -> Response:
        body = decode_request(request.body, WeightsInfoRequest)
        ck = self.checkpoints.from_path(body.tinker_path, "tinker_path")
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

    # ---------------------------------------------------------------- archives

    async def archive_url(self, request: Request) -> Response:
        """302 to the signed archive URL once built; 503 while building (PROTOCOL.md A.4.2)."""
        ck = self._checkpoint(request)
        token = self.checkpoints.version(ck)
        archives = self.checkpoints.archives
        error = archives.error(token)
        if error is not None:
            raise HTTPError(500, error, category="server")
        if not archives.ready(token):
            self.checkpoints.start_archive(self.backend.nursery, ck)
            raise HTTPError(
                503,
                f"the archive of {ck.tinker_path!r} is being built; retry shortly",
                category="server",
                headers={"retry-after": "1"},
            )
        expires = self.backend.urls.expiry()
        location = self.backend.urls.make(request.base_url(), ARCHIVE_ROUTE_PREFIX + token, expires)
        self._audit_read(ck, file="archive")
        return json_response(
            CheckpointArchiveUrlResponse(url=location, expires=utc_datetime(expires)),
            status=302,
            headers={
                "location": location,
                "expires": format_datetime(utc_datetime(expires), usegmt=True),
            },
        )

    async def download(self, request: Request) -> StreamResponse:
        token = request.params["token"]
        self.backend.urls.check(
            request, ARCHIVE_ROUTE_PREFIX + token, what="archive", renew="ask for a new one"
        )
        try:
            handle = await trio.open_file(self.checkpoints.archives.path_for(token), "rb")
        except FileNotFoundError:
            raise HTTPError(404, "archive no longer exists (checkpoint deleted?)") from None
        return file_response(
            handle,
            "application/gzip",
            {"content-disposition": f'attachment; filename="{token}"'},
        )

    # -------------------------------------------------------- external weights

    async def external_weights_urls(self, request: Request) -> Response:
        ck = self._checkpoint(request)
        files = await self.checkpoints.file_names(ck)
        expires = self.backend.urls.expiry()
        name = ck.checkpoint_id.split("/", 1)[1]
        version = self.checkpoints.version(ck)[:16]
        base = request.base_url()
        urls = {
            file: self.backend.urls.make(
                base, f"{EXTERNAL_FILES_PREFIX}{ck.run_id}/{name}/{version}/{file}", expires
            )
            for file in files
        }
        return json_response(ExternalWeightsUrlsResponse(urls=urls, expires=utc_datetime(expires)))

    async def external_file(self, request: Request) -> StreamResponse:
        """One file of an external_weights checkpoint, for a signed URL (no API key needed)."""
        params = request.params
        path = (
            f"{EXTERNAL_FILES_PREFIX}{params['run_id']}/{params['name']}/{params['version']}"
            f"/{params['file']}"
        )
        self.backend.urls.check(
            request, path, what="file", renew="ask for new external_weights_urls"
        )
        ck = self.checkpoints.live(params["run_id"], f"external_weights/{params['name']}")
        if ck is None or self.checkpoints.version(ck)[:16] != params["version"]:
            raise HTTPError(404, "this export no longer exists (deleted or overwritten)")
        file_path = self.checkpoints.file(ck, params["file"])
        if file_path is None:
            raise HTTPError(404, f"no file {params['file']!r} in this export")
        handle = await trio.open_file(file_path, "rb")
        self._audit_read(ck, file=params["file"])
        return file_response(handle, "application/octet-stream")

    def _audit_read(self, ck: CheckpointRow, **details: str) -> None:
        """A `checkpoint_read` audit event (PROTOCOL.md 3.6): someone fetched its files."""
        self.backend.store.record_event(
            "checkpoint_read",
            {"training_run_id": ck.run_id, "checkpoint_id": ck.checkpoint_id, **details},
            model_id=ck.run_id,
            tinker_path=ck.tinker_path,
            purpose="download",
        )

    # ------------------------------------------------------------------ copies

    async def copy_weights(self, request: Request) -> Response:
        # The X-Tinker-Weights-Access-Token header is deliberately not read (module docstring).
        key = request.header("x-idempotency-key")
        if key is not None and key in self._copies:
            await trio.lowlevel.checkpoint()
            return json_response(self._copies[key])
        body = decode_request(request.body, CopyWeightsRequest)
        ck = self.checkpoints.from_path(body.source_path, "source_path", allow_external=True)
        source = self.backend.model(ck.run_id)
        expires_at = self.checkpoints.expiry(or_none(body.ttl_seconds))
        project_id = or_none(body.destination_project_id)
        if project_id is not None and not project_id:
            raise HTTPError(400, "destination_project_id must not be empty")
        if project_id is None and body.session_id is not UNSET:
            project_id = self.backend.session(body.session_id).project_id
        session_id = f"copy-{uuid.uuid4().hex[:16]}"
        run_id = f"{session_id}:train:0"
        copy = await self.checkpoints.copy(ck, run_id, expires_at=expires_at)
        store, stamp = self.backend.store, copy.created_at
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
        answer = CopyWeightsResponse(tinker_path=copy.tinker_path)
        if key is not None:
            self._copies[key] = answer
            while len(self._copies) > COPY_IDEMPOTENCY_MEMORY:
                self._copies.popitem(last=False)
        return json_response(answer)
