"""A deterministic stand-in for the PyTorch engine, for server and SDK tests.

It implements the `Engine` protocol with no model at all: adapters are small dicts, logprobs
and samples are simple functions of the inputs, and checkpoints are real files in the PEFT
layout (so archives, restarts and downloads are exercised for real). It is fast enough to run
inline on the trio thread, which is what virtual-time tests need.

Test hooks: `calls` records every call in order; `fail_next[method] = exc` makes the next call
of that method raise `exc`; `delay` sleeps (in the calling thread) before each call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._engine_api import (
    AdamStep,
    DatumArrays,
    EngineUserError,
    ForwardBackwardResult,
    LoraSpec,
    LossName,
    ModelInfo,
    SampledSequenceResult,
    SampleRequest,
    SampleResult,
)

FAKE_TINY_NAME = "tinkex-trio/fake-tiny"
#: Matches the tiny model's shape closely enough for validation tests.
FAKE_VOCAB = 49152
FAKE_CONTEXT = 2048


class FakeEngine:
    def __init__(self, models: Sequence[ModelInfo] | None = None, *, delay: float = 0.0) -> None:
        self._models = list(
            models
            or [
                ModelInfo(
                    name=FAKE_TINY_NAME,
                    arch="llama",
                    max_context_length=FAKE_CONTEXT,
                    vocab_size=FAKE_VOCAB,
                    tokenizer_id=FAKE_TINY_NAME,
                )
            ]
        )
        self.delay = delay
        self.adapters: dict[str, dict[str, object]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_next: dict[str, BaseException] = {}

    def _enter(self, method: str, key: str) -> None:
        self.calls.append((method, key))
        if self.delay:
            time.sleep(self.delay)
        exc = self.fail_next.pop(method, None)
        if exc is not None:
            raise exc

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
            if req.prompt and req.prompt[0] == 0 and len(req.prompt) == 1:
                # Hook for tests: prompt [0] is rejected like a bad request.
                out.append(EngineUserError("prompt [0] is rejected by the fake engine"))
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
