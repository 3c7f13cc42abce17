"""The ordered sender of one training run: seq_ids, one submit at a time, a poll per request.

Ordering (PROTOCOL.md 5.2): every call reserves its seq_id(s) synchronously, in call order, and
puts its submissions on an unbounded memory channel in the same synchronous step, so the order
of calls is the order on the channel even when many tasks call at once. One sender task per
training client reads the channel and POSTs strictly one after another; each POST that
succeeds turns into a poll task in the service nursery, so a caller can submit
forward_backward and optim_step back to back and await both futures afterwards.

Error handling: a submit goes under its `CallPolicy` (``submit``: layers A and B, ``save``:
layer B only, PROTOCOL.md 9.3) with the same seq_id on every attempt; if it finally fails, its
future holds the error and the next request is still sent (the server treats the seq_id as
consumed). A body that cannot be built (a client-side custom loss that failed, 9.8) poisons
the sender: its reserved seq_ids can never be sent, so every later request fails at once. A
415 to a JSON forward_backward switches the service to protobuf bodies for good (PROTOCOL.md 6)
and the chunk is sent again as protobuf.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import httpx
import msgspec
import trio

from tinkex_trio import _fwdbwd, _protobuf, types as t
from tinkex_trio._context import ServiceContext
from tinkex_trio._fwdbwd import FwdBwdChunk
from tinkex_trio._policy import SUBMIT, CallPolicy
from tinkex_trio._polling import ResultDecoder
from tinkex_trio.errors import APIStatusError, ClientClosedError, TinkexError
from tinkex_trio.futures import APIFuture

_T = TypeVar("_T")

_logger: Final = logging.getLogger("tinkex_trio.training")

# A server that only takes protobuf forward_backward bodies answers JSON ones with this.
UNSUPPORTED_MEDIA_TYPE: Final = 415

BodyFn = Callable[[], Awaitable["bytes | FwdBwdChunk"]]
"""Builds a submission's body when its turn comes (a custom loss's backward chunk waits for
the forward pass); a forward/forward_backward chunk is encoded by the sender."""


def static_body(body: bytes | FwdBwdChunk) -> BodyFn:
    """A body known when the request is queued."""

    async def get() -> bytes | FwdBwdChunk:
        return body

    return get


@dataclasses.dataclass(eq=False)
class Submission:
    seq_id: int
    path: str
    request_type: str
    body: BodyFn
    future: APIFuture[Any]
    decode: ResultDecoder[Any]
    policy: CallPolicy = SUBMIT
    nbytes: int = 0
    protobuf_result: bool = False


class OrderedSender:
    """Submits one training run's requests in seq_id order from a task of the service nursery."""

    def __init__(self, ctx: ServiceContext, *, next_request_id: int) -> None:
        self._ctx = ctx
        self._next_request_id = next_request_id
        self.poisoned: BaseException | None = None
        self._send, receive = trio.open_memory_channel[Submission](math.inf)
        ctx.nursery.start_soon(self._run, receive)

    @property
    def next_seq_id(self) -> int:
        return self._next_request_id + 1

    @property
    def queued(self) -> int:
        return self._send.statistics().current_buffer_used

    def reserve(self) -> int:
        """The next seq_id (PROTOCOL.md 5.2: id + 1, so the first after create_model is 1)."""
        self._next_request_id += 1
        return self._next_request_id

    def enqueue(
        self,
        seq_id: int,
        path: str,
        request_type: str,
        body: BodyFn,
        decode: ResultDecoder[_T],
        *,
        policy: CallPolicy = SUBMIT,
        nbytes: int = 0,
    ) -> APIFuture[_T]:
        """Queue a submission for `seq_id` (reserved by the caller); its future, at once."""
        future: APIFuture[_T] = APIFuture(request_type)
        try:
            self._send.send_nowait(
                Submission(seq_id, path, request_type, body, future, decode, policy, nbytes)
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The sender task has already ended: the service is closing (a task started in a
            # cancelled scope runs up to its first checkpoint, which may be after this call).
            # Like a request left in the queue, the future fails; awaiting it in a cancelled
            # scope raises Cancelled first.
            future._set_error(_closed_error())
        return future

    async def _run(self, receive: trio.MemoryReceiveChannel[Submission]) -> None:
        """Submit queued requests one by one, in seq_id order; start a poll for each.

        When the service closes (this task is cancelled), every request not yet handed to a
        poll task gets `ClientClosedError`, so no future is left waiting forever.
        """
        current: Submission | None = None
        async with receive:
            try:
                async for sub in receive:
                    current = sub
                    await self._send_one(sub)
                    current = None
            finally:
                _fail_unsent(current, receive)

    async def _send_one(self, sub: Submission) -> None:
        """Submit one queued request; its future gets the outcome (or a poll task)."""
        if self.poisoned is not None:
            sub.future._set_error(
                TinkexError("this TrainingClient is poisoned by a failed custom loss")
            )
            return
        try:
            body = await sub.body()
        except Exception as exc:  # the user's custom loss failed
            self.poisoned = exc
            error = TinkexError(f"forward_backward_custom's loss failed: {exc!r}")
            error.__cause__ = exc
            sub.future._set_error(error)
            return
        ctx = self._ctx
        await ctx.fwdbwd_budget.acquire(sub.nbytes)
        try:
            submitted = await self._submit(sub, body)
            future = t.decode(submitted.content, t.UntypedAPIFuture)
        except (TinkexError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            ctx.fwdbwd_budget.release(sub.nbytes)
            sub.future._set_error(
                exc if isinstance(exc, TinkexError) else TinkexError(f"bad submit response: {exc}")
            )
            return
        sub.future.request_id = future.request_id
        ctx.nursery.start_soon(
            sub.future._run, functools.partial(self._poll, sub, future.request_id)
        )

    async def _submit(self, sub: Submission, body: bytes | FwdBwdChunk) -> httpx.Response:
        """POST one request; a forward_backward chunk in the service's current wire form."""
        transport = self._ctx.transport
        if not isinstance(body, FwdBwdChunk):
            return await transport.request("POST", sub.path, content=body, policy=sub.policy)
        protobuf = self._ctx.fwdbwd_protobuf()
        try:
            return await self._post_chunk(sub, body, protobuf=protobuf)
        except APIStatusError as exc:
            if protobuf or exc.status_code != UNSUPPORTED_MEDIA_TYPE:
                raise
            _logger.info(
                "the server refused a JSON forward_backward with 415; switching this service "
                "to protobuf forward_backward bodies (PROTOCOL.md 6)"
            )
            self._ctx.fwdbwd_protobuf_forced = True
            return await self._post_chunk(sub, body, protobuf=True)

    async def _post_chunk(
        self, sub: Submission, chunk: FwdBwdChunk, *, protobuf: bool
    ) -> httpx.Response:
        transport = self._ctx.transport
        if not protobuf:
            path, content = _fwdbwd.encode_json(chunk)
            # The result is asked for as protobuf all the same: measured (benchmarks/
            # bench_encode.py), a ForwardBackwardOutput of real logprobs decodes 2-3x faster
            # from its packed arrays than from JSON. A server that only speaks JSON answers
            # JSON, and the decoder reads either by Content-Type (PROTOCOL.md 4.2 rule 1, 4.5).
            sub.protobuf_result = True
            return await transport.request("POST", path, content=content, policy=sub.policy)
        content = _fwdbwd.encode_protobuf(chunk)
        headers: dict[str, str] = {}
        if self._ctx.client_config.proto_compress_fwdbwd:
            content = _protobuf.compress(content)
            headers["Content-Encoding"] = _protobuf.ZSTD_ENCODING
        # PROTOCOL.md 4.5: results of protobuf requests are asked for as protobuf.
        sub.protobuf_result = True
        return await transport.request(
            "POST",
            _fwdbwd.FORWARD_BACKWARD_PATH,
            content=content,
            content_type=_protobuf.PROTOBUF_CONTENT_TYPE,
            headers=headers,
            policy=sub.policy,
        )

    async def _poll(self, sub: Submission, request_id: str) -> Any:
        try:
            return await self._ctx.poller.poll(
                request_id,
                sub.request_type,
                sub.decode,
                on_queue_state=sub.future._on_queue_state,
                protobuf=sub.protobuf_result,
            )
        finally:
            self._ctx.fwdbwd_budget.release(sub.nbytes)


def _closed_error() -> ClientClosedError:
    return ClientClosedError(
        "the service closed before this request was submitted; await training "
        "futures inside the `async with open_service(...)` block"
    )


def _fail_unsent(
    current: Submission | None, receive: trio.MemoryReceiveChannel[Submission]
) -> None:
    closed = _closed_error()
    if current is not None:
        current.future._set_error(closed)
    while True:
        try:
            receive.receive_nowait().future._set_error(closed)
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
