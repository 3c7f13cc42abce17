"""`TrainingClient`: ordered, pipelined training requests on one LoRA run.

Every training method checks its arguments, reserves its seq_id(s) and queues its request(s)
on the client's ordered sender (`tinkex_trio._sender`: one submit at a time, strictly in
seq_id order, PROTOCOL.md 5.2), and returns an `APIFuture` at once, so a caller can submit
forward_backward and optim_step back to back and await both futures afterwards.

What lives where: this module is the public API; `tinkex_trio._sender` the ordered sender and
its submit/poll tasks; `tinkex_trio._fwdbwd` the chunking of forward/forward_backward calls
(size estimate, cutting, wire forms, merging, PROTOCOL.md 9.1-9.2); `tinkex_trio._custom_loss`
the client-side custom loss (9.8); `tinkex_trio._validate` the argument checks. A training
client holds the service context (`tinkex_trio._context.ServiceContext`), never the
`ServiceClient` that made it.

Error handling: a submit is retried by the transport under its call policy (``submit``:
layers A and B; ``save``: layer B only, PROTOCOL.md 9.3) with the same seq_id; if it finally
fails, its future holds the error and the next request is still sent. A failing client-side
custom loss poisons the client (9.8): its reserved seq_ids can never be sent, so every later
request fails at once with a message saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, final

import msgspec

from tinkex_trio import types as t
from tinkex_trio._context import ServiceContext
from tinkex_trio._custom_loss import (
    CustomLossCall,
    CustomLossFn,
    TensorKind,
    check_tensors,
    for_forward,
)
from tinkex_trio._fwdbwd import (
    FORWARD_BACKWARD_PATH,
    FORWARD_PATH,
    FwdBwdChunk,
    chunk_data as chunk_data,
    decode_result,
    estimate_datum_bytes as estimate_datum_bytes,
    merge_outputs,
)
from tinkex_trio._policy import SAVE, SUBMIT, CallPolicy
from tinkex_trio._polling import json_decoder
from tinkex_trio._sender import BodyFn, OrderedSender, static_body
from tinkex_trio._validate import (
    require_age_recipients,
    require_checkpoint_name,
    require_loss_config,
    require_server_path,
    require_training_data,
    require_ttl,
)
from tinkex_trio.errors import InvalidInputError, TinkexError
from tinkex_trio.futures import APIFuture
from tinkex_trio.sampling import SamplingClient

if TYPE_CHECKING:
    from tinkex_trio.tokenizer import Tokenizer

__all__ = [
    "TrainingClient",
    "TrainingClientStatistics",
    "chunk_data",
    "estimate_datum_bytes",
]

_T = TypeVar("_T")


class TrainingClientStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """`TrainingClient.statistics()`: the run, its next seq_id, requests not yet submitted."""

    model_id: str
    next_seq_id: int
    queued: int
    poisoned: bool


@final
class TrainingClient:
    """Trains one LoRA run; get one from `ServiceClient.create_lora_training_client`.

    Every training method returns an `APIFuture` once the request is queued; the server runs a
    run's requests in call order.
    """

    _ctx: ServiceContext
    _info: t.GetInfoResponse
    _sender: OrderedSender

    def __init__(self) -> None:
        raise TypeError("create TrainingClient with ServiceClient.create_lora_training_client()")

    @classmethod
    def _create(
        cls, ctx: ServiceContext, info: t.GetInfoResponse, *, next_request_id: int
    ) -> TrainingClient:
        self = object.__new__(cls)
        self._ctx = ctx
        self._info = info
        self._sender = OrderedSender(ctx, next_request_id=next_request_id)
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

    async def forward_backward_custom(
        self,
        data: Sequence[t.Datum],
        loss_fn: CustomLossFn,
        *,
        tensors: TensorKind = "numpy",
    ) -> APIFuture[t.ForwardBackwardOutput]:
        """Train on a loss computed here, from the server's per-datum logprobs (PROTOCOL.md 9.8).

        A forward pass returns logprobs; `loss_fn(data, logprobs)` computes the loss; its
        gradient g with respect to the logprobs is sent back as cross-entropy weights -g, which
        gives the model the same gradient. The contract is the same whatever is installed:

        * ``tensors="numpy"`` (default): `logprobs` is a list of float32 numpy arrays, one per
          datum, and `loss_fn` returns ``(loss, grads, metrics)``: a number, d loss / d logprobs
          per datum in the same shapes, and a dict of numbers.
        * ``tensors="torch"``: `logprobs` is a list of float32 torch tensors that require grad
          (torch is imported only when asked for), and `loss_fn` returns ``(loss_tensor,
          metrics)``; the gradients come from autograd.

        The result's `loss:sum` is the custom loss and its metrics are merged in; the server's
        surrogate is under `surrogate_loss:sum`.

        Raises:
            InvalidInputError: bad data, an unknown `tensors`, or ``"torch"`` without torch.

        Error handling: if the forward pass or `loss_fn` fails, or `loss_fn` breaks the
        contract, the returned future holds the error and the client is poisoned (9.8).
        """
        self._check_usable()
        require_training_data(data, "cross_entropy")
        kind = check_tensors(tensors)
        flags = self._ctx.client_config
        stripped = [for_forward(d) for d in data]
        chunks = chunk_data(
            stripped, flags.fwdbwd_max_chunk_len, flags.fwdbwd_max_chunk_bytes_count
        )
        forward = self._queue_chunks(chunks, "cross_entropy", None, forward_only=True)
        call = CustomLossCall(loss_fn, data, forward, kind)
        backward: list[APIFuture[t.ForwardBackwardOutput]] = []
        start = 0
        for chunk, nbytes in chunks:
            seq_id = self._sender.reserve()
            body = call.backward_body(self.model_id, seq_id, chunk, start)
            backward.append(self._queue_chunk(seq_id, body, nbytes, forward_only=False))
            start += len(chunk)
        combined: APIFuture[t.ForwardBackwardOutput] = APIFuture("ForwardBackwardCustom")
        self._ctx.nursery.start_soon(combined._run, lambda: call.finish(backward))
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
        """Save weights and optimizer state as `tinker://<run>/weights/<name>`.

        Like every save, submitted without layer-A retries (the ``save`` policy, PROTOCOL.md
        3.2, 9.3); layer B still applies.
        """
        self._check_usable()
        require_checkpoint_name(name)
        require_ttl(ttl_seconds)
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
            policy=SAVE,
        )

    async def load_state(self, path: str) -> APIFuture[t.LoadWeightsResponse]:
        """Replace this run's weights with checkpoint `path` (optimizer state reset)."""
        return await self._load(path, optimizer=False)

    async def load_state_with_optimizer(self, path: str) -> APIFuture[t.LoadWeightsResponse]:
        """Replace this run's weights and optimizer state with checkpoint `path`."""
        return await self._load(path, optimizer=True)

    async def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[t.SaveWeightsForSamplerResponse]:
        """Save sampler weights as `tinker://<run>/sampler_weights/<name>`."""
        return await self._save_named(
            "/api/v1/save_weights_for_sampler",
            "SaveWeightsForSampler",
            t.SaveWeightsForSamplerRequest,
            t.SaveWeightsForSamplerResponse,
            name,
            ttl_seconds,
        )

    async def save_weights_external(
        self,
        name: str,
        ttl_seconds: int | None = None,
        age_encryption_recipients: Sequence[str] | None = None,
    ) -> APIFuture[t.SaveWeightsExternalResponse]:
        """Export the adapter as `tinker://<run>/external_weights/<name>` (PEFT files).

        With `age_encryption_recipients` (1 to 10 public keys: `age1...` or SSH
        `ssh-ed25519 ...` / `ssh-rsa ...`), the server encrypts every file to them and stores
        it as `<file>.age`; `tinkex_trio.download(..., identity=...)` (CLI `checkpoint
        download --identity FILE`) fetches and decrypts them, as does `age -d -i FILE`.

        Download the files with `tinkex_trio.download` or `RestClient.get_external_weights_urls`.
        Like the other saves, submitted without layer-A retries (PROTOCOL.md 3.2, 9.3).

        Raises:
            InvalidInputError: a bad name, ttl or recipient form (nothing is sent).
        """
        recipients = require_age_recipients(age_encryption_recipients)
        return await self._save_named(
            "/api/v1/save_weights_external",
            "SaveWeightsExternal",
            t.SaveWeightsExternalRequest,
            t.SaveWeightsExternalResponse,
            name,
            ttl_seconds,
            age_encryption_recipients=t.UNSET if recipients is None else recipients,
        )

    async def save_weights_and_get_sampling_client(
        self, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """Snapshot the current weights into a new sampling session and return its client.

        `record_stability_info=True`: the server records every sequence the client samples,
        for `stable_reinforce` (see `SamplingClient`).
        """
        self._check_usable()
        if record_stability_info is not True and record_stability_info is not False:
            raise InvalidInputError(
                f"record_stability_info must be a bool, got {record_stability_info!r}"
            )
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
            policy=SAVE,
        )
        saved = await future
        if not saved.sampling_session_id:
            raise TinkexError(
                "the server's save_weights_for_sampler result has no sampling_session_id"
            )
        return await SamplingClient._for_session(
            self._ctx,
            saved.sampling_session_id,
            base_model=self.base_model or None,
            record_stability_info=record_stability_info,
        )

    async def create_sampling_client(
        self, model_path: str, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """A sampling client for sampler weights saved earlier (`tinker://.../sampler_weights/...`)."""
        self._ctx.check_open("TrainingClient")
        return await SamplingClient._open(
            self._ctx,
            base_model=None,
            model_path=model_path,
            record_stability_info=record_stability_info,
        )

    def statistics(self) -> TrainingClientStatistics:
        sender = self._sender
        return TrainingClientStatistics(
            model_id=self.model_id,
            next_seq_id=sender.next_seq_id,
            queued=sender.queued,
            poisoned=sender.poisoned is not None,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<TrainingClient {s.model_id} next_seq_id={s.next_seq_id} queued={s.queued}>"

    # -- internals -----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        self._ctx.check_open("TrainingClient")
        poisoned = self._sender.poisoned
        if poisoned is not None:
            raise TinkexError(
                "a previous forward_backward_custom failed, so this TrainingClient is poisoned "
                f"(its reserved requests can never be sent): {poisoned!r}"
            ) from poisoned

    async def _forward_backward(
        self,
        data: Sequence[t.Datum],
        loss_fn: str,
        loss_fn_config: dict[str, float] | None,
        *,
        forward_only: bool,
    ) -> APIFuture[t.ForwardBackwardOutput]:
        self._check_usable()
        require_training_data(data, loss_fn)
        config = require_loss_config(loss_fn_config)
        flags = self._ctx.client_config
        chunks = chunk_data(data, flags.fwdbwd_max_chunk_len, flags.fwdbwd_max_chunk_bytes_count)
        futures = self._queue_chunks(chunks, loss_fn, config, forward_only=forward_only)
        if len(futures) == 1:
            return futures[0]
        combined: APIFuture[t.ForwardBackwardOutput] = APIFuture("ForwardBackward")

        async def merge() -> t.ForwardBackwardOutput:
            return merge_outputs([await f for f in futures])

        self._ctx.nursery.start_soon(combined._run, merge)
        return combined

    def _queue_chunks(
        self,
        chunks: Sequence[tuple[list[t.Datum], int]],
        loss_fn: str,
        config: dict[str, float] | None,
        *,
        forward_only: bool,
    ) -> list[APIFuture[t.ForwardBackwardOutput]]:
        futures = []
        for chunk, nbytes in chunks:
            seq_id = self._sender.reserve()
            body = static_body(
                FwdBwdChunk(self.model_id, seq_id, chunk, loss_fn, config, forward_only)
            )
            futures.append(self._queue_chunk(seq_id, body, nbytes, forward_only=forward_only))
        return futures

    def _queue_chunk(
        self, seq_id: int, body: BodyFn, nbytes: int, *, forward_only: bool
    ) -> APIFuture[t.ForwardBackwardOutput]:
        return self._sender.enqueue(
            seq_id,
            FORWARD_PATH if forward_only else FORWARD_BACKWARD_PATH,
            "Forward" if forward_only else "ForwardBackward",
            body,
            decode_result,
            nbytes=nbytes,
        )

    async def _load(self, path: str, *, optimizer: bool) -> APIFuture[t.LoadWeightsResponse]:
        self._check_usable()
        require_server_path("path", path)
        return self._queue_request(
            "/api/v1/load_weights",
            "LoadWeights",
            lambda seq_id: t.LoadWeightsRequest(
                model_id=self.model_id, seq_id=seq_id, path=path, optimizer=optimizer
            ),
            t.LoadWeightsResponse,
        )

    async def _save_named(
        self,
        path: str,
        request_type: str,
        request_cls: type[t.SaveWeightsForSamplerRequest | t.SaveWeightsExternalRequest],
        result_type: type[_T],
        name: str,
        ttl_seconds: int | None,
        **fields: Any,
    ) -> APIFuture[_T]:
        """A save to `name` under the ``save`` policy (PROTOCOL.md 3.2, 9.3: no layer A);
        `fields` are further fields of the request."""
        self._check_usable()
        require_checkpoint_name(name)
        require_ttl(ttl_seconds)
        return self._queue_request(
            path,
            request_type,
            lambda seq_id: request_cls(
                model_id=self.model_id,
                path=name,
                seq_id=seq_id,
                ttl_seconds=t.UNSET if ttl_seconds is None else ttl_seconds,
                **fields,
            ),
            result_type,
            policy=SAVE,
        )

    def _queue_request(
        self,
        path: str,
        request_type: str,
        build: Callable[[int], t.Request],
        result_type: type[_T],
        *,
        policy: CallPolicy = SUBMIT,
    ) -> APIFuture[_T]:
        """Reserve the next seq_id, encode `build(seq_id)` and queue it; JSON result."""
        seq_id = self._sender.reserve()
        body = t.encode(build(seq_id))
        return self._sender.enqueue(
            seq_id, path, request_type, static_body(body), json_decoder(result_type), policy=policy
        )
