"""`TrainingClient`: ordered, pipelined training requests on one LoRA run.

Ordering (PROTOCOL.md 5.2): every call reserves its seq_id(s) synchronously, in call order, and
puts its submissions on an unbounded memory channel in the same synchronous step, so the order
of calls is the order on the channel even when many tasks call at once. One sender task per
client reads the channel and POSTs strictly one after another; each POST that succeeds turns
into a poll task in the service nursery. A caller can therefore submit forward_backward and
optim_step back to back and await both futures afterwards.

Error handling: a submit is retried by the transport (layer A, then layer B for up to 5
minutes, PROTOCOL.md 9.3) with the same seq_id; if it finally fails, its future holds the error
and the next request is still sent (the server treats the seq_id as consumed). A failing
client-side custom loss poisons the client (9.8): its reserved seq_ids can never be sent, so
every later request fails at once with a message saying why.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import httpx
import msgspec
import numpy as np
import numpy.typing as npt
import trio

from tinkex_trio import _protobuf, types as t
from tinkex_trio._context import ServiceContext
from tinkex_trio._metrics import reduce_metrics
from tinkex_trio._validate import require_tinker_path
from tinkex_trio.errors import APIStatusError, ClientClosedError, InvalidInputError, TinkexError
from tinkex_trio.futures import APIFuture, ResultDecoder, json_decoder

if TYPE_CHECKING:
    from tinkex_trio.sampling import SamplingClient
    from tinkex_trio.service import ServiceClient
    from tinkex_trio.tokenizer import Tokenizer

T = TypeVar("T")

logger = logging.getLogger("tinkex_trio.training")

# A server that only takes protobuf forward_backward bodies answers JSON ones with this.
UNSUPPORTED_MEDIA_TYPE: Final = 415

# PROTOCOL.md 9.1: estimated bytes per datum: 4 per token, array sizes, 8 per sparse index.
_BYTES_PER_TOKEN: Final = 4
_BYTES_PER_SPARSE_INDEX: Final = 8
_DTYPE_BYTES: Final = {"int64": 8, "float32": 4}

CustomLossFn = Callable[[list[t.Datum], list[Any]], Any]
"""`loss_fn(data, logprobs) -> (loss, metrics)` with torch tensors (autograd), or
`-> (loss, grads, metrics)` with numpy arrays (grads = d loss / d logprobs per datum)."""


@dataclass(frozen=True)
class _FwdBwdChunk:
    """One forward/forward_backward chunk, encoded when sent: JSON (A.1) or protobuf (6.2)
    depending on the service's wire state at that moment (a 415 can switch it)."""

    model_id: str
    seq_id: int
    data: list[t.Datum]
    loss_fn: str
    config: dict[str, float] | None
    forward_only: bool


BodyFn = Callable[[], Awaitable["bytes | _FwdBwdChunk"]]


@dataclass(eq=False)
class _Submission:
    seq_id: int
    path: str
    request_type: str
    body: BodyFn
    future: APIFuture[Any]
    decode: ResultDecoder[Any]
    max_retries: int | None = None
    nbytes: int = 0
    accept: str = "application/json"


class TrainingClientStatistics(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str
    next_seq_id: int
    queued: int
    poisoned: bool


def estimate_datum_bytes(datum: t.Datum) -> int:
    """PROTOCOL.md 9.1's per-datum size estimate, used to cut chunks."""
    size = 0
    for chunk in datum.model_input.chunks:
        if isinstance(chunk, t.EncodedTextChunk):
            size += _BYTES_PER_TOKEN * len(chunk.tokens)
        elif isinstance(chunk, t.ImageChunk):
            size += len(chunk.data)
        else:
            size += len(chunk.location)
    for tensor in datum.loss_fn_inputs.values():
        size += _DTYPE_BYTES[tensor.dtype] * len(tensor.data)
        if tensor.sparse_crow_indices is not t.UNSET:
            size += _BYTES_PER_SPARSE_INDEX * len(tensor.sparse_crow_indices)
        if tensor.sparse_col_indices is not t.UNSET:
            size += _BYTES_PER_SPARSE_INDEX * len(tensor.sparse_col_indices)
    return size


def chunk_data(
    data: Sequence[t.Datum], max_len: int, max_bytes: int
) -> list[tuple[list[t.Datum], int]]:
    """Cut `data` greedily, in order, into (chunk, estimated bytes) (PROTOCOL.md 9.1)."""
    chunks: list[tuple[list[t.Datum], int]] = []
    current: list[t.Datum] = []
    current_bytes = 0
    for datum in data:
        size = estimate_datum_bytes(datum)
        if current and (len(current) >= max_len or current_bytes + size > max_bytes):
            chunks.append((current, current_bytes))
            current, current_bytes = [], 0
        current.append(datum)
        current_bytes += size
    if current:
        chunks.append((current, current_bytes))
    return chunks


def _validate_data(data: Sequence[t.Datum], loss_fn: str) -> None:
    if not isinstance(data, Sequence) or isinstance(data, str | bytes):
        raise InvalidInputError("data must be a list of Datum")
    if not data:
        raise InvalidInputError("data is empty: pass at least one Datum")
    required = t.LOSS_FN_REQUIRED_INPUTS.get(loss_fn)
    if required is None:
        raise InvalidInputError(
            f"loss_fn {loss_fn!r} is not supported; use one of {sorted(t.LOSS_FN_REQUIRED_INPUTS)}"
        )
    for i, datum in enumerate(data):
        if not isinstance(datum, t.Datum):
            raise InvalidInputError(f"data[{i}] is a {type(datum).__name__}, not a Datum")
        try:
            length = datum.model_input.length
        except ValueError as exc:
            raise InvalidInputError(f"data[{i}].model_input: {exc}") from None
        if length == 0:
            raise InvalidInputError(f"data[{i}].model_input is empty")
        for key in required:
            if key not in datum.loss_fn_inputs:
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs lacks {key!r}, which loss_fn {loss_fn!r} needs "
                    f"(it needs {list(required)})"
                )
        for key, tensor in datum.loss_fn_inputs.items():
            shape = tensor.resolved_shape()
            if not shape or shape[0] != length:
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs[{key!r}] has shape {shape}, but the model input "
                    f"has {length} tokens: per-token inputs must have length {length}"
                )
            if not tensor.is_sparse and math.prod(shape) != len(tensor.data):
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs[{key!r}] holds {len(tensor.data)} values but its "
                    f"shape {shape} needs {math.prod(shape)}"
                )


def _merge_outputs(outputs: Sequence[t.ForwardBackwardOutput]) -> t.ForwardBackwardOutput:
    merged: list[dict[str, t.TensorData]] = []
    for output in outputs:
        merged.extend(output.loss_fn_outputs)
    metrics = reduce_metrics([(o.metrics, len(o.loss_fn_outputs)) for o in outputs])
    return t.ForwardBackwardOutput(
        loss_fn_output_type=outputs[0].loss_fn_output_type,
        loss_fn_outputs=merged,
        metrics=metrics,
    )


@final
class TrainingClient:
    """Trains one LoRA run; get one from `ServiceClient.create_lora_training_client`.

    Every training method returns an `APIFuture` once the request is queued; the server runs a
    run's requests in call order.
    """

    _ctx: ServiceContext
    _service: ServiceClient
    _info: t.GetInfoResponse
    _next_request_id: int
    _poisoned: BaseException | None
    _send: trio.MemorySendChannel[_Submission]

    def __init__(self) -> None:
        raise TypeError("create TrainingClient with ServiceClient.create_lora_training_client()")

    @classmethod
    def _create(
        cls,
        ctx: ServiceContext,
        service: ServiceClient,
        info: t.GetInfoResponse,
        *,
        next_request_id: int,
    ) -> TrainingClient:
        self = object.__new__(cls)
        self._ctx = ctx
        self._service = service
        self._info = info
        self._next_request_id = next_request_id
        self._poisoned = None
        self._send, receive = trio.open_memory_channel[_Submission](math.inf)
        ctx.nursery.start_soon(self._sender, receive)
        return self

    # -- public API ----------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._info.model_id

    def get_info(self) -> t.GetInfoResponse:
        """What the server said about this run at creation (no request)."""
        return self._info

    @property
    def base_model(self) -> str:
        return self._info.model_data.model_name or self._info.model_name or ""

    def get_tokenizer(self) -> Tokenizer:
        from tinkex_trio.tokenizer import get_tokenizer

        data = self._info.model_data
        name = data.model_name or self._info.model_name
        if not name:
            raise InvalidInputError("the server did not report this run's model name")
        return get_tokenizer(name, tokenizer_id=data.tokenizer_id)

    async def forward(
        self,
        data: Sequence[t.Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[t.ForwardBackwardOutput]:
        """Compute the loss and per-datum logprobs without touching gradients."""
        return await self._forward_backward(data, loss_fn, loss_fn_config, forward_only=True)

    async def forward_backward(
        self,
        data: Sequence[t.Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[t.ForwardBackwardOutput]:
        """Compute the loss and accumulate gradients; apply them with `optim_step`.

        Data are cut into chunks (PROTOCOL.md 9.1, limits from the server's client config),
        each its own request; the result merges them in input order with metrics reduced as
        9.2 says.

        Raises:
            InvalidInputError: empty data, unknown loss, missing or mis-shaped loss inputs.
        """
        return await self._forward_backward(data, loss_fn, loss_fn_config, forward_only=False)

    async def _forward_backward(
        self,
        data: Sequence[t.Datum],
        loss_fn: str,
        loss_fn_config: dict[str, float] | None,
        *,
        forward_only: bool,
    ) -> APIFuture[t.ForwardBackwardOutput]:
        self._check_usable()
        _validate_data(data, loss_fn)
        config = _validate_loss_config(loss_fn_config)
        chunk_futures = self._queue_chunks(data, loss_fn, config, forward_only=forward_only)
        return self._combine(chunk_futures, "ForwardBackward")

    def _queue_chunks(
        self,
        data: Sequence[t.Datum],
        loss_fn: str,
        config: dict[str, float] | None,
        *,
        forward_only: bool,
        bodies: Sequence[BodyFn] | None = None,
        chunks: Sequence[tuple[list[t.Datum], int]] | None = None,
    ) -> list[APIFuture[t.ForwardBackwardOutput]]:
        flags = self._ctx.client_config
        if chunks is None:
            chunks = chunk_data(
                data, flags.fwdbwd_max_chunk_len, flags.fwdbwd_max_chunk_bytes_count
            )
        request_type = "Forward" if forward_only else "ForwardBackward"
        path = FORWARD_PATH if forward_only else FORWARD_BACKWARD_PATH
        futures: list[APIFuture[t.ForwardBackwardOutput]] = []
        for index, (chunk, nbytes) in enumerate(chunks):
            seq_id = self._reserve()
            if bodies is not None:
                body = bodies[index]
            else:
                body = _static(
                    _FwdBwdChunk(self.model_id, seq_id, chunk, loss_fn, config, forward_only)
                )
            futures.append(
                self._enqueue(seq_id, path, request_type, body, _fwdbwd_result, nbytes=nbytes)
            )
        return futures

    def _combine(
        self, futures: list[APIFuture[t.ForwardBackwardOutput]], request_type: str
    ) -> APIFuture[t.ForwardBackwardOutput]:
        if len(futures) == 1:
            return futures[0]
        combined: APIFuture[t.ForwardBackwardOutput] = APIFuture(request_type)

        async def merge() -> t.ForwardBackwardOutput:
            return _merge_outputs([await f for f in futures])

        self._ctx.nursery.start_soon(combined._run, merge)
        return combined

    async def forward_backward_custom(
        self, data: Sequence[t.Datum], loss_fn: CustomLossFn
    ) -> APIFuture[t.ForwardBackwardOutput]:
        """Train on a loss computed here, from the server's per-datum logprobs (PROTOCOL.md 9.8).

        A forward pass returns logprobs; `loss_fn(data, logprobs)` computes the loss; its
        gradient g with respect to the logprobs is sent back as cross-entropy weights -g, which
        gives the model the same gradient. `loss_fn` either takes torch tensors (requires_grad)
        and returns `(loss_tensor, metrics)`, or takes numpy arrays and returns
        `(loss, grads, metrics)`. The result's `loss:sum` is the custom loss; the server's
        surrogate is under `surrogate_loss:sum`.
        """
        self._check_usable()
        _validate_data(data, "cross_entropy")
        flags = self._ctx.client_config
        stripped = [_for_custom_forward(d) for d in data]
        chunks = chunk_data(
            stripped, flags.fwdbwd_max_chunk_len, flags.fwdbwd_max_chunk_bytes_count
        )
        forward_futures = self._queue_chunks(
            stripped, "cross_entropy", None, forward_only=True, chunks=chunks
        )
        computed: dict[str, Any] = {}
        first_backward_seq = self._next_request_id + 1

        async def compute() -> None:
            if "error" in computed or "weights" in computed:
                return
            outputs = [await f for f in forward_futures]
            logprobs = [o["logprobs"].to_numpy() for out in outputs for o in out.loss_fn_outputs]
            loss, grads, metrics = _run_custom_loss(loss_fn, list(data), logprobs)
            computed.update(weights=[-np.asarray(g, dtype=np.float32) for g in grads])
            computed.update(loss=loss, metrics=metrics)

        lock = trio.Lock()

        def backward_body(index: int, chunk: list[t.Datum], start: int) -> BodyFn:
            async def build() -> bytes | _FwdBwdChunk:
                async with lock:
                    await compute()
                weights: list[npt.NDArray[np.float32]] = computed["weights"]
                new_chunk = [
                    t.Datum(
                        model_input=d.model_input,
                        loss_fn_inputs={
                            "target_tokens": d.loss_fn_inputs["target_tokens"],
                            "weights": t.TensorData.from_numpy(weights[start + j]),
                        },
                    )
                    for j, d in enumerate(chunk)
                ]
                return _FwdBwdChunk(
                    self.model_id,
                    first_backward_seq + index,
                    new_chunk,
                    "cross_entropy",
                    None,
                    False,
                )

            return build

        bodies = []
        start = 0
        for index, (chunk, _) in enumerate(chunks):
            bodies.append(backward_body(index, chunk, start))
            start += len(chunk)
        backward_futures = self._queue_chunks(
            stripped, "cross_entropy", None, forward_only=False, bodies=bodies, chunks=chunks
        )
        combined: APIFuture[t.ForwardBackwardOutput] = APIFuture("ForwardBackwardCustom")

        async def finish() -> t.ForwardBackwardOutput:
            merged = _merge_outputs([await f for f in backward_futures])
            metrics = dict(merged.metrics)
            if "loss:sum" in metrics:
                metrics["surrogate_loss:sum"] = metrics.pop("loss:sum")
            metrics["loss:sum"] = float(computed["loss"])
            metrics.update({k: float(v) for k, v in computed["metrics"].items()})
            return t.ForwardBackwardOutput(
                loss_fn_output_type=merged.loss_fn_output_type,
                loss_fn_outputs=[o for f in forward_futures for o in (await f).loss_fn_outputs],
                metrics=metrics,
            )

        self._ctx.nursery.start_soon(combined._run, finish)
        return combined

    async def optim_step(
        self, adam_params: t.AdamParams | None = None
    ) -> APIFuture[t.OptimStepResponse]:
        """Apply the accumulated gradients with AdamW (`AdamParams()` defaults if None)."""
        self._check_usable()
        params = adam_params if adam_params is not None else t.AdamParams()
        if not isinstance(params, t.AdamParams):
            raise InvalidInputError(f"adam_params must be AdamParams, got {type(params).__name__}")
        return self._queue_request(
            "/api/v1/optim_step",
            "OptimStep",
            lambda seq_id: t.OptimStepRequest(
                model_id=self.model_id, seq_id=seq_id, adam_params=params
            ),
            t.OptimStepResponse,
        )

    async def save_state(
        self, name: str, ttl_seconds: int | None = None, *, overwrite: bool = False
    ) -> APIFuture[t.SaveWeightsResponse]:
        """Save weights and optimizer state as `tinker://<run>/weights/<name>`."""
        self._check_usable()
        _validate_name(name)
        _validate_ttl(ttl_seconds)
        # PROTOCOL.md 9.3: saves go without layer-A retries (layer B still applies).
        return self._queue_request(
            "/api/v1/save_weights",
            "SaveWeights",
            lambda seq_id: t.SaveWeightsRequest(
                model_id=self.model_id,
                path=name,
                seq_id=seq_id,
                ttl_seconds=t.UNSET if ttl_seconds is None else ttl_seconds,
                overwrite=overwrite,
            ),
            t.SaveWeightsResponse,
            max_retries=0,
        )

    async def load_state(self, path: str) -> APIFuture[t.LoadWeightsResponse]:
        """Replace this run's weights with checkpoint `path` (optimizer state reset)."""
        return await self._load(path, optimizer=False)

    async def load_state_with_optimizer(self, path: str) -> APIFuture[t.LoadWeightsResponse]:
        """Replace this run's weights and optimizer state with checkpoint `path`."""
        return await self._load(path, optimizer=True)

    async def _load(self, path: str, *, optimizer: bool) -> APIFuture[t.LoadWeightsResponse]:
        self._check_usable()
        require_tinker_path("path", path)
        return self._queue_request(
            "/api/v1/load_weights",
            "LoadWeights",
            lambda seq_id: t.LoadWeightsRequest(
                model_id=self.model_id, seq_id=seq_id, path=path, optimizer=optimizer
            ),
            t.LoadWeightsResponse,
        )

    async def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[t.SaveWeightsForSamplerResponse]:
        """Save sampler weights as `tinker://<run>/sampler_weights/<name>`."""
        self._check_usable()
        _validate_name(name)
        _validate_ttl(ttl_seconds)
        return self._queue_request(
            "/api/v1/save_weights_for_sampler",
            "SaveWeightsForSampler",
            lambda seq_id: t.SaveWeightsForSamplerRequest(
                model_id=self.model_id,
                path=name,
                seq_id=seq_id,
                ttl_seconds=t.UNSET if ttl_seconds is None else ttl_seconds,
            ),
            t.SaveWeightsForSamplerResponse,
            max_retries=0,
        )

    async def save_weights_external(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[t.SaveWeightsExternalResponse]:
        """Export the adapter as `tinker://<run>/external_weights/<name>` (PEFT files).

        Download its files with `RestClient.get_external_weights_urls`. Like the other saves,
        submitted without layer-A retries (PROTOCOL.md 3.2, 9.3).
        """
        self._check_usable()
        _validate_name(name)
        _validate_ttl(ttl_seconds)
        return self._queue_request(
            "/api/v1/save_weights_external",
            "SaveWeightsExternal",
            lambda seq_id: t.SaveWeightsExternalRequest(
                model_id=self.model_id,
                path=name,
                seq_id=seq_id,
                ttl_seconds=t.UNSET if ttl_seconds is None else ttl_seconds,
            ),
            t.SaveWeightsExternalResponse,
            max_retries=0,
        )

    async def save_weights_and_get_sampling_client(self) -> SamplingClient:
        """Snapshot the current weights into a new sampling session and return its client."""
        self._check_usable()
        sampling_session_seq_id = next(self._ctx.sampling_session_seq_ids)
        future = self._queue_request(
            "/api/v1/save_weights_for_sampler",
            "SaveWeightsForSampler",
            lambda seq_id: t.SaveWeightsForSamplerRequest(
                model_id=self.model_id,
                seq_id=seq_id,
                sampling_session_seq_id=sampling_session_seq_id,
            ),
            t.SaveWeightsForSamplerResponse,
            max_retries=0,
        )
        saved = await future
        if not saved.sampling_session_id:
            raise TinkexError(
                "the server's save_weights_for_sampler result has no sampling_session_id"
            )
        return await self._service.sampling_client_for(
            saved.sampling_session_id, base_model=self.base_model or None
        )

    async def create_sampling_client(self, model_path: str) -> SamplingClient:
        """A sampling client for sampler weights saved earlier (`tinker://.../sampler_weights/...`)."""
        return await self._service.create_sampling_client(model_path=model_path)

    def statistics(self) -> TrainingClientStatistics:
        return TrainingClientStatistics(
            model_id=self.model_id,
            next_seq_id=self._next_request_id + 1,
            queued=self._send.statistics().current_buffer_used,
            poisoned=self._poisoned is not None,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<TrainingClient {s.model_id} next_seq_id={s.next_seq_id} queued={s.queued}>"

    # -- internals -----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        self._ctx.check_open("TrainingClient")
        if self._poisoned is not None:
            raise TinkexError(
                "a previous forward_backward_custom failed, so this TrainingClient is poisoned "
                f"(its reserved requests can never be sent): {self._poisoned!r}"
            ) from self._poisoned

    def _reserve(self) -> int:
        """The next seq_id (PROTOCOL.md 5.2: id + 1, so the first after create_model is 1)."""
        self._next_request_id += 1
        return self._next_request_id

    def _queue_request(
        self,
        path: str,
        request_type: str,
        build: Callable[[int], t.Request],
        result_type: type[T],
        *,
        max_retries: int | None = None,
    ) -> APIFuture[T]:
        """Reserve the next seq_id, encode `build(seq_id)` and queue it; JSON result."""
        seq_id = self._reserve()
        body = t.encode(build(seq_id))
        return self._enqueue(
            seq_id,
            path,
            request_type,
            _static(body),
            json_decoder(result_type),
            max_retries=max_retries,
        )

    def _enqueue(
        self,
        seq_id: int,
        path: str,
        request_type: str,
        body: BodyFn,
        decode: ResultDecoder[T],
        *,
        max_retries: int | None = None,
        nbytes: int = 0,
    ) -> APIFuture[T]:
        future: APIFuture[T] = APIFuture(request_type)
        self._send.send_nowait(
            _Submission(seq_id, path, request_type, body, future, decode, max_retries, nbytes)
        )
        return future

    async def _sender(self, receive: trio.MemoryReceiveChannel[_Submission]) -> None:
        """Submit queued requests one by one, in seq_id order; start a poll for each.

        When the service closes (this task is cancelled), every request not yet handed to a
        poll task gets `ClientClosedError`, so no future is left waiting forever.
        """
        current: _Submission | None = None
        async with receive:
            try:
                async for sub in receive:
                    current = sub
                    await self._send_one(sub)
                    current = None
            finally:
                self._fail_unsent(current, receive)

    @staticmethod
    def _fail_unsent(
        current: _Submission | None, receive: trio.MemoryReceiveChannel[_Submission]
    ) -> None:
        closed = ClientClosedError(
            "the service closed before this request was submitted; await training "
            "futures inside the `async with open_service(...)` block"
        )
        if current is not None:
            current.future._set_error(closed)
        while True:
            try:
                receive.receive_nowait().future._set_error(closed)
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break

    async def _send_one(self, sub: _Submission) -> None:
        """Submit one queued request; its future gets the outcome (or a poll task)."""
        if self._poisoned is not None:
            sub.future._set_error(
                TinkexError("this TrainingClient is poisoned by a failed custom loss")
            )
            return
        try:
            body = await sub.body()
        except Exception as exc:  # the user's custom loss failed
            self._poisoned = exc
            error = TinkexError(f"forward_backward_custom's loss failed: {exc!r}")
            error.__cause__ = exc
            sub.future._set_error(error)
            return
        await self._ctx.fwdbwd_budget.acquire(sub.nbytes)
        try:
            submitted = await self._submit(sub, body)
            future = t.decode(submitted.content, t.UntypedAPIFuture)
        except (TinkexError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._ctx.fwdbwd_budget.release(sub.nbytes)
            sub.future._set_error(
                exc if isinstance(exc, TinkexError) else TinkexError(f"bad submit response: {exc}")
            )
            return
        sub.future.request_id = future.request_id
        self._ctx.nursery.start_soon(
            sub.future._run, functools.partial(self._poll, sub, future.request_id)
        )

    async def _submit(self, sub: _Submission, body: bytes | _FwdBwdChunk) -> Any:
        """POST one request (layers A and B); a forward_backward chunk in the current wire form.

        A 415 to a JSON forward_backward means the server takes protobuf only: the service
        switches to protobuf for good and this chunk is sent again as protobuf.
        """
        transport = self._ctx.transport
        if not isinstance(body, _FwdBwdChunk):
            return await transport.with_retries(
                functools.partial(
                    transport.request, "POST", sub.path, content=body, max_retries=sub.max_retries
                )
            )
        protobuf = self._ctx.fwdbwd_protobuf()
        try:
            return await self._post_chunk(sub, body, protobuf=protobuf)
        except APIStatusError as exc:
            if protobuf or exc.status_code != UNSUPPORTED_MEDIA_TYPE:
                raise
            logger.info(
                "the server refused a JSON forward_backward with 415; switching this service "
                "to protobuf forward_backward bodies (PROTOCOL.md 6)"
            )
            self._ctx.fwdbwd_protobuf_forced = True
            return await self._post_chunk(sub, body, protobuf=True)

    async def _post_chunk(self, sub: _Submission, chunk: _FwdBwdChunk, *, protobuf: bool) -> Any:
        transport = self._ctx.transport
        if not protobuf:
            path, content = _fwdbwd_json(chunk)
            sub.accept = "application/json"
            return await transport.with_retries(
                functools.partial(transport.request, "POST", path, content=content)
            )
        content = _protobuf.encode_forward_backward_request(
            model_id=chunk.model_id,
            seq_id=chunk.seq_id,
            data=chunk.data,
            loss_fn=chunk.loss_fn,
            loss_fn_config=chunk.config,
            forward_only=chunk.forward_only,
        )
        headers: dict[str, str] = {}
        if self._ctx.client_config.proto_compress_fwdbwd:
            content = _protobuf.compress(content)
            headers["Content-Encoding"] = _protobuf.ZSTD_ENCODING
        # PROTOCOL.md 4.5: results of protobuf requests are asked for as protobuf.
        sub.accept = _protobuf.PROTOBUF_CONTENT_TYPE
        return await transport.with_retries(
            functools.partial(
                transport.request,
                "POST",
                FORWARD_BACKWARD_PATH,
                content=content,
                content_type=_protobuf.PROTOBUF_CONTENT_TYPE,
                headers=headers,
            )
        )

    async def _poll(self, sub: _Submission, request_id: str) -> Any:
        try:
            return await self._ctx.poller.poll(
                request_id,
                sub.request_type,
                sub.decode,
                on_queue_state=sub.future._on_queue_state,
                accept=sub.accept,
            )
        finally:
            self._ctx.fwdbwd_budget.release(sub.nbytes)


def _static(body: bytes | _FwdBwdChunk) -> BodyFn:
    async def get() -> bytes | _FwdBwdChunk:
        return body

    return get


FORWARD_PATH: Final = "/api/v1/forward"
FORWARD_BACKWARD_PATH: Final = "/api/v1/forward_backward"


def _fwdbwd_json(chunk: _FwdBwdChunk) -> tuple[str, bytes]:
    """(path, body) of a chunk in the JSON form of Appendix A.1."""
    inputs = t.ForwardBackwardInput(
        data=chunk.data,
        loss_fn=chunk.loss_fn,
        loss_fn_config=t.UNSET if chunk.config is None else chunk.config,
    )
    if chunk.forward_only:
        request: t.ForwardRequest | t.ForwardBackwardRequest = t.ForwardRequest(
            forward_input=inputs, model_id=chunk.model_id, seq_id=chunk.seq_id
        )
        return FORWARD_PATH, t.encode(request)
    request = t.ForwardBackwardRequest(
        forward_backward_input=inputs, model_id=chunk.model_id, seq_id=chunk.seq_id
    )
    return FORWARD_BACKWARD_PATH, t.encode(request)


def _fwdbwd_result(response: httpx.Response) -> t.ForwardBackwardOutput:
    """A forward/forward_backward result in either form (PROTOCOL.md 4.2 rule 1, 6.4)."""
    if _protobuf.PROTOBUF_CONTENT_TYPE in response.headers.get("content-type", ""):
        return _protobuf.decode_forward_backward_output(response.content)
    return t.decode(response.content, t.ForwardBackwardOutput)


def _validate_loss_config(config: dict[str, float] | None) -> dict[str, float] | None:
    if config is None:
        return None
    out: dict[str, float] = {}
    for key, value in config.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidInputError(
                f"loss_fn_config[{key!r}] must be a finite number, got {value!r}"
            )
        out[str(key)] = float(value)
    return out


def _validate_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
        raise InvalidInputError(
            f"checkpoint name must be a non-empty string without '/' or surrounding spaces, got {name!r}"
        )


def _validate_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is not None and (
        isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
    ):
        raise InvalidInputError(f"ttl_seconds must be a positive int or None, got {ttl_seconds!r}")


def _for_custom_forward(datum: t.Datum) -> t.Datum:
    """PROTOCOL.md 9.8: the forward pass sends only target_tokens and weights (zeros if absent)."""
    targets = datum.loss_fn_inputs["target_tokens"]
    weights = datum.loss_fn_inputs.get("weights")
    if weights is None:
        weights = t.TensorData.from_numpy(np.zeros(targets.resolved_shape(), dtype=np.float32))
    return t.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


def _run_custom_loss(
    loss_fn: CustomLossFn, data: list[t.Datum], logprobs: list[npt.NDArray[Any]]
) -> tuple[float, list[npt.NDArray[Any]], dict[str, float]]:
    """Run the user's loss; return (loss, d loss / d logprobs per datum, metrics)."""
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None:
        tensors = [torch.tensor(lp, dtype=torch.float32, requires_grad=True) for lp in logprobs]
        result = loss_fn(data, tensors)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor):
            loss, metrics = result
            loss.backward()
            grads = [
                (x.grad if x.grad is not None else torch.zeros_like(x)).numpy() for x in tensors
            ]
            return float(loss.detach()), grads, dict(metrics)
        if isinstance(result, tuple) and len(result) == 3:
            loss_value, grads, metrics = result
            return float(loss_value), [np.asarray(g) for g in grads], dict(metrics)
        raise TypeError(
            "a custom loss must return (loss_tensor, metrics) or (loss, grads, metrics)"
        )
    result = loss_fn(data, logprobs)
    if isinstance(result, tuple) and len(result) == 3:
        loss_value, grads, metrics = result
        return float(loss_value), [np.asarray(g) for g in grads], dict(metrics)
    raise TypeError("without torch, the custom loss must return (loss, grads, metrics)")


__all__ = ["TrainingClient", "chunk_data", "estimate_datum_bytes"]
