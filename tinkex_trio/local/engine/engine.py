"""TorchEngine: the local backend's Engine (see `_engine_api.py`) on PyTorch, CPU.

Computation is float32; `dtype` chooses how base weights are kept in memory (float32, or
bfloat16 for half the memory, `_llama`). `max_model_memory` bounds the served models' weights
(default: the memory available at start-up, `_memory`).

Called from one worker thread only, so it keeps plain dicts and no locks. Base models load on
first use; each training adapter holds its LoRA tensors and AdamW state; adapters that sampling
requests name by directory are cached (LRU, keyed by path and file mtime).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from .._custom_graph import CustomLoss
from .._engine_api import (
    AdamStep,
    DatumArrays,
    EngineUserError,
    ForwardBackwardResult,
    LoraSpec,
    LossName,
    ModelInfo,
    SampleRequest,
    SampleResult,
)
from ..model_files import SMOLLM2_NAME, TINY_NAME
from ._custom_training import custom_datum, run_custom_forward_backward
from ._lora import ADAPTER_WEIGHTS, LoraAdapter
from ._losses import validate_config, validate_inputs
from ._memory import check_fits
from ._models import LoadedModel, ModelSource, WeightDtype, check_tokens
from ._optim import AdamW
from ._sampling import sample_batch
from ._training import PreparedDatum, run_forward_backward

CHECKPOINT_COMPLETE = "checkpoint_complete"
"""Empty marker written last: a directory without it is an interrupted save."""

SAMPLER_ADAPTER_CACHE_SIZE = 4
"""Adapters loaded from checkpoint directories for sampling that stay in memory (LoRA tensors
only, ~20 MB each at rank 32 on SmolLM2)."""


@dataclass
class _TrainingAdapter:
    lora: LoraAdapter
    optimizer: AdamW


THREADS_ENV = "TINKEX_TRIO_TORCH_THREADS"
"""Torch intra-op threads when `threads=` is not given (default: torch's own choice)."""


class TorchEngine:
    """The PyTorch engine. See `tinkex_trio.local._engine_api.Engine` for the contract."""

    def __init__(
        self,
        models: Sequence[str] = (TINY_NAME, SMOLLM2_NAME),
        extra_models: dict[str, Path] | None = None,
        max_tokens_per_microbatch: int = 2048,
        threads: int | None = None,
        *,
        dtype: WeightDtype = "float32",
        max_model_memory: int | None = None,
    ) -> None:
        if max_tokens_per_microbatch < 1:
            raise ValueError("max_tokens_per_microbatch must be >= 1")
        if threads is None and os.environ.get(THREADS_ENV):
            threads = int(os.environ[THREADS_ENV])
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self._sources: dict[str, ModelSource] = {
            name: ModelSource(name, dtype=dtype) for name in models
        }
        for name, directory in (extra_models or {}).items():
            self._sources[name] = ModelSource(name, Path(directory), dtype=dtype)
        check_fits(list(self._sources.values()), max_model_memory)
        self._max_tokens = max_tokens_per_microbatch
        self._adapters: dict[str, _TrainingAdapter] = {}
        self._sampler_cache: OrderedDict[tuple[str, str, int], LoraAdapter] = OrderedDict()

    # --- models ----------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return [source.info() for source in self._sources.values()]

    def _source(self, base_model: str) -> ModelSource:
        source = self._sources.get(base_model)
        if source is None:
            raise EngineUserError(
                f"unknown base_model {base_model!r}; available: {sorted(self._sources)}"
            )
        return source

    def _model(self, base_model: str) -> LoadedModel:
        return self._source(base_model).load()

    def _adapter(self, adapter_id: str) -> _TrainingAdapter:
        adapter = self._adapters.get(adapter_id)
        if adapter is None:
            raise EngineUserError(f"unknown adapter id {adapter_id!r} (create or load it first)")
        return adapter

    # --- adapters ----------------------------------------------------------------------------

    def create_adapter(self, adapter_id: str, base_model: str, lora: LoraSpec) -> None:
        config = self._source(base_model).config()
        self._install(adapter_id, LoraAdapter.create(base_model, config, lora))

    def _install(self, adapter_id: str, lora: LoraAdapter) -> _TrainingAdapter:
        lora.requires_grad_(True)
        entry = _TrainingAdapter(lora, AdamW(list(lora.named_parameters())))
        self._adapters[adapter_id] = entry
        return entry

    def drop_adapter(self, adapter_id: str) -> None:
        self._adapters.pop(adapter_id, None)

    # --- training ----------------------------------------------------------------------------

    def forward_backward(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss_fn: LossName,
        loss_fn_config: dict[str, float],
        forward_only: bool,
    ) -> ForwardBackwardResult:
        entry = self._adapter(adapter_id)
        name = validate_config(loss_fn, loss_fn_config)
        if not data:
            raise EngineUserError("data is empty; forward_backward needs at least one datum")
        loaded = self._model(entry.lora.base_model)
        config = loaded.model.config
        prepared: list[PreparedDatum] = []
        for index, datum in enumerate(data):
            tokens = _int_tensor(datum.tokens, f"data[{index}].tokens")
            check_tokens(tokens, config, f"data[{index}].tokens")
            inputs = validate_inputs(
                name,
                index,
                tokens.numel(),
                datum.loss_fn_inputs,
                config.vocab_size,
                datum.recorded_logprobs,
            )
            prepared.append(PreparedDatum(tokens, inputs))
        logprobs, loss = run_forward_backward(
            loaded.model,
            entry.lora,
            prepared,
            name,
            loss_fn_config,
            forward_only=forward_only,
            max_tokens=self._max_tokens,
        )
        return ForwardBackwardResult(logprobs=logprobs, metrics={"loss:sum": loss})

    def forward_backward_custom(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss: CustomLoss,
        forward_only: bool,
    ) -> ForwardBackwardResult:
        entry = self._adapter(adapter_id)
        if not data:
            raise EngineUserError("data is empty; forward_backward needs at least one datum")
        model = self._model(entry.lora.base_model).model
        prepared = [
            custom_datum(datum, index, loss, model.config) for index, datum in enumerate(data)
        ]
        result = run_custom_forward_backward(
            model,
            entry.lora,
            entry.lora.parameters(),
            prepared,
            loss,
            forward_only=forward_only,
            max_tokens=self._max_tokens,
        )
        return ForwardBackwardResult(logprobs=result.logprobs, metrics=result.metrics)

    def optim_step(self, adapter_id: str, params: AdamStep) -> dict[str, float]:
        return self._adapter(adapter_id).optimizer.step(params)

    # --- checkpoints -------------------------------------------------------------------------

    def save_state(self, adapter_id: str, directory: Path, *, with_optimizer: bool) -> int:
        entry = self._adapter(adapter_id)
        directory = Path(directory)
        written = entry.lora.save(directory)
        if with_optimizer:
            written += entry.optimizer.save(directory)
        (directory / CHECKPOINT_COMPLETE).touch()
        return written

    def load_state(
        self, adapter_id: str, base_model: str, directory: Path, *, with_optimizer: bool
    ) -> LoraSpec:
        config = self._source(base_model).config()
        lora = LoraAdapter.load(Path(directory), base_model, config)
        # Own copies: the loaded tensors must not alias anything a sampler cache holds.
        lora.pairs = {m: (a.clone(), b.clone()) for m, (a, b) in lora.pairs.items()}
        entry = _TrainingAdapter(lora, AdamW(list(lora.named_parameters())))
        if with_optimizer:
            entry.optimizer.load(Path(directory))
        lora.requires_grad_(True)
        self._adapters[adapter_id] = entry
        return lora.spec

    # --- sampling ----------------------------------------------------------------------------

    def sample(self, requests: Sequence[SampleRequest]) -> list[SampleResult | EngineUserError]:
        """Validate each request, then sample each (base model, adapter) group as one batch."""
        out: list[SampleResult | EngineUserError] = [EngineUserError("not run") for _ in requests]
        groups: dict[tuple[str, str], list[int]] = {}
        hooks: dict[tuple[str, str], LoraAdapter | None] = {}
        for index, req in enumerate(requests):
            try:
                key, hook = self._validate_sample(req)
            except EngineUserError as exc:
                out[index] = exc
                continue
            groups.setdefault(key, []).append(index)
            hooks[key] = hook
        for key, indices in groups.items():
            loaded = self._model(key[0])
            with torch.inference_mode():
                results = sample_batch(
                    loaded.model, hooks[key], loaded.tokenizer, [requests[i] for i in indices]
                )
            for index, result in zip(indices, results, strict=True):
                out[index] = result
        return out

    def _validate_sample(self, req: SampleRequest) -> tuple[tuple[str, str], LoraAdapter | None]:
        config = self._source(req.base_model).config()
        prompt = torch.tensor(req.prompt, dtype=torch.int64)
        check_tokens(prompt, config, "prompt")
        if req.num_samples < 1:
            raise EngineUserError(f"num_samples must be >= 1, got {req.num_samples}")
        if req.max_tokens < 0:
            raise EngineUserError(f"max_tokens must be >= 0, got {req.max_tokens}")
        if len(req.prompt) + req.max_tokens > config.max_context:
            raise EngineUserError(
                f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                f"context length {config.max_context}; lower max_tokens"
            )
        if not 0.0 < req.top_p <= 1.0:
            raise EngineUserError(f"top_p must be in (0, 1], got {req.top_p}")
        if req.temperature < 0:
            raise EngineUserError(f"temperature must be >= 0, got {req.temperature}")
        if req.top_k == 0 or req.top_k < -1:
            raise EngineUserError(f"top_k must be -1 (no limit) or >= 1, got {req.top_k}")
        if req.topk_prompt_logprobs < 0:
            raise EngineUserError("topk_prompt_logprobs must be >= 0")
        if req.stop and isinstance(req.stop[0], int):
            bad = [t for t in req.stop if not isinstance(t, int) or not 0 <= t < config.vocab_size]
            if bad:
                raise EngineUserError(f"stop token ids {bad[:5]} are outside the vocabulary")
        if req.adapter_dir is None:
            return (req.base_model, ""), None
        adapter = self._sampler_adapter(req.base_model, Path(req.adapter_dir))
        return (req.base_model, str(req.adapter_dir)), adapter

    def _sampler_adapter(self, base_model: str, directory: Path) -> LoraAdapter:
        weights = directory / ADAPTER_WEIGHTS
        try:
            mtime = weights.stat().st_mtime_ns
        except OSError:
            raise EngineUserError(
                f"adapter_dir {directory} has no {ADAPTER_WEIGHTS}; is it a checkpoint?"
            ) from None
        key = (base_model, str(directory.resolve()), mtime)
        cached = self._sampler_cache.get(key)
        if cached is None:
            cached = LoraAdapter.load(directory, base_model, self._source(base_model).config())
            self._sampler_cache[key] = cached
            while len(self._sampler_cache) > SAMPLER_ADAPTER_CACHE_SIZE:
                self._sampler_cache.popitem(last=False)
        self._sampler_cache.move_to_end(key)
        return cached


def _int_tensor(array: npt.NDArray[np.generic], what: str) -> torch.Tensor:
    values = np.asarray(array)
    if values.ndim != 1 or values.dtype.kind not in ("i", "u"):
        raise EngineUserError(
            f"{what} must be a 1-D int64 array, got shape {list(values.shape)} {values.dtype}"
        )
    return torch.from_numpy(values.astype(np.int64))
