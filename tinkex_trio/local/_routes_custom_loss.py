"""Server-side custom losses: `POST /create_custom_loss` and `forward_backward` with
`loss_fn: "custom"` (PROTOCOL.md 3.2, 8.8, 9.8).

`create_custom_loss` checks the uploaded graph (`_custom_graph.compile_custom_loss`; a refused
graph is a 400 `user` error naming the node and the op), stores it for the session and answers
with a future that is already complete: its result is the `loss_id`, `<session>:loss:<seq>`.
`custom_loss_seq_id` is the session's counter (5.1) and works like the sampling counter: a
resubmission of a seq id with the same graph (a layer-B retry) gets the original future; with
another graph, a 409.

`forward_backward` (JSON `loss_fn_config_v2` or protobuf, 6.1) names the loss by
`loss_fn_config_v2 = {"loss_id": {"text": ...}}`; `custom_job` checks each datum against the
loss's declared ranks and queues the engine's `forward_backward_custom` in the model's lane.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from tinkex_trio.types import Datum, ForwardBackwardInput, ForwardBackwardOutput, TensorData
from tinkex_trio.types._custom_loss import CreateCustomLossRequest, CreateCustomLossResponse

from . import _convert
from ._backend import API, Backend, hash_payload
from ._custom_graph import (
    CUSTOM_LOSS_FN,
    MAX_LOSSES_PER_SESSION,
    CustomLoss,
    StoredLoss,
    compile_custom_loss,
)
from ._engine_api import DatumArrays, EngineUserError, ModelInfo
from ._http import Handler, HTTPError, Request, Response
from ._provenance import recorded_logprobs
from ._scheduler import JobFn
from ._store import ModelRow

#: Appended to a refused upload: the official SDK runs any traceable loss client-side when
#: the flag is off, so a loss this backend will not interpret still has a way to run.
CLIENT_SIDE_HINT: Final = (
    "To run this loss client-side instead, serve with client_flags="
    "{'custom_loss_server_side': False}"
)
#: Largest `create_custom_loss` body; a graph of `MAX_NODES` nodes is a few tens of KiB.
MAX_GRAPH_BYTES: Final = 1024 * 1024


class CustomLossRoutes:
    """The `create_custom_loss` endpoint; losses live in `backend.custom_losses`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", f"{API}/create_custom_loss", self.create_custom_loss)]

    async def create_custom_loss(self, request: Request) -> Response:
        if len(request.body) > MAX_GRAPH_BYTES:
            raise HTTPError(
                413, f"create_custom_loss body is over {MAX_GRAPH_BYTES} bytes; simplify the loss"
            )
        # Strict decoding: `null` is a real argument value in a graph, so the lenient
        # null-dropping `decode_request` must not touch it.
        try:
            body = msgspec.json.decode(request.body, type=CreateCustomLossRequest)
        except RecursionError:
            raise HTTPError(400, "create_custom_loss body is nested too deeply") from None
        backend = self.backend
        backend.session(body.session_id)
        if body.custom_loss_seq_id < 0:
            raise HTTPError(400, f"custom_loss_seq_id must be >= 0, got {body.custom_loss_seq_id}")
        store = backend.custom_losses
        loss_id = store.loss_id(body.session_id, body.custom_loss_seq_id)
        payload_hash = hash_payload(body)
        earlier = store.get(loss_id)
        if earlier is not None:
            if earlier.payload_hash != payload_hash:
                raise HTTPError(
                    409,
                    f"custom_loss_seq_id {body.custom_loss_seq_id} of session "
                    f"{body.session_id!r} was already used for another loss ({loss_id})",
                )
            return backend.future_response(earlier.request_id)
        if store.count(body.session_id) >= MAX_LOSSES_PER_SESSION:
            raise HTTPError(
                400,
                f"session {body.session_id!r} already stores {MAX_LOSSES_PER_SESSION} custom "
                "losses, the local backend's limit; reuse a LossHandle or start a new session",
            )
        try:
            loss = compile_custom_loss(body, loss_id)
        except EngineUserError as exc:
            raise HTTPError(400, f"{exc}. {CLIENT_SIDE_HINT}") from None
        request_id = backend.registry.create(
            request_type="CreateCustomLoss", payload_hash=payload_hash
        )
        store.add(
            StoredLoss(
                session_id=body.session_id,
                seq_id=body.custom_loss_seq_id,
                payload_hash=payload_hash,
                request_id=request_id,
                loss=loss,
            )
        )
        backend.registry.complete(
            request_id, msgspec.json.encode(CreateCustomLossResponse(loss_id=loss_id))
        )
        return backend.future_response(request_id)


def numeric_loss_config(fb_input: ForwardBackwardInput) -> dict[str, float]:
    """The numeric config of a built-in loss: `loss_fn_config`, overridden by the numbers of
    `loss_fn_config_v2` (PROTOCOL.md 6.1); a text value there is refused, not ignored."""
    config = dict(_convert.loss_config(fb_input.loss_fn_config))
    if isinstance(fb_input.loss_fn_config_v2, dict):
        for key, value in fb_input.loss_fn_config_v2.items():
            if not isinstance(value.number, float | int):
                raise EngineUserError(
                    f"loss_fn_config_v2[{key!r}] must be a number for {fb_input.loss_fn!r}"
                )
            config[key] = float(value.number)
    return config


def _loss_id(fb_input: ForwardBackwardInput) -> str:
    v2 = fb_input.loss_fn_config_v2 if isinstance(fb_input.loss_fn_config_v2, dict) else {}
    numeric = fb_input.loss_fn_config if isinstance(fb_input.loss_fn_config, dict) else {}
    unknown = sorted((set(v2) | set(numeric)) - {"loss_id"})
    if unknown:
        raise EngineUserError(
            f"loss_fn_config keys {unknown} are not used by 'custom'; it takes only loss_id"
        )
    value = v2.get("loss_id")
    if value is None or not isinstance(value.text, str):
        raise EngineUserError(
            "loss_fn 'custom' needs loss_fn_config_v2 {'loss_id': {'text': <id>}}, the id "
            "create_custom_loss returned"
        )
    return value.text


def _input_array(
    datum_inputs: dict[str, TensorData], key: str, rank: int, n: int, where: str, vocab: int
) -> npt.NDArray[Any]:
    td = datum_inputs.get(key)
    if td is None:
        raise EngineUserError(f"{where} lacks {key!r}, which the custom loss reads")
    # At most one value per (token, vocabulary entry), as for the built-in losses' inputs.
    array = _convert.tensor_array(td, f"{where}[{key!r}]", max_elements=max(n, 1) * vocab)
    if array.dtype.kind not in "fiu":
        raise EngineUserError(f"{where}[{key!r}] must be float32 or int64, got {array.dtype}")
    if rank == 0 and array.size == 1 and array.ndim <= 1:
        # A scalar: the protobuf form cannot tell [] from [1] (PROTOCOL.md 6.2).
        return array.reshape(())
    if array.ndim != rank:
        raise EngineUserError(
            f"{where}[{key!r}] has shape {list(array.shape)}, but the custom loss declares "
            f"it with rank {rank}"
        )
    if key == "target_tokens" and (array.shape[0] != n or array.size == 0):
        raise EngineUserError(
            f"{where}['target_tokens'] has shape {list(array.shape)}; it needs {n} rows, one "
            "per model input token"
        )
    return array


def custom_datum_arrays(datum: Datum, index: int, info: ModelInfo, loss: CustomLoss) -> DatumArrays:
    """One datum checked against the loss: `target_tokens` with the rank of `logprobs`, then
    each input the loss reads with its declared rank; keys the loss does not read are left
    out (the SDK sends the datum's whole `loss_fn_inputs`)."""
    where = f"data[{index}]"
    tokens = _convert.model_input_tokens(datum.model_input, f"{where}.model_input")
    _convert.check_tokens(tokens, info, f"{where}.model_input")
    n = len(tokens)
    if n > info.max_context_length:
        raise EngineUserError(
            f"{where}.model_input has {n} tokens, more than the maximum context length "
            f"{info.max_context_length} of {info.name}"
        )
    inputs_where = f"{where}.loss_fn_inputs"
    targets = _input_array(
        datum.loss_fn_inputs,
        "target_tokens",
        loss.inputs[0].rank,
        n,
        inputs_where,
        info.vocab_size,
    )
    if targets.dtype != np.int64:
        raise EngineUserError(f"{inputs_where}['target_tokens'] must have dtype int64")
    if targets.min() < 0 or targets.max() >= info.vocab_size:
        raise EngineUserError(
            f"{inputs_where}['target_tokens'] has ids outside the vocabulary of {info.name} "
            f"(0..{info.vocab_size - 1})"
        )
    arrays: dict[str, npt.NDArray[np.generic]] = {"target_tokens": targets}
    for spec in loss.inputs[1:]:
        arrays[spec.name] = _input_array(
            datum.loss_fn_inputs, spec.name, spec.rank, n, inputs_where, info.vocab_size
        )
    return DatumArrays(tokens=np.asarray(tokens, dtype=np.int64), loss_fn_inputs=arrays)


def custom_job(
    backend: Backend,
    model: ModelRow,
    info: ModelInfo,
    fb_input: ForwardBackwardInput,
    forward_only: bool,
) -> JobFn:
    """Check a `loss_fn: "custom"` forward(_backward) and return its job (raises
    `EngineUserError` for a 400 naming the problem)."""
    loss_id = _loss_id(fb_input)
    stored = backend.custom_losses.get(loss_id)
    if stored is None:
        raise EngineUserError(
            f"unknown custom loss_id {loss_id!r}; create it with create_custom_loss in this "
            "session (custom losses do not survive a backend restart)"
        )
    if stored.session_id != model.session_id:
        raise EngineUserError(
            f"custom loss {loss_id!r} belongs to session {stored.session_id!r}; model "
            f"{model.model_id!r} is in session {model.session_id!r}"
        )
    loss = stored.loss
    arrays = [custom_datum_arrays(d, i, info, loss) for i, d in enumerate(fb_input.data)]
    for index, (datum, converted) in enumerate(zip(fb_input.data, arrays, strict=True)):
        # Provenance spans are checked as for the built-in losses (an unknown sequence is a
        # 400 naming it); a custom loss has no use for the recorded log-probs themselves.
        recorded_logprobs(datum, index, converted, backend.stability, model.session_id)
    runner = backend.runner

    async def job() -> ForwardBackwardOutput:
        result = await runner.forward_backward_custom(model.model_id, arrays, loss, forward_only)
        if len(result.logprobs) != len(arrays):
            raise RuntimeError(
                f"engine returned {len(result.logprobs)} outputs for {len(arrays)} datums"
            )
        return ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=[{"logprobs": TensorData.from_numpy(lp)} for lp in result.logprobs],
            metrics={k: float(v) for k, v in result.metrics.items()},
        )

    return job


__all__ = ["CUSTOM_LOSS_FN", "CustomLossRoutes", "custom_job", "numeric_loss_config"]
