"""Training runs (models): create_model, get_info, forward, forward_backward, optim_step,
load_weights, unload_model (PROTOCOL.md 3.2, A.1), and the training-run listing (3.5).

Every request with a `seq_id` goes through `TrainingSubmitter` (`_submit.py`) into its model's
lane; saves are checkpoint routes (`_routes_checkpoints.py`). forward_backward accepts the JSON
body of A.1 and the protobuf body of 6.2 (zstd or not); forward is its own JSON endpoint, or
protobuf forward_backward with `forward_only`. `loss_fn: "custom"` (a stored server-side
custom loss) is handed to `_routes_custom_loss.custom_job`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tinkex_trio import _protobuf
from tinkex_trio.types import (
    UNSET,
    CreateModelRequest,
    CreateModelResponse,
    Cursor,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    ForwardBackwardRequest,
    ForwardRequest,
    GetInfoRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    LoadWeightsResponse,
    ModelData,
    OptimStepRequest,
    OptimStepResponse,
    TensorData,
    TrainingRun,
    TrainingRunsResponse,
    UnloadModelRequest,
    UnloadModelResponse,
    decode_request,
)
from tinkex_trio.types._training import LossConfigValue

from . import _convert
from ._backend import API, DEFAULT_PROJECT_ID, LOCAL_OWNER, MAX_PAGE_LIMIT, Backend
from ._checkpoints import Checkpoints, utc_datetime
from ._convert import or_none
from ._custom_graph import CUSTOM_LOSS_FN
from ._engine_api import EngineUserError
from ._http import Handler, HTTPError, Request, Response, int_query, json_response
from ._provenance import recorded_logprobs
from ._routes_custom_loss import custom_job, numeric_loss_config
from ._scheduler import JobFn
from ._store import ModelRow
from ._submit import TrainingSubmitter

_RUN = r"(?P<run_id>[^/]+)"
#: Default page size of the training-run listing (PROTOCOL.md 3.5).
DEFAULT_RUNS_LIMIT = 20


def forward_backward_output(
    logprobs: Sequence[npt.NDArray[np.float32]], metrics: dict[str, float]
) -> ForwardBackwardOutput:
    """The engine's result as the wire result: one `logprobs` tensor per datum (A.1.4)."""
    return ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[{"logprobs": TensorData.from_numpy(lp)} for lp in logprobs],
        metrics={k: float(v) for k, v in metrics.items()},
    )


class ModelRoutes:
    """The training-run endpoints; state and shared lookups live in `Backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.submitter = TrainingSubmitter(backend)

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{API}/create_model", self.create_model),
            ("POST", f"{API}/get_info", self.get_info),
            ("POST", f"{API}/forward", self.forward),
            ("POST", f"{API}/forward_backward", self.forward_backward),
            ("POST", f"{API}/optim_step", self.optim_step),
            ("POST", f"{API}/load_weights", self.load_weights),
            ("POST", f"{API}/unload_model", self.unload_model),
            ("GET", f"{API}/training_runs", self.list_training_runs),
            ("GET", f"{API}/training_runs/{_RUN}", self.get_training_run),
        ]

    # ---------------------------------------------------------------- creation

    async def create_model(self, request: Request) -> Response:
        body = decode_request(request.body, CreateModelRequest)
        self.backend.session(body.session_id)
        info = self.backend.model_info(body.base_model)
        spec = _convert.lora_spec(body.lora_config)
        family = body.optimizer_config.get("type", "adamw")
        if family not in ("adamw", "adam"):
            raise HTTPError(400, f"optimizer_config type {family!r} is not supported; use adamw")
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        runner = self.backend.runner

        async def job() -> CreateModelResponse:
            await runner.create_adapter(model_id, info.name, spec)
            return CreateModelResponse(model_id=model_id)

        return self.submitter.submit_creation(
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

    # ------------------------------------------------------- forward / backward

    async def forward(self, request: Request) -> Response:
        body = self.submitter.decode(request, ForwardRequest)
        return await self._forward_backward(
            body, body.forward_input, forward_only=True, request_type="Forward"
        )

    async def forward_backward(self, request: Request) -> Response:
        content_type = request.header("content-type") or ""
        if _protobuf.PROTOBUF_CONTENT_TYPE in content_type:
            # PROTOCOL.md 3.9: protobuf forward is forward_backward with forward_only set.
            proto_body = self._protobuf_body(request)
            if isinstance(proto_body, ForwardRequest):
                return await self._forward_backward(
                    proto_body,
                    proto_body.forward_input,
                    forward_only=True,
                    request_type="Forward",
                )
            return await self._forward_backward(
                proto_body,
                proto_body.forward_backward_input,
                forward_only=False,
                request_type="ForwardBackward",
            )
        body = self.submitter.decode(request, ForwardBackwardRequest)
        return await self._forward_backward(
            body, body.forward_backward_input, forward_only=False, request_type="ForwardBackward"
        )

    def _protobuf_body(self, request: Request) -> ForwardRequest | ForwardBackwardRequest:
        """A protobuf forward_backward body (PROTOCOL.md 6.2-6.3) as our JSON-form request.

        `forward_only` picks the forward form. Config values must be numbers (the built-in
        losses take no text options), except for `loss_fn: "custom"`, whose text `loss_id`
        goes to `loss_fn_config_v2` (PROTOCOL.md 8.8). On a bad body the seq_id is consumed if
        it could be read.
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
        texts: dict[str, LossConfigValue] = {}
        for key, value in decoded.loss_fn_config.items():
            if isinstance(value, str) and decoded.loss_fn == CUSTOM_LOSS_FN:
                texts[key] = LossConfigValue(text=value)  # the custom loss's loss_id (8.8)
            elif isinstance(value, str):
                if decoded.seq_id is not None:
                    self.submitter.consume(decoded.model_id, decoded.seq_id)
                raise HTTPError(400, f"loss_fn_config[{key!r}] must be a number, got {value!r}")
            else:
                config[key] = value
        fb_input = ForwardBackwardInput(
            data=decoded.data,
            loss_fn=decoded.loss_fn,
            loss_fn_config=config or UNSET,
            loss_fn_config_v2=texts or UNSET,
        )
        seq_id = UNSET if decoded.seq_id is None else decoded.seq_id
        if decoded.forward_only:
            return ForwardRequest(forward_input=fb_input, model_id=decoded.model_id, seq_id=seq_id)
        return ForwardBackwardRequest(
            forward_backward_input=fb_input, model_id=decoded.model_id, seq_id=seq_id
        )

    async def _forward_backward(
        self,
        body: ForwardRequest | ForwardBackwardRequest,
        fb_input: ForwardBackwardInput,
        *,
        forward_only: bool,
        request_type: str,
    ) -> Response:
        runner = self.backend.runner

        def prepare(model: ModelRow) -> JobFn:
            info = self.backend.model_info(model.base_model)
            if not fb_input.data:
                raise EngineUserError("data is empty; send at least one datum")
            if fb_input.loss_fn == CUSTOM_LOSS_FN:
                return custom_job(self.backend, model, info, fb_input, forward_only)
            loss = _convert.loss_name(fb_input.loss_fn)
            config = numeric_loss_config(fb_input)
            arrays = [_convert.datum_arrays(d, i, info) for i, d in enumerate(fb_input.data)]
            for index, (datum, converted) in enumerate(zip(fb_input.data, arrays, strict=True)):
                converted.recorded_logprobs = recorded_logprobs(
                    datum, index, converted, self.backend.stability, model.session_id
                )
                if loss == "stable_reinforce" and converted.recorded_logprobs is None:
                    raise EngineUserError(
                        f"data[{index}] has no provenance spans, which stable_reinforce needs: "
                        "sample with record_stability_info=True and attach the sequences with "
                        "Datum.with_provenance(model_input=..., loss_fn_inputs=...)"
                    )

            async def job() -> ForwardBackwardOutput:
                result = await runner.forward_backward(
                    model.model_id, arrays, loss, config, forward_only
                )
                if len(result.logprobs) != len(arrays):
                    raise RuntimeError(
                        f"engine returned {len(result.logprobs)} outputs for {len(arrays)} datums"
                    )
                return forward_backward_output(result.logprobs, result.metrics)

            return job

        return await self.submitter.submit(body, request_type, prepare)

    async def optim_step(self, request: Request) -> Response:
        body = self.submitter.decode(request, OptimStepRequest)
        runner = self.backend.runner

        def prepare(model: ModelRow) -> JobFn:
            step = _convert.adam_step(body.adam_params, body.optimizer_params)

            async def job() -> OptimStepResponse:
                metrics = await runner.optim_step(model.model_id, step)
                return OptimStepResponse(metrics={k: float(v) for k, v in metrics.items()})

            return job

        return await self.submitter.submit(body, "OptimStep", prepare)

    # ------------------------------------------------------------------ loading

    async def load_weights(self, request: Request) -> Response:
        body = self.submitter.decode(request, LoadWeightsRequest)
        if body.model_id is not UNSET:
            return await self._load_in_place(body, body.model_id)
        if body.session_id is UNSET or body.model_seq_id is UNSET:
            raise HTTPError(
                400, "load_weights needs model_id (+ seq_id), or session_id + model_seq_id"
            )
        self.backend.session(body.session_id)
        checkpoints = self.backend.checkpoints
        ck = checkpoints.from_path(body.path, "path")
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
        store = self.backend.store
        optimizer, path = body.optimizer, body.path

        async def job() -> LoadWeightsResponse:
            spec = await checkpoints.load(model_id, base_model, ck, with_optimizer=optimizer)
            store.update_model(model_id, lora_config=_convert.lora_config_dict(spec))
            return LoadWeightsResponse(path=path, model_id=model_id)

        return self.submitter.submit_creation(
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

    async def _load_in_place(self, body: LoadWeightsRequest, model_id: str) -> Response:
        checkpoints, store = self.backend.checkpoints, self.backend.store

        def prepare(model: ModelRow) -> JobFn:
            ck = checkpoints.from_path(body.path, "path")
            if body.optimizer and ck.checkpoint_type != "training":
                raise HTTPError(400, f"{body.path!r} is a sampler checkpoint; use optimizer=False")
            source = store.get_model(ck.run_id)
            if source is not None and source.base_model != model.base_model:
                raise HTTPError(
                    400,
                    f"checkpoint base model {source.base_model!r} differs from the model's "
                    f"{model.base_model!r}",
                )

            async def job() -> LoadWeightsResponse:
                spec = await checkpoints.load(
                    model_id, model.base_model, ck, with_optimizer=body.optimizer
                )
                store.update_model(
                    model_id, lora_config=_convert.lora_config_dict(spec), corrupted=0
                )
                return LoadWeightsResponse(path=body.path, model_id=model_id)

            return job

        return await self.submitter.submit(body, "LoadWeights", prepare, allow_corrupted=True)

    async def unload_model(self, request: Request) -> Response:
        body = decode_request(request.body, UnloadModelRequest)
        model_id = body.model_id
        runner, store = self.backend.runner, self.backend.store

        def prepare(model: ModelRow) -> JobFn:
            async def job() -> UnloadModelResponse:
                if not model.corrupted:
                    await runner.drop_adapter(model_id)
                store.update_model(model_id, unloaded=1)
                return UnloadModelResponse(model_id=model_id)

            return job

        return await self.submitter.submit(body, "UnloadModel", prepare, allow_corrupted=True)

    # -------------------------------------------------------------------- REST

    def _training_run(self, model: ModelRow) -> TrainingRun:
        checkpoints = self.backend.checkpoints.of_run(model.model_id)
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
            last_checkpoint=Checkpoints.wire(last) if last else None,
            last_sampler_checkpoint=Checkpoints.wire(last_sampler) if last_sampler else None,
            user_metadata=model.user_metadata,
        )

    async def list_training_runs(self, request: Request) -> Response:
        limit = int_query(request, "limit", DEFAULT_RUNS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = int_query(request, "offset", 0, 0, 2**31)
        project_id = request.query.get("project_id")
        store = self.backend.store
        if project_id is None:
            models, total = store.list_models(limit=limit, offset=offset)
        elif not project_id.strip():
            raise HTTPError(400, "query parameter project_id must not be empty when given")
        else:
            models, total = store.list_models_in_project(
                project_id,
                include_unassigned=project_id == DEFAULT_PROJECT_ID,
                limit=limit,
                offset=offset,
            )
        return json_response(
            TrainingRunsResponse(
                training_runs=[self._training_run(m) for m in models],
                cursor=Cursor(offset=offset, limit=limit, total_count=total),
            )
        )

    async def get_training_run(self, request: Request) -> Response:
        return json_response(self._training_run(self.backend.model(request.params["run_id"])))
