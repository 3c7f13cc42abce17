"""`SamplingClient`: sample and score from thousands of tasks at once.

`sample()` runs in the caller's task (concurrency comes from the caller's own nursery, as trio
users expect). Each call goes through:

1. the per-client concurrency limit (`sample_max_concurrent_requests`, PROTOCOL.md 9.4);
2. the service-wide `RateLimiter`: a 429 window shared by every sampling client of the service,
   and the dispatch limits on concurrent submissions and bytes (9.5);
3. `POST /api/v1/asample`, resubmitted with the same seq_id after a 429 or 402;
4. polling of the result, with no lock or slot held; a call abandoned here (cancelled, timed
   out, service closing) has its request cancelled on the server when the server's dynamic
   flag `sample_cancel_enabled` is on (PROTOCOL.md 4.9, `tinkex_trio._dynamic`);
5. the retry handler (9.4): timeouts, connection errors, 410 (the result expired) and
   408/409/5xx retry the whole call with a new seq_id after `min(0.5 * 2**k, 10)` s +-25 %.

Error handling: `RequestFailedError` and other 4xx propagate at once; `timeout=` bounds the
whole call (including retries) and raises `ResultTimeoutError`.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, final

import httpx
import msgspec
import trio

from tinkex_trio import _protobuf, types as t
from tinkex_trio._completions import CompletionWatcher
from tinkex_trio._context import ServiceContext
from tinkex_trio._dispatch import SAMPLE_BYTES_PER_TOKEN
from tinkex_trio.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    BillingError,
    GoneError,
    InvalidInputError,
    ResultTimeoutError,
    TinkexError,
    status_error_for,
)

if TYPE_CHECKING:
    from tinkex_trio.tokenizer import Tokenizer

# PROTOCOL.md 9.4: whole-call retries back off min(0.5 * 2**k, 10) s with +-25 % jitter.
RETRY_BASE_DELAY: Final = 0.5
RETRY_MAX_DELAY: Final = 10.0
RETRY_JITTER: Final = 0.25
_RETRYABLE_STATUSES: Final = frozenset({408, 409, 429})
# PROTOCOL.md 9.6: a 402 on a submit is waited out in 5 s steps for up to an hour.
BILLING_RETRY_DELAY: Final = 5.0
DEFAULT_MAX_TOKENS: Final = 16


class SamplingClientStatistics(msgspec.Struct, frozen=True, kw_only=True):
    sampling_session_id: str
    in_flight: int
    completed: int
    retries: int


def _estimate_bytes(prompt: t.ModelInput) -> int:
    size = 0
    for chunk in prompt.chunks:
        if isinstance(chunk, t.EncodedTextChunk):
            size += SAMPLE_BYTES_PER_TOKEN * len(chunk.tokens)
        elif isinstance(chunk, t.ImageChunk):
            size += len(chunk.data)
        else:
            size += len(chunk.location)
    return size


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, APIConnectionError | GoneError):
        return True
    if isinstance(exc, APIStatusError):
        return exc.status_code in _RETRYABLE_STATUSES or exc.status_code >= 500
    return False


@final
class SamplingClient:
    """Samples from a base model or saved sampler weights; safe to share between tasks.

    Get one from `ServiceClient.create_sampling_client` or
    `TrainingClient.save_weights_and_get_sampling_client`.
    """

    _ctx: ServiceContext
    sampling_session_id: str
    model_path: str | None
    _base_model: str | None
    _seq_ids: itertools.count[int]
    _limit: trio.CapacityLimiter
    _completed: int
    _retries: int
    _random: random.Random
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
    ) -> SamplingClient:
        self = object.__new__(cls)
        self._ctx = ctx
        self.sampling_session_id = sampling_session_id
        self._base_model = base_model
        self.model_path = model_path
        self._seq_ids = itertools.count()
        self._limit = trio.CapacityLimiter(ctx.client_config.sample_max_concurrent_requests)
        self._completed = 0
        self._retries = 0
        self._random = random.Random()
        self._watcher = None
        return self

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
            attempt = 0
            while True:
                try:
                    response = await self._sample_once(request)
                except Exception as exc:
                    if not _retryable(exc):
                        raise
                    delay = min(RETRY_BASE_DELAY * 2**attempt, RETRY_MAX_DELAY)
                    delay *= 1 + self._random.uniform(-RETRY_JITTER, RETRY_JITTER)
                    attempt += 1
                    self._retries += 1
                    await trio.sleep(delay)
                    continue
                self._completed += 1
                return response

    async def _sample_once(self, request: t.SampleRequest) -> t.SampleResponse:
        """One submission (same seq_id across 429/402 resubmits) and its result."""
        ctx = self._ctx
        limiter = ctx.rate_limiter
        seq_id = next(self._seq_ids)
        body = t.encode(msgspec.structs.replace(request, seq_id=seq_id))
        estimate = _estimate_bytes(request.prompt)
        billing_since: float | None = None
        while True:
            async with limiter.dispatch(estimate):
                response = await ctx.transport.request(
                    "POST",
                    "/api/v1/asample",
                    content=body,
                    headers={"X-Tinker-Sampling-Backpressure": "1"},
                    max_retries=0,
                    raise_for_status=False,
                )
            if response.status_code == 429:
                limiter.on_rate_limited(estimate)
                continue
            if response.status_code == 402:
                now = trio.current_time()
                billing_since = now if billing_since is None else billing_since
                if (
                    now - billing_since
                    >= ctx.client_config.billing_exception_max_pause_duration_sec
                ):
                    error = status_error_for(response)
                    assert isinstance(error, BillingError)
                    raise error
                limiter.on_rate_limited(estimate)
                await trio.sleep(BILLING_RETRY_DELAY)
                continue
            if response.status_code >= 300:
                raise status_error_for(response)
            limiter.on_success()
            break
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
        # PROTOCOL.md 4.5: a protobuf-speaking client asks for the result as protobuf.
        accept = (
            _protobuf.PROTOBUF_CONTENT_TYPE
            if ctx.config.wire_format == "protobuf"
            else "application/json"
        )
        try:
            result = await ctx.poller.poll(
                future.request_id, "Sample", functools.partial(_sample_result, ids), accept=accept
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


__all__ = ["SamplingClient", "tokens_of"]
