"""Training endpoints (PROTOCOL.md 3.2, Appendix A.1): models, forward/backward, optimizer
steps, checkpoints.

Every request with a `seq_id` runs in its model's lane in `seq_id` order (PROTOCOL.md 5.2, 10.6);
`_submit_training` is the one path that dedups, validates and queues them.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import trio

from tinkex_trio import _protobuf
from tinkex_trio.types import (
    UNSET,
    CreateModelRequest,
    ForwardBackwardInput,
    ForwardBackwardRequest,
    ForwardRequest,
    GetInfoRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    ModelData,
    OptimStepRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    UnloadModelRequest,
    decode_request,
)

from . import _convert
from ._backend import (
    API,
    Backend,
    encode_json,
    hash_payload,
    now,
    or_none,
    run_dir_name,
)
from ._engine_api import Engine, EngineUserError
from ._http import (
    Handler,
    HTTPError,
    Request,
    Response,
    json_response,
)
from ._scheduler import JobFn
from ._store import CheckpointRow, ModelRow, SamplingSessionRow

T = TypeVar("T")

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


#: Checkpoint kind by tinker-path segment (PROTOCOL.md 5.4, 7.8).
_CHECKPOINT_TYPES: dict[str, Literal["training", "sampler", "external"]] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
#: PROTOCOL.md 3.2: at most this many age recipients on save_weights_external.
MAX_AGE_RECIPIENTS = 10


def _save_state(engine: Engine, adapter_id: str, directory: Path, with_optimizer: bool) -> int:
    return engine.save_state(adapter_id, directory, with_optimizer=with_optimizer)


def _load_state(
    engine: Engine, adapter_id: str, base_model: str, directory: Path, with_optimizer: bool
) -> Any:
    return engine.load_state(adapter_id, base_model, directory, with_optimizer=with_optimizer)


class TrainingRoutes:
    """The training endpoints; state and shared helpers live in `Backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{API}/create_model", self.create_model),
            ("POST", f"{API}/get_info", self.get_info),
            ("POST", f"{API}/forward", self.forward),
            ("POST", f"{API}/forward_backward", self.forward_backward),
            ("POST", f"{API}/optim_step", self.optim_step),
            ("POST", f"{API}/save_weights", self.save_weights),
            ("POST", f"{API}/save_weights_for_sampler", self.save_weights_for_sampler),
            ("POST", f"{API}/save_weights_external", self.save_weights_external),
            ("POST", f"{API}/load_weights", self.load_weights),
            ("POST", f"{API}/unload_model", self.unload_model),
        ]

    async def _submit_training(
        self,
        request: Request,
        *,
        model_id: str,
        seq_id: int | None,
        request_type: str,
        payload: object,
        prepare: Callable[[ModelRow], JobFn],
        allow_corrupted: bool = False,
    ) -> Response:
        """The common path of every seq_id-ordered training request (PROTOCOL.md 5.2).

        Dedup first (same payload → the original request id, different → 409), then checks
        and conversion via `prepare` (raising 4xx), then queue the job in the model's lane.
        Any 4xx after the model is known consumes the seq_id so later requests do not wait.
        """
        model = self.backend.model(model_id)
        self.backend.ensure_lane(model)
        payload_hash = hash_payload(payload)
        if seq_id is not None:
            earlier = self.backend.duplicate(
                model_id=model_id, sampler_id=None, seq_id=seq_id, payload_hash=payload_hash
            )
            if earlier is not None:
                await trio.lowlevel.checkpoint()
                return self.backend.future_response(earlier, model_id)
        try:
            if seq_id is not None and (
                seq_id < self.backend.lanes.next_seq(model_id)
                or self.backend.lanes.is_queued(model_id, seq_id)
            ):
                raise HTTPError(
                    400,
                    f"seq_id {seq_id} of {model_id!r} was already used; the next expected "
                    f"seq_id is {self.backend.lanes.next_seq(model_id)}",
                )
            if seq_id is not None and seq_id < 1:
                raise HTTPError(400, f"seq_id must be >= 1 (got {seq_id}); 0 is create_model")
            if model.unloaded:
                raise HTTPError(400, f"model {model_id!r} was unloaded; create a new one")
            if model.corrupted and not allow_corrupted:
                raise HTTPError(
                    400,
                    f"model {model_id!r} lost its in-memory state (the backend restarted or its "
                    "creation failed); create a training client from a saved checkpoint",
                )
            job = prepare(model)
        except (HTTPError, EngineUserError) as exc:
            if seq_id is not None:
                self.backend.lanes.consume(model_id, seq_id)
            if isinstance(exc, EngineUserError):
                raise HTTPError(400, str(exc)) from None
            raise
        request_id = self.backend.registry.create(
            request_type=request_type, payload_hash=payload_hash, model_id=model_id, seq_id=seq_id
        )
        self.backend.store.update_model(model_id, last_request_time=now())
        if seq_id is None:
            self.backend.lanes.submit_unsequenced(model_id, request_id, job)
        else:
            self.backend.lanes.submit(model_id, seq_id, request_id, job)
        await trio.lowlevel.checkpoint()
        return self.backend.future_response(request_id, model_id)

    def _protobuf_fwdbwd(self, request: Request) -> ForwardRequest | ForwardBackwardRequest:
        """A protobuf forward_backward body (PROTOCOL.md 6.2-6.3) as our JSON-form request.

        `forward_only` picks the forward form. Config values must be numbers (our losses take
        no text options). On a bad body the seq_id is consumed if it could be read.
        """
        body = request.body
        encoding = (request.header("content-encoding") or "").strip().lower()
        try:
            if encoding == _protobuf.ZSTD_ENCODING:
                body = _protobuf.decompress(body)
            elif encoding not in ("", "identity"):
                raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported; use zstd")
            decoded = _protobuf.decode_forward_backward_request(body)
        except ValueError as exc:
            raise HTTPError(400, f"invalid protobuf forward_backward body: {exc}") from None
        config: dict[str, float] = {}
        for key, value in decoded.loss_fn_config.items():
            if isinstance(value, str):
                if decoded.seq_id is not None:
                    self._consume(decoded.model_id, decoded.seq_id)
                raise HTTPError(400, f"loss_fn_config[{key!r}] must be a number, got {value!r}")
            config[key] = value
        fb_input = ForwardBackwardInput(
            data=decoded.data, loss_fn=decoded.loss_fn, loss_fn_config=config or UNSET
        )
        seq_id = UNSET if decoded.seq_id is None else decoded.seq_id
        if decoded.forward_only:
            return ForwardRequest(forward_input=fb_input, model_id=decoded.model_id, seq_id=seq_id)
        return ForwardBackwardRequest(
            forward_backward_input=fb_input, model_id=decoded.model_id, seq_id=seq_id
        )

    def _consume(self, model_id: str, seq_id: int) -> None:
        model = self.backend.store.get_model(model_id)
        if model is not None:
            self.backend.ensure_lane(model)
            self.backend.lanes.consume(model_id, seq_id)

    async def _training_body(self, request: Request, type_: type[T]) -> T:
        """Decode a seq_id-ordered body; on a 400 consume the seq_id if the ids are readable."""
        try:
            return decode_request(request.body, type_)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self._consume_from_raw(request.body)
            raise

    def _consume_from_raw(self, body: bytes) -> None:
        try:
            raw = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return
        if not isinstance(raw, dict):
            return
        model_id, seq_id = raw.get("model_id"), raw.get("seq_id")
        if isinstance(model_id, str) and isinstance(seq_id, int):
            self._consume(model_id, seq_id)

    async def create_model(self, request: Request) -> Response:
        body = decode_request(request.body, CreateModelRequest)
        self.backend.require_session(body.session_id)
        info = self.backend.model_info(body.base_model)
        spec = _convert.lora_spec(body.lora_config)
        family = body.optimizer_config.get("type", "adamw")
        if family not in ("adamw", "adam"):
            raise HTTPError(400, f"optimizer_config type {family!r} is not supported; use adamw")
        model_id = f"{body.session_id}:train:{body.model_seq_id}"

        async def job() -> bytes:
            await self.backend.runner.call(
                self.backend.runner.engine.create_adapter, model_id, info.name, spec
            )
            return encode_json({"model_id": model_id, "type": "create_model"})

        return self._submit_creation(
            body,
            model_id=model_id,
            session_id=body.session_id,
            model_seq_id=body.model_seq_id,
            base_model=info.name,
            lora_config=_convert.lora_config_dict(spec),
            optimizer_config=body.optimizer_config,
            user_metadata=or_none(body.user_metadata),
            request_type="CreateModel",
            job=job,
        )

    def _submit_creation(
        self,
        body: CreateModelRequest | LoadWeightsRequest,
        *,
        model_id: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora_config: dict[str, Any],
        optimizer_config: dict[str, Any],
        user_metadata: dict[str, str] | None,
        request_type: str,
        job: JobFn,
    ) -> Response:
        """The common path of the two requests that create a model, as its seq_id 0
        (create_model, and load_weights by session_id + model_seq_id; PROTOCOL.md 5.2).

        Dedup first (same payload: the original request id), then insert the model row, open
        its lane and queue `job`. If `job` fails the model is marked corrupted: it has no
        adapter in the engine, so later requests must not run against it.
        """
        payload_hash = hash_payload(body)
        earlier = self.backend.duplicate(
            model_id=model_id, sampler_id=None, seq_id=0, payload_hash=payload_hash
        )
        if earlier is not None:
            return self.backend.future_response(earlier, model_id)
        if self.backend.store.get_model(model_id) is not None:
            raise HTTPError(400, f"model {model_id!r} already exists (model_seq_id reused)")
        self.backend.store.insert_model(
            model_id=model_id,
            session_id=session_id,
            model_seq_id=model_seq_id,
            base_model=base_model,
            lora_config=lora_config,
            optimizer_config=optimizer_config,
            user_metadata=user_metadata,
            now=now(),
        )
        self.backend.lanes.open_lane(model_id, 0)
        request_id = self.backend.registry.create(
            request_type=request_type, payload_hash=payload_hash, model_id=model_id, seq_id=0
        )

        async def guarded_job() -> bytes:
            try:
                return await job()
            except BaseException:
                self.backend.store.update_model(model_id, corrupted=1)
                raise

        self.backend.lanes.submit(model_id, 0, request_id, guarded_job)
        return self.backend.future_response(request_id, model_id)

    async def get_info(self, request: Request) -> Response:
        body = decode_request(request.body, GetInfoRequest)
        model = self.backend.model(body.model_id)
        info = self.backend.models.get(model.base_model)
        return json_response(
            GetInfoResponse(
                model_id=model.model_id,
                model_data=ModelData(
                    arch=info.arch if info else None,
                    model_name=model.base_model,
                    tokenizer_id=info.tokenizer_id if info else None,
                ),
                optimizer_config=model.optimizer_config,
                is_lora=True,
                lora_rank=int(model.lora_config.get("rank", 0)) or None,
                model_name=model.base_model,
            )
        )

    async def forward(self, request: Request) -> Response:
        body = await self._training_body(request, ForwardRequest)
        return await self._forward_backward(
            request, body, body.forward_input, forward_only=True, request_type="Forward"
        )

    async def forward_backward(self, request: Request) -> Response:
        content_type = request.header("content-type") or ""
        if _protobuf.PROTOBUF_CONTENT_TYPE in content_type:
            # PROTOCOL.md 3.9: protobuf forward is forward_backward with forward_only set.
            proto_body = self._protobuf_fwdbwd(request)
            if isinstance(proto_body, ForwardRequest):
                return await self._forward_backward(
                    request,
                    proto_body,
                    proto_body.forward_input,
                    forward_only=True,
                    request_type="Forward",
                )
            return await self._forward_backward(
                request,
                proto_body,
                proto_body.forward_backward_input,
                forward_only=False,
                request_type="ForwardBackward",
            )
        body = await self._training_body(request, ForwardBackwardRequest)
        return await self._forward_backward(
            request,
            body,
            body.forward_backward_input,
            forward_only=False,
            request_type="ForwardBackward",
        )

    async def _forward_backward(
        self,
        request: Request,
        body: ForwardRequest | ForwardBackwardRequest,
        fb_input: Any,
        *,
        forward_only: bool,
        request_type: str,
    ) -> Response:
        def prepare(model: ModelRow) -> JobFn:
            info = self.backend.model_info(model.base_model)
            if not fb_input.data:
                raise EngineUserError("data is empty; send at least one datum")
            loss = _convert.loss_name(fb_input.loss_fn)
            config = _convert.loss_config(fb_input.loss_fn_config)
            arrays = [_convert.datum_arrays(d, i, info) for i, d in enumerate(fb_input.data)]

            async def job() -> bytes:
                result = await self.backend.runner.call(
                    self.backend.runner.engine.forward_backward,
                    model.model_id,
                    arrays,
                    loss,
                    config,
                    forward_only,
                )
                if len(result.logprobs) != len(arrays):
                    raise RuntimeError(
                        f"engine returned {len(result.logprobs)} outputs for {len(arrays)} datums"
                    )
                outputs = [
                    {
                        "logprobs": {
                            "data": lp.astype("float32").tolist(),
                            "dtype": "float32",
                            "shape": list(lp.shape),
                        }
                    }
                    for lp in result.logprobs
                ]
                # Built as a dict: all three keys must be present (PROTOCOL.md A.1.5).
                return encode_json(
                    {
                        "loss_fn_output_type": "ArrayRecord",
                        "loss_fn_outputs": outputs,
                        "metrics": {k: float(v) for k, v in result.metrics.items()},
                    }
                )

            return job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=or_none(body.seq_id),
            request_type=request_type,
            payload=body,
            prepare=prepare,
        )

    async def optim_step(self, request: Request) -> Response:
        body = await self._training_body(request, OptimStepRequest)

        def prepare(model: ModelRow) -> JobFn:
            step = _convert.adam_step(body.adam_params, body.optimizer_params)

            async def job() -> bytes:
                metrics = await self.backend.runner.call(
                    self.backend.runner.engine.optim_step, model.model_id, step
                )
                return encode_json({"metrics": {k: float(v) for k, v in metrics.items()}})

            return job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=or_none(body.seq_id),
            request_type="OptimStep",
            payload=body,
            prepare=prepare,
        )

    async def _write_checkpoint(
        self,
        model: ModelRow,
        segment: str,
        name: str,
        *,
        overwrite: bool,
        expires_at: float | None,
        user_metadata: dict[str, str] | None,
    ) -> CheckpointRow:
        """Save the model's adapter as a checkpoint (in the lane, i.e. in seq_id order)."""
        checkpoint_id = f"{segment}/{name}"
        existing = self.backend.live_checkpoint(model.model_id, checkpoint_id)
        if existing is not None and not overwrite:
            raise EngineUserError(
                f"checkpoint {checkpoint_id!r} already exists in {model.model_id!r}; "
                "pass overwrite=True to replace it"
            )
        final = self.backend.checkpoint_dir(model.model_id, checkpoint_id)
        tmp = final.with_name(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            size = await self.backend.runner.call(
                _save_state, self.backend.runner.engine, model.model_id, tmp, segment == "weights"
            )
            if existing is not None:
                self.backend.remove_checkpoint(existing)
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        row = CheckpointRow(
            run_id=model.model_id,
            checkpoint_id=checkpoint_id,
            checkpoint_type=_CHECKPOINT_TYPES[segment],
            created_at=now(),
            path=str(final),
            size_bytes=size,
            public=False,
            expires_at=expires_at,
            user_metadata=user_metadata,
        )
        self.backend.store.upsert_checkpoint(row)
        return row

    async def save_weights(self, request: Request) -> Response:
        body = await self._training_body(request, SaveWeightsRequest)

        def prepare(model: ModelRow) -> JobFn:
            name = _check_name(body.path, "path")
            expires_at = self.backend.ttl_expiry(or_none(body.ttl_seconds))
            if not body.overwrite and self.backend.live_checkpoint(
                model.model_id, f"weights/{name}"
            ):
                raise HTTPError(
                    400,
                    f"checkpoint 'weights/{name}' already exists in {model.model_id!r}; "
                    "pass overwrite=True to replace it",
                )

            async def job() -> bytes:
                row = await self._write_checkpoint(
                    model,
                    "weights",
                    name,
                    overwrite=body.overwrite,
                    expires_at=expires_at,
                    user_metadata=or_none(body.user_metadata),
                )
                return encode_json({"path": row.tinker_path, "type": "save_weights"})

            return job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=or_none(body.seq_id),
            request_type="SaveWeights",
            payload=body,
            prepare=prepare,
        )

    async def save_weights_for_sampler(self, request: Request) -> Response:
        body = await self._training_body(request, SaveWeightsForSamplerRequest)

        def prepare(model: ModelRow) -> JobFn:
            expires_at = self.backend.ttl_expiry(or_none(body.ttl_seconds))
            if body.path is not UNSET:
                name = _check_name(body.path, "path")

                async def named_job() -> bytes:
                    row = await self._write_checkpoint(
                        model,
                        "sampler_weights",
                        name,
                        overwrite=True,
                        expires_at=expires_at,
                        user_metadata=or_none(body.user_metadata),
                    )
                    return encode_json(
                        {"path": row.tinker_path, "type": "save_weights_for_sampler"}
                    )

                return named_job
            if body.sampling_session_seq_id is UNSET:
                raise HTTPError(
                    400, "save_weights_for_sampler needs path or sampling_session_seq_id"
                )
            sampler_id = f"{model.session_id}:sample:{body.sampling_session_seq_id}"
            if self.backend.store.get_sampling_session(sampler_id) is not None:
                raise HTTPError(
                    400,
                    f"sampling session {sampler_id!r} already exists (sampling_session_seq_id reused)",
                )

            async def unnamed_job() -> bytes:
                target = self.backend.settings.data_dir / "ephemeral" / run_dir_name(sampler_id)
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                await self.backend.runner.call(
                    _save_state, self.backend.runner.engine, model.model_id, target, False
                )
                self.backend.store.insert_sampling_session(
                    SamplingSessionRow(
                        sampling_session_id=sampler_id,
                        session_id=model.session_id,
                        base_model=model.base_model,
                        model_path=None,
                        adapter_dir=str(target),
                        created_at=now(),
                    )
                )
                # No `path` here: the client asserts it is absent (PROTOCOL.md A.3.8).
                return encode_json(
                    {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
                )

            return unnamed_job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=or_none(body.seq_id),
            request_type="SaveWeightsForSampler",
            payload=body,
            prepare=prepare,
        )

    async def save_weights_external(self, request: Request) -> Response:
        """Write `external_weights/<name>`: the PEFT adapter files only (no optimizer state),
        for download through signed per-file URLs (`external_weights_urls`). An existing
        export of the same name is replaced (the download flow of PROTOCOL.md 9.10 reuses one
        name). Encryption to age recipients is not implemented: such requests get a 400 rather
        than unencrypted files the caller believes are encrypted.
        """
        body = await self._training_body(request, SaveWeightsExternalRequest)

        def prepare(model: ModelRow) -> JobFn:
            name = _check_name(body.path, "path")
            expires_at = self.backend.ttl_expiry(or_none(body.ttl_seconds))
            recipients = or_none(body.age_encryption_recipients)
            if recipients is not None and len(recipients) > MAX_AGE_RECIPIENTS:
                raise HTTPError(
                    400,
                    f"age_encryption_recipients holds {len(recipients)} keys; at most "
                    f"{MAX_AGE_RECIPIENTS} are allowed",
                )
            if recipients:
                raise HTTPError(
                    400,
                    "age_encryption_recipients is not supported by the local backend; "
                    "omit it (files are stored unencrypted)",
                )

            async def job() -> bytes:
                row = await self._write_checkpoint(
                    model,
                    "external_weights",
                    name,
                    overwrite=True,
                    expires_at=expires_at,
                    user_metadata=None,
                )
                return encode_json(
                    {
                        "path": row.tinker_path,
                        "size_bytes": row.size_bytes,
                        "type": "save_weights_external",
                    }
                )

            return job

        return await self._submit_training(
            request,
            model_id=body.model_id,
            seq_id=or_none(body.seq_id),
            request_type="SaveWeightsExternal",
            payload=body,
            prepare=prepare,
        )

    async def load_weights(self, request: Request) -> Response:
        body = await self._training_body(request, LoadWeightsRequest)
        if body.model_id is not UNSET:
            return await self._load_in_place(request, body)
        if body.session_id is UNSET or body.model_seq_id is UNSET:
            raise HTTPError(
                400, "load_weights needs model_id (+ seq_id), or session_id + model_seq_id"
            )
        self.backend.require_session(body.session_id)
        ck = self.backend.checkpoint_from_path(body.path, "path")
        if body.optimizer and ck.checkpoint_type != "training":
            raise HTTPError(
                400,
                f"{body.path!r} is a sampler checkpoint and has no optimizer state; "
                "load it with optimizer=False",
            )
        source = self.backend.model(ck.run_id)
        base_model = source.base_model
        if body.base_model is not UNSET and body.base_model != base_model:
            raise HTTPError(
                400,
                f"base_model {body.base_model!r} does not match the checkpoint's {base_model!r}",
            )
        self.backend.model_info(base_model)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        directory = Path(ck.path)
        optimizer = body.optimizer
        path = body.path

        async def job() -> bytes:
            spec = await self.backend.runner.call(
                _load_state,
                self.backend.runner.engine,
                model_id,
                base_model,
                directory,
                optimizer,
            )
            self.backend.store.update_model(model_id, lora_config=_convert.lora_config_dict(spec))
            return encode_json({"path": path, "model_id": model_id, "type": "load_weights"})

        return self._submit_creation(
            body,
            model_id=model_id,
            session_id=body.session_id,
            model_seq_id=body.model_seq_id,
            base_model=base_model,
            lora_config=source.lora_config,
            optimizer_config=source.optimizer_config,
            user_metadata=or_none(body.user_metadata),
            request_type="LoadWeights",
            job=job,
        )

    async def _load_in_place(self, request: Request, body: LoadWeightsRequest) -> Response:
        model_id = str(body.model_id)

        def prepare(model: ModelRow) -> JobFn:
            ck = self.backend.checkpoint_from_path(body.path, "path")
            if body.optimizer and ck.checkpoint_type != "training":
                raise HTTPError(400, f"{body.path!r} is a sampler checkpoint; use optimizer=False")
            source = self.backend.store.get_model(ck.run_id)
            if source is not None and source.base_model != model.base_model:
                raise HTTPError(
                    400,
                    f"checkpoint base model {source.base_model!r} differs from the model's "
                    f"{model.base_model!r}",
                )
            directory, optimizer = Path(ck.path), body.optimizer

            async def job() -> bytes:
                spec = await self.backend.runner.call(
                    _load_state,
                    self.backend.runner.engine,
                    model_id,
                    model.base_model,
                    directory,
                    optimizer,
                )
                self.backend.store.update_model(
                    model_id, lora_config=_convert.lora_config_dict(spec), corrupted=0
                )
                return encode_json(
                    {"path": body.path, "model_id": model_id, "type": "load_weights"}
                )

            return job

        return await self._submit_training(
            request,
            model_id=model_id,
            seq_id=or_none(body.seq_id),
            request_type="LoadWeights",
            payload=body,
            prepare=prepare,
            allow_corrupted=True,
        )

    async def unload_model(self, request: Request) -> Response:
        body = decode_request(request.body, UnloadModelRequest)
        model_id = body.model_id

        def prepare(model: ModelRow) -> JobFn:
            async def job() -> bytes:
                if not model.corrupted:
                    await self.backend.runner.call(
                        self.backend.runner.engine.drop_adapter, model_id
                    )
                self.backend.store.update_model(model_id, unloaded=1)
                return encode_json({"model_id": model_id, "type": "unload_model"})

            return job

        return await self._submit_training(
            request,
            model_id=model_id,
            seq_id=None,
            request_type="UnloadModel",
            payload=body,
            prepare=prepare,
            allow_corrupted=True,
        )
