"""`SamplingClient`: sample and score from thousands of tasks at once.

`sample()` runs in the caller's task (concurrency comes from the caller's own nursery, as trio
users expect). Each call goes through:

1. the per-client concurrency limit (`sample_max_concurrent_requests`, PROTOCOL.md 9.4);
2. `POST /api/v1/asample` under the transport's ``sample`` policy (`tinkex_trio._policy`):
   every attempt inside the service-wide `RateLimiter` (the dispatch limits on concurrent
   submissions and bytes, 9.5); a 429 opens its window for every sampling client of the
   service and the same body (same seq_id) is resubmitted when it closes; a 402 waits in the
   shared billing pause (9.6) and opens the window too;
3. polling of the result (`tinkex_trio._polling`), with no lock or slot held; a call abandoned
   here (cancelled, timed out, service closing) has its request cancelled on the server when
   the server's dynamic flag `sample_cancel_enabled` is on (PROTOCOL.md 4.9,
   `tinkex_trio._dynamic`);
4. the retry handler (layer D, 9.4, the policy module's `SAMPLE_RETRY` applied by
   `Transport.retry`): timeouts, connection errors, 410 (the result expired) and 408/409/5xx
   retry the whole call with a new seq_id after `min(0.5 * 2**k, 10)` s +-25 %.

Error handling: `RequestFailedError` and other 4xx propagate at once; `timeout=` bounds the
whole call (including retries) and raises `ResultTimeoutError`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, final

import httpx
import msgspec
import trio

from tinkex_trio import _protobuf, types as t
from tinkex_trio._completions import CompletionWatcher
from tinkex_trio._context import ServiceContext
from tinkex_trio._dispatch import SAMPLE_BYTES_PER_TOKEN
from tinkex_trio._limits import estimate_model_input_bytes
from tinkex_trio._policy import CALL, SAMPLE, SAMPLE_RETRY
from tinkex_trio._polling import result_first
from tinkex_trio._validate import require_server_path, require_str
from tinkex_trio.errors import APIError, InvalidInputError, ResultTimeoutError, TinkexError
from tinkex_trio.rest import RestClient

if TYPE_CHECKING:
    from tinkex_trio.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS: Final = 16
"""`SamplingParams.max_tokens` when the caller leaves it unset (the official SDK's default)."""
_ASAMPLE_PATH: Final = "/api/v1/asample"
# PROTOCOL.md 1.4, 9.5: every asample asks for back-pressure (a 429) rather than queuing.
_BACKPRESSURE_HEADERS: Final = {"X-Tinker-Sampling-Backpressure": "1"}


class SamplingClientStatistics(msgspec.Struct, frozen=True, kw_only=True):
    sampling_session_id: str
    in_flight: int
    completed: int
    retries: int


@final
class SamplingClient:
    """Samples from a base model or saved sampler weights; safe to share between tasks.

    Get one from `ServiceClient.create_sampling_client` or
    `TrainingClient.save_weights_and_get_sampling_client`. With `record_stability_info=True`
    every request asks the server to record what it sampled (tokens and the sampler's
    log-probs, per `SampledSequence.sequence_id`), which `stable_reinforce` training reads
    through the datums' provenance spans (PROTOCOL.md 8.7).
    """

    _ctx: ServiceContext
    sampling_session_id: str
    model_path: str | None
    _base_model: str | None
    record_stability_info: bool
    _seq_ids: itertools.count[int]
    _limit: trio.CapacityLimiter
    _completed: int
    _retries: int
    _watcher: CompletionWatcher | None

    def __init__(self) -> None:
        raise TypeError("create SamplingClient with ServiceClient.create_sampling_client()")

    @classmethod
    def _create(
        cls,
        ctx: ServiceContext,
        sampling_session_id: str,
        *,
        base_model: str | None,
        model_path: str | None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        self = object.__new__(cls)
        self._ctx = ctx
        self.sampling_session_id = sampling_session_id
        self._base_model = base_model
        self.model_path = model_path
        self.record_stability_info = record_stability_info
        self._seq_ids = itertools.count()
        self._limit = trio.CapacityLimiter(ctx.client_config.sample_max_concurrent_requests)
        self._completed = 0
        self._retries = 0
        self._watcher = None
        return self

    @classmethod
    async def _open(
        cls,
        ctx: ServiceContext,
        *,
        base_model: str | None,
        model_path: str | None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """A new sampling session for a base model or sampler weights, and its client.

        What `ServiceClient.create_sampling_client` does; a `TrainingClient` uses it too, with
        the service context only.
        """
        _require_bool("record_stability_info", record_stability_info)
        if (base_model is None) == (model_path is None):
            raise InvalidInputError(
                "create_sampling_client needs exactly one of base_model= or model_path="
            )
        if base_model is not None:
            require_str("base_model", base_model)
        if model_path is not None:
            require_server_path("model_path", model_path)
        request = t.CreateSamplingSessionRequest(
            session_id=ctx.session_id,
            sampling_session_seq_id=next(ctx.sampling_session_seq_ids),
            base_model=t.UNSET if base_model is None else base_model,
            model_path=t.UNSET if model_path is None else model_path,
        )
        response = await ctx.transport.request(
            "POST", "/api/v1/create_sampling_session", content=t.encode(request), policy=CALL
        )
        created = t.decode(response.content, t.CreateSamplingSessionResponse)
        return await cls._for_session(
            ctx,
            created.sampling_session_id,
            base_model=base_model,
            model_path=model_path,
            record_stability_info=record_stability_info,
        )

    @classmethod
    async def _for_session(
        cls,
        ctx: ServiceContext,
        sampling_session_id: str,
        *,
        base_model: str | None = None,
        model_path: str | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """A client for an existing sampling session (asks the server for its base model if
        not given: `GET samplers/{id}`)."""
        _require_bool("record_stability_info", record_stability_info)
        if base_model is None:
            sampler = await RestClient(ctx.transport).get_sampler(sampling_session_id)
            base_model = sampler.base_model
            model_path = sampler.model_path
        return cls._create(
            ctx,
            sampling_session_id,
            base_model=base_model,
            model_path=model_path,
            record_stability_info=record_stability_info,
        )

    def get_base_model(self) -> str:
        return self._base_model or ""

    def get_tokenizer(self) -> Tokenizer:
        from tinkex_trio.tokenizer import get_tokenizer

        if not self._base_model:
            raise InvalidInputError("this sampling session's base model is unknown")
        return get_tokenizer(self._base_model)

    async def sample(
        self,
        prompt: t.ModelInput,
        num_samples: int = 1,
        sampling_params: t.SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        timeout: float | None = None,
    ) -> t.SampleResponse:
        """Sample `num_samples` continuations of `prompt`.

        `sampling_params` defaults to `SamplingParams(max_tokens=16)`; an omitted `stop`
        stops at the end-of-sequence token, `stop=[]` never stops before `max_tokens`.

        Raises:
            InvalidInputError: bad arguments (checked before anything is sent).
            RequestFailedError: the server could not run it (e.g. a prompt past the context).
            ResultTimeoutError: `timeout` seconds passed.
        """
        self._ctx.check_open("SamplingClient")
        params = sampling_params if sampling_params is not None else t.SamplingParams()
        if params.max_tokens is t.UNSET:
            params = msgspec.structs.replace(params, max_tokens=DEFAULT_MAX_TOKENS)
        _validate_sample_args(prompt, num_samples, params, topk_prompt_logprobs)
        if include_prompt_logprobs is not True and include_prompt_logprobs is not False:
            raise InvalidInputError("include_prompt_logprobs must be a bool")
        request = t.SampleRequest(
            num_samples=num_samples,
            prompt=prompt,
            sampling_params=params,
            sampling_session_id=self.sampling_session_id,
            prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            record_stability_info=self.record_stability_info,
        )
        return await self._with_timeout(request, timeout)

    async def compute_logprobs(
        self, prompt: t.ModelInput, *, timeout: float | None = None
    ) -> list[float | None]:
        """The model's logprob of each prompt token given the ones before (entry 0 is None)."""
        self._ctx.check_open("SamplingClient")
        params = t.SamplingParams(max_tokens=1, temperature=1.0, top_k=-1, top_p=1.0)
        _validate_sample_args(prompt, 1, params, 0)
        request = t.SampleRequest(
            num_samples=1,
            prompt=prompt,
            sampling_params=params,
            sampling_session_id=self.sampling_session_id,
            prompt_logprobs=True,
            record_stability_info=self.record_stability_info,
        )
        response = await self._with_timeout(request, timeout)
        if response.prompt_logprobs is None:
            raise APIError("the server returned no prompt_logprobs for compute_logprobs")
        return response.prompt_logprobs

    def statistics(self) -> SamplingClientStatistics:
        return SamplingClientStatistics(
            sampling_session_id=self.sampling_session_id,
            in_flight=self._limit.borrowed_tokens,
            completed=self._completed,
            retries=self._retries,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<SamplingClient {s.sampling_session_id} base_model={self._base_model!r} "
            f"in_flight={s.in_flight} completed={s.completed}>"
        )

    # -- internals -----------------------------------------------------------------------------

    async def _with_timeout(
        self, request: t.SampleRequest, timeout: float | None
    ) -> t.SampleResponse:
        if timeout is None:
            return await self._sample_with_retries(request)
        if math.isnan(timeout) or timeout < 0:
            raise InvalidInputError(f"timeout must be a non-negative number, got {timeout}")
        with trio.move_on_after(timeout) as scope:
            return await self._sample_with_retries(request)
        assert scope.cancelled_caught
        raise ResultTimeoutError(f"sample did not finish within {timeout} s")

    async def _sample_with_retries(self, request: t.SampleRequest) -> t.SampleResponse:
        async with self._limit:
            response = await self._ctx.transport.retry(
                SAMPLE_RETRY, functools.partial(self._sample_once, request)
            )
        self._completed += 1
        return response

    async def _sample_once(self, request: t.SampleRequest, attempt: int) -> t.SampleResponse:
        """One submission (the same seq_id across 429/402 resubmits) and its result."""
        if attempt:
            self._retries += 1
        ctx = self._ctx
        seq_id = next(self._seq_ids)
        body = t.encode(msgspec.structs.replace(request, seq_id=seq_id))
        response = await ctx.transport.request(
            "POST",
            _ASAMPLE_PATH,
            content=body,
            headers=_BACKPRESSURE_HEADERS,
            policy=SAMPLE,
            throttle=ctx.rate_limiter,
            weight=estimate_model_input_bytes(request.prompt, SAMPLE_BYTES_PER_TOKEN),
        )
        future = _decode_submit(response)
        try:
            result = await self._result_of(future)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # Abandoned (cancel scope, `timeout=`, service closing) while the server still
                # works on it: queue a cancel_future (PROTOCOL.md 4.9). Never awaited here, so
                # a cancelled caller does not wait on the network.
                ctx.sample_canceller.abandon(future.request_id)
            raise
        ids = future.sample_sequence_ids
        if ids is not None and len(ids) == len(result.sequences):
            for sequence, sequence_id in zip(result.sequences, ids, strict=True):
                sequence.sequence_id = sequence_id
        return result

    async def _result_of(self, future: t.UntypedAPIFuture) -> t.SampleResponse:
        """Wait for a submitted sample's result (session-wide watcher or its own polls)."""
        ctx = self._ctx
        watcher: CompletionWatcher | None = None
        if ctx.client_config.sample_use_retrieve_futures:
            # PROTOCOL.md 4.8: wait on the sampling session's shared long-poll, then fetch.
            if self._watcher is None:
                self._watcher = CompletionWatcher(ctx, self.sampling_session_id)
            watcher = self._watcher
            await watcher.wait(future.request_id)
        ids = future.sample_sequence_ids
        try:
            # PROTOCOL.md 4.5: a protobuf-speaking client asks for the result as protobuf.
            result = await ctx.poller.poll(
                future.request_id,
                "Sample",
                result_first(functools.partial(_sample_result, ids)),
                protobuf=ctx.config.wire_format == "protobuf",
            )
        except TinkexError:
            if watcher is not None:
                watcher.retrieved(future.request_id)
            raise
        if watcher is not None:
            watcher.retrieved(future.request_id)
        return result


def _sample_result(sequence_ids: list[str] | None, response: httpx.Response) -> t.SampleResponse:
    """A sample result in either form (PROTOCOL.md 4.2 rule 1, 6.5)."""
    if _protobuf.PROTOBUF_CONTENT_TYPE in response.headers.get("content-type", ""):
        return _protobuf.decode_sample_response(response.content, sequence_ids)
    return t.decode(response.content, t.SampleResponse)


def _decode_submit(response: httpx.Response) -> t.UntypedAPIFuture:
    try:
        return t.decode(response.content, t.UntypedAPIFuture)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise APIError(f"invalid asample submit response: {exc}", request=response.request) from exc


def _require_bool(name: str, value: object) -> None:
    if value is not True and value is not False:
        raise InvalidInputError(f"{name} must be a bool, got {value!r}")


def _validate_sample_args(
    prompt: t.ModelInput, num_samples: int, params: t.SamplingParams, topk: int
) -> None:
    if not isinstance(prompt, t.ModelInput):
        raise InvalidInputError(
            f"prompt must be a ModelInput (e.g. ModelInput.from_ints(tokens)), got {type(prompt).__name__}"
        )
    try:
        length = prompt.length
    except ValueError as exc:
        raise InvalidInputError(f"prompt: {exc}") from None
    if length == 0:
        raise InvalidInputError("prompt is empty: give at least one token")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidInputError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not isinstance(params, t.SamplingParams):
        raise InvalidInputError("sampling_params must be a SamplingParams")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise InvalidInputError(f"topk_prompt_logprobs must be an int >= 0, got {topk!r}")


def tokens_of(sequences: Sequence[t.SampledSequence]) -> list[list[int]]:
    """The token lists of sampled sequences (a convenience for scoring loops)."""
    return [list(s.tokens) for s in sequences]


__all__ = ["DEFAULT_MAX_TOKENS", "SamplingClient", "SamplingClientStatistics", "tokens_of"]
