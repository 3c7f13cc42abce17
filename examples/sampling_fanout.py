"""Thousands of concurrent samples from one nursery, with back-pressure and telemetry.

Every sample is its own task in one nursery: `--count` tasks (default 2000) call
`SamplingClient.sample` at once. Nothing here limits them by hand; the SDK's back-pressure
does:

* the sampling client's concurrency limit (`sample_max_concurrent_requests` from the server's
  client config) caps how many samples are in flight;
* the service-wide rate limiter (`service.rate_limiter`) caps concurrent submissions and, on
  a 429, holds every sender back for a window, then lets them through at a lower limit;
* results go through a bounded memory channel to one consumer task, so a slow consumer
  slows the producers instead of piling results up in memory.

A telemetry handler counts the SDK's events (`RequestFinished` by status, `RetryScheduled`,
`QueueStateChanged` by state, `FutureCompleted`), and a monitor task records the peak
number of samples and submissions in flight. The summary prints calls/s, the rate limiter's
statistics and the event counts.

Runs against the local backend (`tinkex_trio.local`) unless both TINKER_API_KEY and
TINKER_BASE_URL are set, in which case it uses that service. Usage::

    python examples/sampling_fanout.py                       # 2000 samples, SmolLM2-135M
    python examples/sampling_fanout.py --count 100 --model tinkex-trio/SmolLM2-tiny-random

On the local backend the engine is the bottleneck (a few samples per second for SmolLM2-135M
on 2 CPU cores, in batches of 16), so the default 2000 takes several minutes there; use
`--count` or `--quick` for a short run. The local backend never answers 429, so the rate
limiter stays open; against a hosted service under load you will see `rate_limited_total`
rise and `RetryScheduled`/queue-state events appear.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import trio
from _backend import add_backend_arguments, open_example_service

import tinkex_trio
from tinkex_trio import telemetry, types

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The best way to learn is",
    "In the beginning",
]


class EventCounts:
    """A telemetry handler: counts events by kind. Runs inline, so it only increments."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, event: telemetry.Event) -> None:
        match event:
            case telemetry.RequestFinished(status=status, path=path):
                self.counts[f"RequestFinished {path.rsplit('/', 1)[-1]} {status}"] += 1
            case telemetry.RequestFailed(error_type=error_type):
                self.counts[f"RequestFailed {error_type}"] += 1
            case telemetry.RetryScheduled(reason=reason):
                self.counts[f"RetryScheduled {reason}"] += 1
            case telemetry.QueueStateChanged(queue_state=state):
                self.counts[f"QueueStateChanged {state}"] += 1
            case telemetry.FutureCompleted(request_type=kind, ok=ok):
                self.counts[f"FutureCompleted {kind} {'ok' if ok else 'error'}"] += 1
            case _:
                self.counts[type(event).__name__] += 1


class Peaks:
    """What the monitor saw: peak samples in flight, peak submissions, 429 windows."""

    def __init__(self) -> None:
        self.samples_in_flight = 0
        self.submits_in_flight = 0
        self.backing_off_seen = False


async def monitor(
    service: tinkex_trio.ServiceClient, sampler: tinkex_trio.SamplingClient, peaks: Peaks
) -> None:
    while True:
        limiter = service.rate_limiter.statistics()
        peaks.submits_in_flight = max(peaks.submits_in_flight, limiter.in_flight)
        peaks.backing_off_seen |= limiter.backing_off
        peaks.samples_in_flight = max(peaks.samples_in_flight, sampler.statistics().in_flight)
        await trio.sleep(0.05)


async def run(args: argparse.Namespace) -> None:
    counts = EventCounts()
    peaks = Peaks()
    async with open_example_service(args.model, args.data_dir) as service:
        remove_handler = service.telemetry.add_handler(counts)
        sampler = await service.create_sampling_client(base_model=args.model)
        tokenizer = sampler.get_tokenizer()
        prompts = [types.ModelInput.from_ints(tokenizer.encode(p)) for p in PROMPTS]
        params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, stop=[])
        send, receive = trio.open_memory_channel[types.SampleResponse](args.buffer)
        received = 0
        tokens = 0

        async def one_sample(
            index: int, send: trio.MemorySendChannel[types.SampleResponse]
        ) -> None:
            async with send:
                response = await sampler.sample(
                    prompts[index % len(prompts)], sampling_params=params
                )
                await send.send(response)  # blocks while the consumer is behind

        async def consume() -> None:
            nonlocal received, tokens
            async with receive:
                async for response in receive:
                    received += 1
                    tokens += sum(len(s.tokens) for s in response.sequences)
                    if received % max(1, args.count // 10) == 0:
                        print(f"  {received}/{args.count} samples", flush=True)

        print(
            f"sampling {args.count} x {args.max_tokens} tokens from {args.model}, "
            f"all started at once (client limit: "
            f"{service.client_config.sample_max_concurrent_requests} in flight)"
        )
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor, service, sampler, peaks)
            async with trio.open_nursery() as work:
                work.start_soon(consume)
                async with send:
                    for index in range(args.count):
                        work.start_soon(one_sample, index, send.clone())
            nursery.cancel_scope.cancel()
        elapsed = time.monotonic() - started
        remove_handler()
        limiter = service.rate_limiter.statistics()
        stats = sampler.statistics()

    print(f"samples: {received} in {elapsed:.2f} s = {received / elapsed:.1f} calls/s")
    print(f"tokens: {tokens} = {tokens / elapsed:.1f} tokens/s")
    print(
        f"sampling client: completed {stats.completed}, retries {stats.retries}, "
        f"peak in flight {peaks.samples_in_flight}"
    )
    print(
        f"rate limiter: rate_limited_total {limiter.rate_limited_total}, "
        f"backing_off now {limiter.backing_off}, seen backing off {peaks.backing_off_seen}, "
        f"submission limit {limiter.limit}, peak submissions in flight {peaks.submits_in_flight}"
    )
    queue_states = {k: v for k, v in counts.counts.items() if k.startswith("QueueStateChanged")}
    print(f"queue-state events: {sum(queue_states.values())}")
    print("telemetry events:")
    for name, count in sorted(counts.counts.items()):
        print(f"  {name}: {count}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_backend_arguments(parser)
    parser.add_argument("--count", type=int, default=2000, help="samples (default: 2000)")
    parser.add_argument("--quick", action="store_true", help="same as --count 100")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--buffer", type=int, default=16, help="result channel capacity")
    args = parser.parse_args()
    if args.quick:
        args.count = 100
    trio.run(run, args)


if __name__ == "__main__":
    main()
