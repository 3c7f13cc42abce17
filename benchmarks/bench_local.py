"""Throughput of the local backend: trained tokens/s and sampled tokens/s.

The measuring functions take "engine-like" callables, so the same loops time TorchEngine called
directly (here) and, later, the server over HTTP (wrap the SDK calls in the same signatures):

- `TrainStep(data) -> None`: one forward_backward + optim_step on `data`.
- `SampleCall(requests) -> int`: run the requests, return how many tokens were generated.

Run: `.venv/bin/python benchmarks/bench_local.py [--models tiny,real] [--threads N]
[--dtype float32|bfloat16]` (the engine also prints its resident memory after loading).
Sizes stay small (LOCAL_MODEL_NOTES.md budgets) so a run takes about a minute on 2 cores.

Against the reference stack (`--mode versus-hf`, needs the `bench` extra: transformers + peft):
the engine and `transformers` / `peft` on the same SmolLM2-135M safetensors the engine loads,
float32, in one process, in interleaved rounds (engine, reference, reference, engine, ...), so
load from other processes hits both alike. Reported per case: the median wall time of each
side, the spread (min-max), the ratio of medians, and the median of the per-round ratios, for
wall time and for process CPU time (steadier when other processes load the machine).

- sampling: 8 prompts x 32 new tokens (temperature 1, no top-k/top-p, never stopping) against
  `generate(do_sample=True, top_k=0, min_new_tokens=32)`; one prompt x 8 samples
  (`num_samples=8` against `num_return_sequences=8`); and 8 x 32 through a rank-32 LoRA adapter
  (a saved checkpoint against the same A/B in a `peft` model). The engine also returns every
  token's log-prob; `generate` does not.
- training: one forward + backward + AdamW step of cross-entropy on 4 x 128 and 8 x 64 tokens,
  rank-32 LoRA (alpha 32) on q, k, v, o, gate, up, down and lm_head on both sides, the same
  initial A/B. The reference computes `log_softmax(logits).gather(targets)` and uses
  `torch.optim.AdamW`.

`--mode quickstart` times the README's main example (`examples/sl_quickstart.py` on the real
model) as a user runs it, in a child process.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinkex_trio.local._engine_api import (
    AdamStep,
    DatumArrays,
    SampleRequest,
    SampleResult,
)
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import SMOLLM2_NAME, TINY_NAME

TrainStep = Callable[[Sequence[DatumArrays]], None]
SampleCall = Callable[[Sequence[SampleRequest]], int]


@dataclass(frozen=True)
class Measurement:
    label: str
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"{self.label:<44} {self.tokens:>6} tokens {self.seconds:7.2f} s "
            f"{self.tokens_per_second:9.1f} tokens/s"
        )


def random_batch(rows: int, length: int, seed: int = 0, vocab: int = 49152) -> list[DatumArrays]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(rows):
        seq = rng.integers(0, vocab, size=length + 1)
        data.append(
            DatumArrays(
                seq[:-1].astype(np.int64),
                {"target_tokens": seq[1:].astype(np.int64), "weights": np.ones(length, np.float32)},
            )
        )
    return data


def measure_training(
    label: str, train_step: TrainStep, data: Sequence[DatumArrays], steps: int, warmup: int = 1
) -> Measurement:
    """Trained (input) tokens per second over `steps` full steps, after `warmup` steps."""
    for _ in range(warmup):
        train_step(data)
    tokens = sum(int(d.tokens.shape[0]) for d in data) * steps
    start = time.perf_counter()
    for _ in range(steps):
        train_step(data)
    return Measurement(label, tokens, time.perf_counter() - start)


def measure_sampling(
    label: str, sample: SampleCall, requests: Sequence[SampleRequest], repeats: int = 1
) -> Measurement:
    """Generated tokens per second (prefill time included) over `repeats` calls."""
    sample(requests[:1])  # warm-up: model load, allocator
    tokens = 0
    start = time.perf_counter()
    for _ in range(repeats):
        tokens += sample(requests)
    return Measurement(label, tokens, time.perf_counter() - start)


def engine_train_step(engine: TorchEngine, adapter_id: str) -> TrainStep:
    def step(data: Sequence[DatumArrays]) -> None:
        engine.forward_backward(adapter_id, data, "cross_entropy", {}, False)
        engine.optim_step(adapter_id, AdamStep(learning_rate=1e-4))

    return step


def engine_sample_call(engine: TorchEngine) -> SampleCall:
    def call(requests: Sequence[SampleRequest]) -> int:
        total = 0
        for result in engine.sample(requests):
            if not isinstance(result, SampleResult):
                raise result
            total += sum(len(s.tokens) for s in result.sequences)
        return total

    return call


def sampling_requests(
    model: str, batch: int, prompt_len: int, new_tokens: int
) -> list[SampleRequest]:
    rng = np.random.default_rng(1)
    return [
        SampleRequest(
            base_model=model,
            adapter_dir=None,
            prompt=[int(t) for t in rng.integers(3, 49152, size=prompt_len)],
            max_tokens=new_tokens,
            stop=[],  # always generate exactly new_tokens
            seed=i,
        )
        for i in range(batch)
    ]


# (label, model, training shapes [(rows, length, steps)], sampling shapes [(batch, prompt, new)])
PLANS = {
    "tiny": (TINY_NAME, [(4, 128, 5), (8, 512, 2)], [(1, 32, 64), (8, 32, 64)]),
    "real": (SMOLLM2_NAME, [(4, 32, 2), (4, 128, 1)], [(1, 43, 16), (8, 43, 16)]),
}


def _resident_mib() -> float:
    """This process's resident memory (VmRSS), MiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_engine_benchmarks(
    models: Sequence[str], threads: int | None, dtype: str = "float32"
) -> list[Measurement]:
    from tinkex_trio.local._engine_api import LoraSpec

    results = []
    for key in models:
        model, train_shapes, sample_shapes = PLANS[key]
        before = _resident_mib()
        engine = TorchEngine(models=[model], threads=threads, dtype=dtype)  # type: ignore[arg-type]
        engine.create_adapter("bench", model, LoraSpec(rank=32, seed=0))
        engine._model(model)
        print(f"{key} ({dtype} weights): +{_resident_mib() - before:.0f} MiB resident after load")
        step = engine_train_step(engine, "bench")
        for rows, length, steps in train_shapes:
            m = measure_training(
                f"{key} train {rows}x{length} (engine)", step, random_batch(rows, length), steps
            )
            print(m, flush=True)
            results.append(m)
        call = engine_sample_call(engine)
        for batch, prompt, new in sample_shapes:
            m = measure_sampling(
                f"{key} sample batch {batch}, {prompt}+{new} (engine)",
                call,
                sampling_requests(model, batch, prompt, new),
            )
            print(m, flush=True)
            results.append(m)
    return results


class SdkPortal:
    """The SDK, connected to a server, driven from this (non-trio) thread.

    A background thread runs `trio.run` with one `open_service` block; `call` runs a coroutine
    there with `trio.from_thread.run`, so the blocking `TrainStep`/`SampleCall` signatures of
    the engine measurements wrap SDK calls unchanged.
    """

    def __init__(self, base_url: str, api_key: str) -> None:
        import threading

        import trio

        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main, base_url, api_key))
        self._thread.start()
        self._ready.wait()

    async def _main(self, base_url: str, api_key: str) -> None:
        import trio

        from tinkex_trio import open_service

        async with open_service(base_url=base_url, api_key=api_key, telemetry=False) as service:
            self.service = service
            self.token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        import trio

        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        import trio

        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join()


def http_train_step(portal: SdkPortal, training: Any) -> TrainStep:
    from tinkex_trio import AdamParams, Datum, ModelInput

    async def step(data: Sequence[DatumArrays]) -> None:
        datums = [
            Datum(model_input=ModelInput.from_ints(d.tokens), loss_fn_inputs=dict(d.loss_fn_inputs))
            for d in data
        ]
        fb = await training.forward_backward(datums, "cross_entropy")
        opt = await training.optim_step(AdamParams(learning_rate=1e-4))
        await fb
        await opt

    return lambda data: portal.call(step, data)


def http_sample_call(portal: SdkPortal, sampler: Any) -> SampleCall:
    import trio

    from tinkex_trio import ModelInput, SamplingParams

    async def call(requests: Sequence[SampleRequest]) -> int:
        total = 0

        async def one(req: SampleRequest) -> None:
            nonlocal total
            params = SamplingParams(max_tokens=req.max_tokens, stop=[], seed=req.seed)
            result = await sampler.sample(ModelInput.from_ints(req.prompt), 1, params)
            total += sum(len(s.tokens) for s in result.sequences)

        async with trio.open_nursery() as nursery:
            for req in requests:
                nursery.start_soon(one, req)
        return total

    return lambda requests: portal.call(call, requests)


def run_http_benchmarks(models: Sequence[str], threads: int | None) -> list[Measurement]:
    """The same loops through the SDK against `tinkex-trio serve` in a child process."""
    import os
    import subprocess
    import sys
    import tempfile

    results = []
    env = dict(os.environ)
    if threads is not None:
        env["TINKEX_TRIO_TORCH_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tinkex_trio.cli",
                "serve",
                "--port",
                "0",
                "--data-dir",
                data_dir,
                "--api-key",
                "tml-bench",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            assert server.stdout is not None
            url = ""
            for line in server.stdout:
                if "listening on" in line:
                    url = line.rsplit(" ", 1)[1].strip()
                    break
            portal = SdkPortal(url, "tml-bench")
            try:
                for key in models:
                    model, train_shapes, sample_shapes = PLANS[key]
                    training = portal.call(
                        lambda m=model: portal.service.create_lora_training_client(
                            m, rank=32, seed=0
                        )
                    )
                    step = http_train_step(portal, training)
                    for rows, length, steps in train_shapes:
                        m = measure_training(
                            f"{key} train {rows}x{length} (HTTP)",
                            step,
                            random_batch(rows, length),
                            steps,
                        )
                        print(m, flush=True)
                        results.append(m)
                    sampler = portal.call(
                        lambda m=model: portal.service.create_sampling_client(base_model=m)
                    )
                    call = http_sample_call(portal, sampler)
                    for batch, prompt, new in sample_shapes:
                        m = measure_sampling(
                            f"{key} sample batch {batch}, {prompt}+{new} (HTTP)",
                            call,
                            sampling_requests(model, batch, prompt, new),
                        )
                        print(m, flush=True)
                        results.append(m)
            finally:
                portal.close()
        finally:
            server.terminate()
            server.wait()
    return results


LORA_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
]


@dataclass
class Case:
    """One workload timed on both sides: `ours()` and `reference()` each run it once."""

    label: str
    ours: Callable[[], object]
    reference: Callable[[], object]


def _time(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time is the steadier of the two
    when other processes share the cores (idle OpenMP threads sleep, so it counts work)."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def compare(cases: Sequence[Case], rounds: int) -> None:
    """Warm both sides up, then time `rounds` interleaved rounds; print medians and ratios."""
    import os
    import statistics

    print(f"load average before: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)", flush=True)
    for case in cases:
        case.ours()
        case.reference()
    ours: dict[str, list[tuple[float, float]]] = {c.label: [] for c in cases}
    theirs: dict[str, list[tuple[float, float]]] = {c.label: [] for c in cases}
    for index in range(rounds):
        for case in cases:
            # Alternate who goes first, so a burst of outside load does not favour one side.
            if index % 2 == 0:
                ours[case.label].append(_time(case.ours))
                theirs[case.label].append(_time(case.reference))
            else:
                theirs[case.label].append(_time(case.reference))
                ours[case.label].append(_time(case.ours))
        print(f"round {index + 1}/{rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    for kind, pick in (("wall", 0), ("CPU", 1)):
        print(
            f"\n{kind + ' time':<46} {'engine s (min-max)':>22} {'reference s (min-max)':>24} "
            f"{'ratio':>6} {'per-round':>9}"
        )
        for case in cases:
            a = [m[pick] for m in ours[case.label]]
            b = [m[pick] for m in theirs[case.label]]
            per_round = statistics.median(y / x for x, y in zip(a, b, strict=True))
            print(
                f"{case.label:<46} {statistics.median(a):6.2f} ({min(a):5.2f}-{max(a):5.2f})"
                f"      {statistics.median(b):6.2f} ({min(b):5.2f}-{max(b):5.2f})"
                f"       {statistics.median(b) / statistics.median(a):5.2f}x {per_round:8.2f}x"
            )


def versus_transformers_cases(threads: int | None, adapter_dir: Any) -> list[Case]:
    """The workloads of `--mode versus-hf` (see the module docstring)."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        raise SystemExit(
            "--mode versus-hf needs transformers and peft: pip install -e '.[bench]'"
        ) from None
    from tinkex_trio.local._engine_api import LoraSpec
    from tinkex_trio.local.model_files import smollm2_files

    directory = smollm2_files().weights_path.parent  # the engine's own safetensors + config
    engine = TorchEngine(models=[SMOLLM2_NAME], threads=threads)
    engine.create_adapter("bench", SMOLLM2_NAME, LoraSpec(rank=32, alpha=32.0, seed=0))
    engine.save_state("bench", adapter_dir, with_optimizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tuned = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32),
        peft.LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )
    ours_lora = dict(engine._adapters["bench"].lora.named_parameters())
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            key = name.replace(".lora_A.default.", ".lora_A.").replace(
                ".lora_B.default.", ".lora_B."
            )
            if param.requires_grad:
                param.copy_(ours_lora[key])
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)

    prompts = sampling_requests(SMOLLM2_NAME, 8, 43, 32)
    prompt_ids = torch.tensor([r.prompt for r in prompts])
    one_prompt = [dataclasses.replace(prompts[0], num_samples=8)]
    with_adapter = [dataclasses.replace(r, adapter_dir=adapter_dir) for r in prompts]
    sample = engine_sample_call(engine)

    def generate(model: Any, ids: Any, copies: int = 1) -> object:
        with torch.inference_mode():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=32,
                min_new_tokens=32,
                num_return_sequences=copies,
                pad_token_id=2,
            )

    def reference_train_step(data: Sequence[DatumArrays]) -> None:
        tokens = torch.from_numpy(np.stack([d.tokens for d in data]))
        targets = torch.from_numpy(np.stack([d.loss_fn_inputs["target_tokens"] for d in data]))
        weights = torch.from_numpy(np.stack([d.loss_fn_inputs["weights"] for d in data]))
        tuned.train()
        logits = tuned(input_ids=tokens).logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (-(logp * weights).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()

    train = engine_train_step(engine, "bench")
    cases = [
        Case(
            "sample 8 prompts x 32 tokens",
            lambda: sample(prompts),
            lambda: generate(hf, prompt_ids),
        ),
        Case(
            "sample 1 prompt x 8 samples x 32 tokens",
            lambda: sample(one_prompt),
            lambda: generate(hf, prompt_ids[:1], copies=8),
        ),
        Case(
            "sample 8 x 32 with a rank-32 LoRA",
            lambda: sample(with_adapter),
            lambda: generate(tuned, prompt_ids),
        ),
    ]
    for rows, length in ((4, 128), (8, 64)):
        data = random_batch(rows, length)
        cases.append(
            Case(
                f"train {rows} x {length} tokens (fwd+bwd+AdamW)",
                lambda data=data: train(data),
                lambda data=data: reference_train_step(data),
            )
        )
    return cases


def time_quickstart(threads: int | None) -> float:
    """Wall time of `examples/sl_quickstart.py` (the README's main command), in a child."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "sl_quickstart.py"
    env = dict(os.environ)
    if threads is not None:
        env["TINKEX_TRIO_TORCH_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as data_dir:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(script), "--data-dir", data_dir], check=True, env=env)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="tiny,real", help="comma list of: tiny, real")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="weight storage"
    )
    parser.add_argument(
        "--mode",
        default="both",
        choices=["engine", "http", "both", "versus-hf", "quickstart"],
        help="what to measure",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (versus-hf)")
    args = parser.parse_args()
    if args.mode == "versus-hf":
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as adapter_dir:
            compare(versus_transformers_cases(args.threads, Path(adapter_dir)), args.rounds)
        return
    if args.mode == "quickstart":
        print(f"\nREADME quickstart: {time_quickstart(args.threads):.1f} s wall")
        return
    models = [m for m in args.models.split(",") if m]
    direct = run_engine_benchmarks(models, args.threads, args.dtype) if args.mode != "http" else []
    over_http = run_http_benchmarks(models, args.threads) if args.mode != "engine" else []
    if direct and over_http:
        print("\nHTTP overhead (engine tokens/s / HTTP tokens/s):")
        for a, b in zip(direct, over_http, strict=True):
            ratio = a.tokens_per_second / b.tokens_per_second
            print(f"  {a.label.removesuffix(' (engine)'):<40} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
