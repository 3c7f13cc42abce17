"""Execution order: one engine worker, per-model seq_id lanes, batched sampling.

* **Engine worker.** Every engine call goes through `EngineRunner.call`, which runs it in a
  worker thread under a `CapacityLimiter(1)`: the engine contract (`_engine_api.py`) promises
  the engine a single caller, so it needs no locks. Tests in virtual time use `in_thread=False`
  (the call then runs inline on the trio thread), because MockClock's autojump cannot see
  worker threads (STYLE.md 2.11).
* **Training lanes.** Each training model has a lane that executes its requests strictly in
  `seq_id` order (PROTOCOL.md 5.2, 10.6): request 0 is create_model or create-via-load, the
  first one after that is 1, and an out-of-order arrival waits in the lane until the gap is
  filled. A seq_id whose submission was rejected with a 4xx still counts as consumed (5.2), so
  the lane gets a no-op for it. A gap is waited for at most `gap_timeout` seconds (from when
  the lane first stalls on it): then every request waiting behind it fails with category
  `user`, naming the missing seq_ids, and the lane continues after the highest of them, so a
  seq_id that never reaches the server (5.2: "a permanent gap") cannot hold a model forever.
* **Sampling.** Requests are collected for a short window (and for as long as the engine is
  busy with something else), then handed to `engine.sample` as one batch. `SampleBatcher.queued`
  counts the requests submitted but not yet handed to the engine: the app answers `asample`
  with 429 when it reaches the back-pressure limit (PROTOCOL.md 9.5, 10.8). `cancel_future`
  (4.9) takes a request out of the queue (`SampleBatcher.cancel`): the engine never runs it and
  its back-pressure slot is free at once.
* **Failures.** A job's `EngineUserError` fails its future with category `user`; any other
  exception fails it with category `server` and is logged with its traceback. Either way the
  lane moves on: one failed request never poisons the next (PROTOCOL.md 4.7).
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import trio

from tinkex_trio import types as t

from ._engine_api import (
    AdamStep,
    DatumArrays,
    Engine,
    EngineUserError,
    ForwardBackwardResult,
    LoraSpec,
    LossName,
    SampleRequest,
    SampleResult,
)
from ._futures import FutureRegistry
from ._residency import Residency

if TYPE_CHECKING:
    from ._custom_graph import CustomLoss
from ._store import Category

logger = logging.getLogger("tinkex_trio.local.scheduler")

T = TypeVar("T")
P = ParamSpec("P")

#: How long the sampler waits for more concurrent requests before running a batch. A few
#: milliseconds cost nothing next to a CPU decode step (~100 ms, LOCAL_MODEL_NOTES.md) and let a
#: burst of `asample` submissions share one batched engine call.
SAMPLE_BATCH_WINDOW = 0.005
#: Upper bound on requests per engine.sample call (memory of the batched KV cache).
SAMPLE_BATCH_MAX = 16

#: A job computes its result as a wire Struct (`tinkex_trio.types`); the lane encodes and
#: stores it and wakes pollers.
JobFn = Callable[[], Awaitable[t.Response]]


def _serialised(
    method: Callable[Concatenate[Engine, P], T],
) -> Callable[Concatenate[EngineRunner, P], Awaitable[T]]:
    """`EngineRunner`'s async form of the `Engine` method `method`: the same arguments, run
    on the engine's one worker by `EngineRunner._call`."""
    name = method.__name__

    async def call(runner: EngineRunner, /, *args: P.args, **kwargs: P.kwargs) -> T:
        bound: Callable[P, T] = getattr(runner._engine, name)
        return await runner._call(functools.partial(bound, *args, **kwargs))

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`Engine.{name}`, on the engine's worker."
    return call


class EngineRunner:
    """The engine as the server sees it: one async method per `Engine` method, each call
    serialised onto one worker thread (or run inline, for virtual-time tests).

    Nothing else in the server calls the engine, so the single-caller promise of the engine
    contract holds by construction.
    """

    def __init__(
        self, engine: Engine, *, in_thread: bool = True, residency: Residency | None = None
    ) -> None:
        self._engine = engine
        self._in_thread = in_thread
        self._limiter = trio.CapacityLimiter(1)
        self.residency = residency if residency is not None else Residency(Path("offload"), None)
        """Which training adapters are in memory (`_residency.py`); offloads go through here."""
        # Held across "make the adapter resident" and the call that uses it, so no other
        # call offloads it in between. Sampling does not take it (it uses no training adapter).
        self._adapters = trio.Lock()

    @property
    def busy(self) -> bool:
        return self._limiter.borrowed_tokens > 0

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the engine for the block: no engine call starts until it ends.

        What a long engine call looks like from outside, without a thread: virtual-time tests
        use it to make the engine "slow" (a sleep in the FakeEngine would be real time).
        """
        async with self._limiter:
            yield

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._in_thread:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        async with self._limiter:
            await trio.lowlevel.checkpoint()
            return fn(*args)

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Blocking work that is not the engine's (file flushes): in a worker thread of its
        own, so it neither blocks the event loop nor waits for the engine; inline when the
        engine runs inline (virtual-time tests, where autojump cannot see threads)."""
        if self._in_thread:
            return await trio.to_thread.run_sync(fn, *args)
        await trio.lowlevel.checkpoint()
        return fn(*args)

    # The engine's methods, each run as one serialised call (the Engine protocol's signatures).
    models = _serialised(Engine.models)
    sample = _serialised(Engine.sample)

    # The methods that name a training adapter also keep `residency` true: the adapter is made
    # resident first (reloaded if it was offloaded, others offloaded to make room).

    async def create_adapter(self, adapter_id: str, base_model: str, lora: LoraSpec) -> None:
        async with self._adapters:
            await self._make_room(adapter_id)
            await self._call(self._engine.create_adapter, adapter_id, base_model, lora)
            self.residency.used(adapter_id, base_model)
            self.residency.gradients(adapter_id, False)

    async def load_state(
        self, adapter_id: str, base_model: str, directory: Path, *, with_optimizer: bool
    ) -> LoraSpec:
        async with self._adapters:
            await self._make_room(adapter_id)
            spec = await self._call(
                functools.partial(
                    self._engine.load_state,
                    adapter_id,
                    base_model,
                    directory,
                    with_optimizer=with_optimizer,
                )
            )
            await self.run_blocking(shutil.rmtree, self.residency.directory_of(adapter_id), True)
            self.residency.used(adapter_id, base_model)
            self.residency.gradients(adapter_id, False)
            return spec

    async def drop_adapter(self, adapter_id: str) -> None:
        """Release everything the engine holds for the adapter, in memory or offloaded."""
        async with self._adapters:
            await self._call(self._engine.drop_adapter, adapter_id)
            self.residency.forget(adapter_id)
            await self.run_blocking(shutil.rmtree, self.residency.directory_of(adapter_id), True)

    async def forward_backward(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss_fn: LossName,
        loss_fn_config: dict[str, float],
        forward_only: bool,
    ) -> ForwardBackwardResult:
        async with self._adapters:
            await self._resident(adapter_id)
            if not forward_only:
                # Set before the call: a failure half-way may leave gradients behind too.
                self.residency.gradients(adapter_id, True)
            return await self._call(
                self._engine.forward_backward,
                adapter_id,
                data,
                loss_fn,
                loss_fn_config,
                forward_only,
            )

    async def forward_backward_custom(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss: CustomLoss,
        forward_only: bool,
    ) -> ForwardBackwardResult:
        async with self._adapters:
            await self._resident(adapter_id)
            if not forward_only:
                self.residency.gradients(adapter_id, True)
            return await self._call(
                self._engine.forward_backward_custom, adapter_id, data, loss, forward_only
            )

    async def optim_step(self, adapter_id: str, params: AdamStep) -> dict[str, float]:
        async with self._adapters:
            await self._resident(adapter_id)
            metrics = await self._call(self._engine.optim_step, adapter_id, params)
            self.residency.gradients(adapter_id, False)
            return metrics

    async def save_state(self, adapter_id: str, directory: Path, *, with_optimizer: bool) -> int:
        async with self._adapters:
            await self._resident(adapter_id)
            return await self._call(
                functools.partial(
                    self._engine.save_state, adapter_id, directory, with_optimizer=with_optimizer
                )
            )

    async def _resident(self, adapter_id: str) -> None:
        """Reload the adapter if it was offloaded (making room first); mark it used."""
        base_model = self.residency.is_offloaded(adapter_id)
        if base_model is None:
            self.residency.touch(adapter_id)
            return
        await self._make_room(adapter_id)
        directory = self.residency.directory_of(adapter_id)
        await self._call(
            functools.partial(
                self._engine.load_state, adapter_id, base_model, directory, with_optimizer=True
            )
        )
        self.residency.reloaded(adapter_id)
        await self.run_blocking(shutil.rmtree, directory, True)
        logger.info("reloaded training adapter %s from %s", adapter_id, directory)

    async def _make_room(self, keep: str) -> None:
        """Offload least recently used idle adapters until `keep` fits the budget."""
        for victim in self.residency.victims(keep):
            directory = self.residency.directory_of(victim)
            await self.run_blocking(_empty_directory, directory)
            await self._call(
                functools.partial(self._engine.save_state, victim, directory, with_optimizer=True)
            )
            await self._call(self._engine.drop_adapter, victim)
            self.residency.offloaded(victim)
            logger.info("offloaded idle training adapter %s to %s", victim, directory)


def _empty_directory(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


async def run_job(registry: FutureRegistry, request_id: str, fn: JobFn) -> None:
    """Run one job and finish its future; never raises (except Cancelled)."""
    registry.mark_running(request_id)
    try:
        result = t.encode(await fn())
    except EngineUserError as exc:
        registry.fail(request_id, str(exc) or type(exc).__name__, "user")
    except Exception as exc:
        logger.exception("request %s failed in the local backend", request_id)
        registry.fail(request_id, f"internal error: {type(exc).__name__}: {exc}", "server")
    else:
        registry.complete(request_id, result)


@dataclass
class _Lane:
    next_seq: int
    pending: dict[int, tuple[str, JobFn] | None] = field(default_factory=dict)
    # When the lane first stalled on the current gap (trio time), or None while not stalled.
    stalled_since: float | None = None
    # Requests without a seq_id (unload_model): run whenever the next seq_id is not ready.
    unsequenced: list[tuple[str, JobFn]] = field(default_factory=list)
    # The lane's last job (`close_lane`): after it the lane ends.
    closing: Callable[[], Awaitable[None]] | None = None
    wake: trio.Event = field(default_factory=trio.Event)


class TrainingLanes:
    """Per-model strict seq_id execution. Lanes are tasks in the nursery given to `run`."""

    def __init__(
        self,
        registry: FutureRegistry,
        on_advance: Callable[[str, int], None],
        *,
        gap_timeout: float = math.inf,
    ) -> None:
        self._registry = registry
        self._on_advance = on_advance  # (model_id, next_seq) -> persist
        self._gap_timeout = gap_timeout
        self._lanes: dict[str, _Lane] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def open_lane(self, model_id: str, next_seq: int) -> None:
        """Create the lane for a model (idempotent; an existing lane keeps its position)."""
        if model_id in self._lanes:
            return
        if self._nursery is None:
            raise RuntimeError("TrainingLanes.run is not running")
        lane = _Lane(next_seq=next_seq)
        self._lanes[model_id] = lane
        self._nursery.start_soon(self._drive, model_id, lane)

    def has_lane(self, model_id: str) -> bool:
        return model_id in self._lanes

    def next_seq(self, model_id: str) -> int:
        return self._lanes[model_id].next_seq

    def is_queued(self, model_id: str, seq_id: int) -> bool:
        return seq_id in self._lanes[model_id].pending

    def submit_unsequenced(self, model_id: str, request_id: str, fn: JobFn) -> None:
        """Queue a request that has no seq_id (unload_model, or a client that sent none).

        It takes no seq_id of its own (the client's counter did not count it), and runs as
        soon as the lane has nothing ready to run in seq_id order.
        """
        lane = self._lanes[model_id]
        lane.unsequenced.append((request_id, fn))
        lane.wake.set()

    def submit(self, model_id: str, seq_id: int, request_id: str, fn: JobFn) -> None:
        lane = self._lanes[model_id]
        lane.pending[seq_id] = (request_id, fn)
        lane.wake.set()

    def consume(self, model_id: str, seq_id: int) -> None:
        """Mark a rejected seq_id as used so later requests do not wait for it forever."""
        lane = self._lanes.get(model_id)
        if lane is None or seq_id < lane.next_seq or seq_id in lane.pending:
            return
        lane.pending[seq_id] = None
        lane.wake.set()

    def close_lane(self, model_id: str, last: Callable[[], Awaitable[None]]) -> None:
        """Run `last` once the lane has nothing ready to run, then end the lane: requests
        still waiting behind a seq_id gap then fail (the model is being released)."""
        lane = self._lanes.get(model_id)
        if lane is None:
            raise KeyError(model_id)
        lane.closing = last
        lane.wake.set()

    async def _close(self, model_id: str, lane: _Lane, last: Callable[[], Awaitable[None]]) -> None:
        try:
            await last()
        except Exception:
            logger.exception("releasing model %s failed", model_id)
        for job in lane.pending.values():
            if job is not None:
                self._registry.fail(
                    job[0],
                    f"model {model_id!r} was released (its session finished) before this "
                    "request could run",
                    "user",
                )
        del self._lanes[model_id]

    async def _drive(self, model_id: str, lane: _Lane) -> None:
        while True:
            if lane.next_seq not in lane.pending:
                if lane.unsequenced:
                    request_id, fn = lane.unsequenced.pop(0)
                    await run_job(self._registry, request_id, fn)
                    continue
                if lane.closing is not None:
                    await self._close(model_id, lane, lane.closing)
                    return
                lane.wake = trio.Event()
                if not lane.pending:
                    await lane.wake.wait()
                    continue
                if lane.stalled_since is None:
                    lane.stalled_since = trio.current_time()
                with trio.move_on_at(lane.stalled_since + self._gap_timeout) as waiting:
                    await lane.wake.wait()
                if waiting.cancelled_caught:
                    self._abandon_gap(model_id, lane)
                continue
            lane.stalled_since = None
            job = lane.pending.pop(lane.next_seq)
            if job is not None:
                await run_job(self._registry, job[0], job[1])
            lane.next_seq += 1
            self._on_advance(model_id, lane.next_seq)

    def _abandon_gap(self, model_id: str, lane: _Lane) -> None:
        """The gap before the lowest waiting seq_id was not filled in time: fail what waits
        behind it and move the lane past the highest waiting seq_id."""
        first_waiting = min(lane.pending)
        missing = (
            f"seq_id {lane.next_seq}"
            if first_waiting == lane.next_seq + 1
            else f"seq_ids {lane.next_seq}..{first_waiting - 1}"
        )
        for seq_id, job in sorted(lane.pending.items()):
            if job is None:
                continue
            self._registry.fail(
                job[0],
                f"seq_id {seq_id} of {model_id!r} waited {self._gap_timeout:g} s for the "
                f"missing {missing}, which never arrived, so it was not executed; the model "
                f"continues at seq_id {max(lane.pending) + 1}: resubmit from there",
                "user",
            )
        logger.warning(
            "model %s: gave up waiting for %s; failed %d request(s) waiting behind it",
            model_id,
            missing,
            sum(job is not None for job in lane.pending.values()),
        )
        lane.next_seq = max(lane.pending) + 1
        lane.pending.clear()
        lane.stalled_since = None
        self._on_advance(model_id, lane.next_seq)


@dataclass
class _SampleJob:
    request_id: str
    request: SampleRequest
    finish: Callable[[SampleResult], t.SampleResponse]
    # Set by `SampleBatcher.cancel`; the job then stays in the channel but is skipped.
    cancelled: bool = False


class SampleBatcher:
    """Collects concurrent sampling requests and runs them as engine batches."""

    def __init__(self, runner: EngineRunner, registry: FutureRegistry) -> None:
        self._runner = runner
        self._registry = registry
        self._send, self._receive = trio.open_memory_channel[_SampleJob](math.inf)
        # Submitted, not yet handed to the engine, not cancelled; by request id.
        self._waiting: dict[str, _SampleJob] = {}

    @property
    def queued(self) -> int:
        """Requests submitted but not yet handed to the engine (in the channel or a batch
        still being gathered) and not cancelled: the number the asample back-pressure limit
        applies to."""
        return len(self._waiting)

    def submit(
        self,
        request_id: str,
        request: SampleRequest,
        finish: Callable[[SampleResult], t.SampleResponse],
    ) -> None:
        """Queue a request; `finish` turns its engine result into the wire result."""
        job = _SampleJob(request_id, request, finish)
        self._send.send_nowait(job)
        self._waiting[request_id] = job

    def cancel(self, request_id: str) -> bool:
        """Take a request out of the queue (PROTOCOL.md 4.9): the engine will never run it.

        Returns False if it is not waiting (unknown, already handed to the engine, or
        cancelled before). The caller fails its future; this only frees the queue slot.
        """
        job = self._waiting.pop(request_id, None)
        if job is None:
            return False
        job.cancelled = True
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for first in self._receive:
            if first.cancelled:
                continue
            batch = [first]
            with trio.move_on_after(SAMPLE_BATCH_WINDOW):
                while len(batch) < SAMPLE_BATCH_MAX:
                    self._gather(batch, await self._receive.receive())
            # While the engine is busy (a training step), keep gathering.
            while self._runner.busy and len(batch) < SAMPLE_BATCH_MAX:
                with trio.move_on_after(SAMPLE_BATCH_WINDOW):
                    self._gather(batch, await self._receive.receive())
            await self._run_batch(batch)

    @staticmethod
    def _gather(batch: list[_SampleJob], job: _SampleJob) -> None:
        if not job.cancelled:
            batch.append(job)

    async def _run_batch(self, gathered: Sequence[_SampleJob]) -> None:
        # Jobs cancelled while the batch was being gathered are left out.
        batch = [job for job in gathered if not job.cancelled]
        if not batch:
            await trio.lowlevel.checkpoint()
            return
        for job in batch:
            del self._waiting[job.request_id]
            self._registry.mark_running(job.request_id)
        try:
            results = await self._runner.sample([job.request for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"engine.sample returned {len(results)} results for {len(batch)} requests"
                )
        except Exception as exc:
            if not isinstance(exc, EngineUserError):
                logger.exception("sampling batch of %d failed", len(batch))
            category: Category = "user" if isinstance(exc, EngineUserError) else "server"
            message = str(exc) if category == "user" else f"internal error: {exc!r}"
            for job in batch:
                self._registry.fail(job.request_id, message, category)
            return
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, EngineUserError):
                self._registry.fail(job.request_id, str(result), "user")
                continue
            try:
                payload = t.encode(job.finish(result))
            except Exception as exc:
                logger.exception("encoding the sampling result of %s failed", job.request_id)
                self._registry.fail(job.request_id, f"internal error: {exc!r}", "server")
            else:
                self._registry.complete(job.request_id, payload)
