"""The official `tinker` SDK's side of the side-by-side benchmarks (run in its own venv).

    <official venv>/bin/python benchmarks/_official_client.py MODE BASE_URL [ARGS...]

Modes (each prints one JSON line: ``wall`` and ``cpu`` seconds of the measured part only,
session setup excluded; ``cpu`` is the process's CPU time, its background thread included):

* ``fanout BASE_URL N``: N concurrent ``sample_async`` calls (asyncio.gather);
* ``fwdbwd BASE_URL DATUMS TOKENS``: one forward_backward, datums built from Python lists,
  built, sent and its result received;
* ``pipelined BASE_URL STEPS DATUMS TOKENS``: STEPS forward_backward + optim_step pairs submitted
  back to back, then every result awaited;
* ``encode - DATUMS TOKENS REPEAT``: lists to protobuf body bytes, the SDK's own request path
  (median of REPEAT, no server).

The data come from ``numpy.random.default_rng(0)`` exactly as in our benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np
import tinker
from tinker import types

API_KEY = "tml-bench-key"


def _system_time() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def lists(datums: int, tokens: int) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    rng = np.random.default_rng(0)
    all_tokens = rng.integers(0, 49_152, size=(datums, tokens + 1), dtype=np.int64)
    weights = rng.random((datums, tokens)).astype(np.float32)
    return (
        [row[:-1].tolist() for row in all_tokens],
        [row[1:].tolist() for row in all_tokens],
        [row.tolist() for row in weights],
    )


def build(token_lists: Any, target_lists: Any, weight_lists: Any) -> list[Any]:
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(token_lists[i]),
            loss_fn_inputs={"target_tokens": target_lists[i], "weights": weight_lists[i]},
        )
        for i in range(len(token_lists))
    ]


def ready(obj: Any) -> Any:
    return obj.result() if callable(getattr(type(obj), "result", None)) else obj


def measure(fn: Any) -> dict[str, float]:
    cpu0, sys0, wall0 = time.process_time(), _system_time(), time.perf_counter()
    fn()
    return {
        "wall": time.perf_counter() - wall0,
        "cpu": time.process_time() - cpu0,  # user + system, every thread of the process
        "sys": _system_time() - sys0,
    }


def main() -> None:
    mode, base_url, *args = sys.argv[1:]
    os.environ["TINKER_TELEMETRY"] = "0"
    if mode == "encode":
        from tinker.proto.request_conv import forward_backward_request_to_proto

        datums, tokens, repeat = (int(a) for a in args)
        data = lists(datums, tokens)

        def encode() -> bytes:
            request = types.ForwardBackwardRequest(
                forward_backward_input=types.ForwardBackwardInput(
                    data=build(*data), loss_fn="cross_entropy"
                ),
                model_id="bench:train:0",
                seq_id=1,
            )
            body: bytes = forward_backward_request_to_proto(request).SerializeToString()
            return body

        encode()
        times = []
        for _ in range(repeat):
            started = time.process_time()
            encode()
            times.append(time.process_time() - started)
        print(json.dumps({"cpu": statistics.median(times)}))
        return

    service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
    if mode == "fanout":
        (n,) = (int(a) for a in args)
        sampler = ready(service.create_sampling_client(base_model="stub/model"))
        params = types.SamplingParams(max_tokens=2)

        async def fan_out() -> None:
            await asyncio.gather(
                *(
                    sampler.sample_async(types.ModelInput.from_ints([i]), 1, params)
                    for i in range(n)
                )
            )

        result = measure(lambda: asyncio.run(fan_out()))
    elif mode == "fwdbwd":
        datums, tokens = (int(a) for a in args)
        training = ready(service.create_lora_training_client(base_model="stub/model", rank=8))
        data = lists(datums, tokens)
        result = measure(lambda: training.forward_backward(build(*data), "cross_entropy").result())
    elif mode == "pipelined":
        steps, datums, tokens = (int(a) for a in args)
        training = ready(service.create_lora_training_client(base_model="stub/model", rank=8))
        data = lists(datums, tokens)

        def loop() -> None:
            futures = []
            for _ in range(steps):
                futures.append(training.forward_backward(build(*data), "cross_entropy"))
                futures.append(training.optim_step(types.AdamParams(learning_rate=1e-4)))
            for future in futures:
                future.result()

        result = measure(loop)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result))
    os._exit(0)  # the SDK's background thread and session: nothing to wait for


if __name__ == "__main__":
    main()
