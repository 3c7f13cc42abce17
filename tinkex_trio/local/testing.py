"""A fake engine for tests: the local backend in milliseconds, with no model and no torch.

`FakeEngine` implements the `Engine` protocol the local backend runs on, deterministically and
fast enough to run inline on the trio thread, so a test of your own trio code can run the real
server (the real HTTP endpoints, store, futures, seq_id ordering, checkpoints and archives)
without loading a model::

    from tinkex_trio.local import open_local_backend
    from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

    async with open_local_backend(data_dir=tmp_path, engine=FakeEngine()) as backend:
        async with open_service(base_url=backend.base_url, api_key=backend.api_key) as service:
            training = await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
            ...

What it computes (a function of the inputs only, so tests can assert exact values):

* forward/forward_backward: the logprob of position i is `-1 / (1 + steps + i)`, where `steps`
  counts the adapter's optim_steps; `loss:sum` is minus the weighted sum of those logprobs.
* forward_backward_custom: the same logprobs (for [N, K] targets, position i, candidate k
  gets `-1 / (1 + steps + i + k)`) fed to the stored custom loss, run by the real graph
  interpreter (this method alone needs torch).
* optim_step: counts a step; its metrics are `{"learning_rate:mean": <the step's lr>}`.
* sample: sample j of prompt p is the tokens `p[-1] + j + 1, p[-1] + j + 2, ...`
  (`max_tokens` of them, modulo the vocabulary), each with logprob -0.5, stop reason
  `"length"`; prompt logprobs are `[None, -1.0, ...]`, top-k prompt logprobs `(token t, -1.0)`
  for t < k.
* save_state/load_state: real files in the PEFT layout (so archives, downloads, copies and
  restarts are exercised for real), which `load_state` reads back.

Fault injection, explicit and one-shot:

* `fail_next(method, error)`: the next call of that engine method raises `error` (an
  `EngineUserError`, re-exported here, fails the request with category `user`, any other
  exception with `server`; for `"sample"` the whole batch fails).
* `reject_next_sample(message)`: the next sampling request alone fails as a user error, while
  the other requests in its batch succeed, as when a real engine rejects one bad prompt.

Observation: `calls` lists every engine call in order as `(method, adapter id or batch size)`.
`delay` sleeps that many (real) seconds in the calling thread before each call: a slow engine
for tests over real sockets, where the engine runs in its worker thread (a real sleep cannot be
skipped by trio's virtual clock).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, final

import numpy as np

from ._engine_api import (
    AdamStep,
    DatumArrays,
    EngineUserError as EngineUserError,
    ForwardBackwardResult,
    LoraSpec,
    LossName,
    ModelInfo,
    SampledSequenceResult,
    SampleRequest,
    SampleResult,
)

if TYPE_CHECKING:
    from ._custom_graph import CustomLoss

__all__ = [
    "FAKE_CONTEXT",
    "FAKE_MODEL_NAME",
    "FAKE_VOCAB",
    "EngineMethod",
    "EngineUserError",
    "FakeEngine",
]

FAKE_MODEL_NAME = "tinkex-trio/fake-tiny"
"""The one model a `FakeEngine` serves unless given others."""
FAKE_VOCAB = 49152
"""Vocabulary size of the fake model (as the tiny real model's), for token-range checks."""
FAKE_CONTEXT = 2048
"""Maximum context length of the fake model."""

EngineMethod = Literal[
    "create_adapter",
    "drop_adapter",
    "forward_backward",
    "forward_backward_custom",
    "optim_step",
    "save_state",
    "load_state",
    "sample",
]


@final
class FakeEngine:
    """A deterministic `Engine` with no model (see the module docstring)."""

    def __init__(self, models: Sequence[ModelInfo] | None = None, *, delay: float = 0.0) -> None:
        self._models = list(
            models
            or [
                ModelInfo(
                    name=FAKE_MODEL_NAME,
                    arch="llama",
                    max_context_length=FAKE_CONTEXT,
                    vocab_size=FAKE_VOCAB,
                    tokenizer_id=FAKE_MODEL_NAME,
                )
            ]
        )
        self.delay = delay
        self.adapters: dict[str, dict[str, object]] = {}
        self.calls: list[tuple[str, str]] = []
        self._failures: dict[str, deque[BaseException]] = {}
        self._sample_rejections: deque[str] = deque()

    def __repr__(self) -> str:
        pending = sum(len(q) for q in self._failures.values()) + len(self._sample_rejections)
        return (
            f"<FakeEngine models={[m.name for m in self._models]} adapters={len(self.adapters)} "
            f"calls={len(self.calls)} pending_faults={pending}>"
        )

    def fail_next(self, method: EngineMethod, error: BaseException) -> None:
        """Make the next call of `method` raise `error` (once; calls queue in order)."""
        self._failures.setdefault(method, deque()).append(error)

    def reject_next_sample(self, message: str) -> None:
        """Make the next sampling request fail alone with `EngineUserError(message)`."""
        self._sample_rejections.append(message)

    def _enter(self, method: EngineMethod, key: str) -> None:
        self.calls.append((method, key))
        if self.delay:
            time.sleep(self.delay)
        failures = self._failures.get(method)
        if failures:
            raise failures.popleft()

    def _adapter(self, adapter_id: str) -> dict[str, object]:
        adapter = self.adapters.get(adapter_id)
        if adapter is None:
            raise EngineUserError(f"no adapter {adapter_id!r}")
        return adapter

    def models(self) -> list[ModelInfo]:
        return list(self._models)

    def create_adapter(self, adapter_id: str, base_model: str, lora: LoraSpec) -> None:
        self._enter("create_adapter", adapter_id)
        if base_model not in {m.name for m in self._models}:
            raise EngineUserError(f"unknown base model {base_model!r}")
        self.adapters[adapter_id] = {"base_model": base_model, "lora": lora, "steps": 0}

    def drop_adapter(self, adapter_id: str) -> None:
        self._enter("drop_adapter", adapter_id)
        self.adapters.pop(adapter_id, None)

    def forward_backward(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss_fn: LossName,
        loss_fn_config: dict[str, float],
        forward_only: bool,
    ) -> ForwardBackwardResult:
        self._enter("forward_backward", adapter_id)
        adapter = self._adapter(adapter_id)
        steps = int(adapter["steps"])  # type: ignore[call-overload]
        logprobs = []
        loss = 0.0
        for datum in data:
            lp = (-1.0 / (1.0 + steps + np.arange(len(datum.tokens)))).astype(np.float32)
            weights = datum.loss_fn_inputs.get("weights")
            w = np.ones_like(lp) if weights is None else weights.astype(np.float32)
            loss += float(-(lp * w).sum())
            logprobs.append(lp)
        return ForwardBackwardResult(logprobs=logprobs, metrics={"loss:sum": loss})

    def forward_backward_custom(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss: CustomLoss,
        forward_only: bool,
    ) -> ForwardBackwardResult:
        # The graph interpreter is torch; only this method of the fake engine needs it.
        import torch

        from .engine._custom_training import reduce_metrics
        from .engine._graph_loss import run_graph

        self._enter("forward_backward_custom", adapter_id)
        steps = int(self._adapter(adapter_id)["steps"])  # type: ignore[call-overload]
        logprobs = []
        total = 0.0
        sums = dict.fromkeys(loss.metric_keys, 0.0)
        for datum in data:
            targets = np.asarray(datum.loss_fn_inputs["target_tokens"])
            grid = np.indices(targets.shape).sum(axis=0)  # i (rank 1) or i + k (rank 2)
            lp = (-1.0 / (1.0 + steps + grid)).astype(np.float32)
            inputs = [torch.from_numpy(np.array(datum.loss_fn_inputs[n])) for n in loss.input_names]
            value, metrics = run_graph(loss, [torch.from_numpy(lp), *inputs])
            total += float(value)
            for key, metric in metrics.items():
                sums[key] += float(metric)
            logprobs.append(lp)
        return ForwardBackwardResult(
            logprobs=logprobs, metrics=reduce_metrics(loss, total, sums, len(data))
        )

    def optim_step(self, adapter_id: str, params: AdamStep) -> dict[str, float]:
        self._enter("optim_step", adapter_id)
        adapter = self._adapter(adapter_id)
        adapter["steps"] = int(adapter["steps"]) + 1  # type: ignore[call-overload]
        return {"learning_rate:mean": params.learning_rate}

    def save_state(self, adapter_id: str, directory: Path, *, with_optimizer: bool) -> int:
        self._enter("save_state", adapter_id)
        adapter = self._adapter(adapter_id)
        lora = adapter["lora"]
        assert isinstance(lora, LoraSpec)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "base_model_name_or_path": adapter["base_model"],
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "train_attn": lora.train_attn,
            "train_mlp": lora.train_mlp,
            "train_unembed": lora.train_unembed,
            "steps": adapter["steps"],
        }
        files = {
            "adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": b"\0" * 64,
            "checkpoint_complete": b"",
        }
        if with_optimizer:
            files["optimizer.safetensors"] = b"\1" * 32
        for name, content in files.items():
            (directory / name).write_bytes(content)
        return sum(len(c) for c in files.values())

    def load_state(
        self, adapter_id: str, base_model: str, directory: Path, *, with_optimizer: bool
    ) -> LoraSpec:
        self._enter("load_state", adapter_id)
        try:
            config = json.loads((directory / "adapter_config.json").read_text())
        except FileNotFoundError:
            raise EngineUserError(f"{directory} is not a checkpoint") from None
        if with_optimizer and not (directory / "optimizer.safetensors").is_file():
            raise EngineUserError("checkpoint has no optimizer state")
        spec = LoraSpec(
            rank=int(config["r"]),
            train_attn=bool(config["train_attn"]),
            train_mlp=bool(config["train_mlp"]),
            train_unembed=bool(config["train_unembed"]),
        )
        self.adapters[adapter_id] = {
            "base_model": base_model,
            "lora": spec,
            "steps": int(config.get("steps", 0)),
        }
        return spec

    def sample(self, requests: Sequence[SampleRequest]) -> list[SampleResult | EngineUserError]:
        self._enter("sample", str(len(requests)))
        out: list[SampleResult | EngineUserError] = []
        for req in requests:
            if self._sample_rejections:
                out.append(EngineUserError(self._sample_rejections.popleft()))
                continue
            seqs = []
            for i in range(req.num_samples):
                n = req.max_tokens
                tokens = [(req.prompt[-1] + i + k + 1) % FAKE_VOCAB for k in range(n)]
                seqs.append(
                    SampledSequenceResult(tokens=tokens, logprobs=[-0.5] * n, stop_reason="length")
                )
            prompt_lp: list[float | None] | None = None
            topk: list[list[tuple[int, float]] | None] | None = None
            if req.prompt_logprobs:
                prompt_lp = [None, *([-1.0] * (len(req.prompt) - 1))]
            if req.topk_prompt_logprobs > 0:
                topk = [None] + [
                    [(t, -1.0) for t in range(req.topk_prompt_logprobs)] for _ in req.prompt[1:]
                ]
            out.append(
                SampleResult(sequences=seqs, prompt_logprobs=prompt_lp, topk_prompt_logprobs=topk)
            )
        return out
