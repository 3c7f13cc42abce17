"""The contract between the local server and its PyTorch engine.

The server (ASGI app, SQLite store, futures, seq ordering) talks to the engine only through
these plain types, so the server can be tested with a fake engine in virtual time and the
engine can be tested and benchmarked without HTTP. Every engine method is synchronous and is
called from ONE worker thread (`trio.to_thread.run_sync` with a dedicated CapacityLimiter of 1):
the engine never needs locks of its own.

Arrays are numpy; torch never crosses this boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from ._custom_graph import CustomLoss

LossName = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"
]
LOSS_NAMES: tuple[LossName, ...] = (
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "stable_reinforce",
)


class EngineUserError(ValueError):
    """The request is wrong (bad shapes, unknown model, too long, bad loss inputs).

    The server reports it as a failed future with category `user` (or a 4xx), with this
    message verbatim, so the message must name the field and the fix.
    """


class ModelDirectoryError(ValueError):
    """A model the engine cannot serve faithfully (unsupported architecture or config field,
    missing or mismatched files). Raised at start-up, before anything is served; the message
    is one line naming the file, the problem and the fix."""


class ModelMemoryError(ModelDirectoryError):
    """The models' weights would not fit the memory the user allows (`--max-model-memory`,
    default: the memory available at start-up). Raised at start-up, before any weight is
    read; the message is one line naming the model, the sizes and the fix."""


@dataclass(frozen=True)
class ModelInfo:
    name: str  # e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
    arch: str  # the config's model_type: "llama", "qwen2" or "qwen3"
    max_context_length: int
    vocab_size: int
    tokenizer_id: str  # what get_info reports as model_data.tokenizer_id


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    alpha: float = 32.0


@dataclass
class DatumArrays:
    """One training datum: the model input tokens and its loss inputs, all length N."""

    tokens: npt.NDArray[np.int64]  # [N] model input
    loss_fn_inputs: dict[
        str, npt.NDArray[np.generic]
    ]  # target_tokens int64 [N], weights f32 [N], ...
    # The sampler's own log-prob of each target token, from the server's stability recording
    # (stable_reinforce, PROTOCOL.md 8.7); NaN where no sampled token backs the position.
    recorded_logprobs: npt.NDArray[np.float32] | None = None


@dataclass
class ForwardBackwardResult:
    logprobs: list[npt.NDArray[np.float32]]  # one [N] array per datum, input order
    metrics: dict[str, float]  # at least "loss:sum"


@dataclass(frozen=True)
class AdamStep:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = no clipping


@dataclass
class SampleRequest:
    base_model: str
    adapter_dir: Path | None  # a sampler (PEFT) or training checkpoint dir; None = base model
    prompt: list[int]
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1  # -1 = no limit
    top_p: float = 1.0
    seed: int | None = None
    # None = stop at EOS; [] = never stop; list[str] = stop strings; list[int] = stop token ids
    stop: list[str] | list[int] | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class SampledSequenceResult:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]


@dataclass
class SampleResult:
    sequences: list[SampledSequenceResult]
    prompt_logprobs: list[float | None] | None = None  # entry 0 is None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None  # entry 0 is None
    extra: dict[str, object] = field(default_factory=dict)


class Engine(Protocol):
    """What the server needs from an engine. See tinkex_trio.local.engine for the real one."""

    def models(self) -> list[ModelInfo]: ...

    def create_adapter(self, adapter_id: str, base_model: str, lora: LoraSpec) -> None: ...

    def drop_adapter(self, adapter_id: str) -> None: ...

    def forward_backward(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss_fn: LossName,
        loss_fn_config: dict[str, float],
        forward_only: bool,
    ) -> ForwardBackwardResult: ...

    def forward_backward_custom(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss: CustomLoss,
        forward_only: bool,
    ) -> ForwardBackwardResult:
        """Run a stored custom loss (PROTOCOL.md 8.8) per datum and sum it.

        `data` was checked against the loss's declared ranks by the server: `target_tokens`
        is [N] or [N, K] (the rank of the loss's `logprobs`), each named input has its rank
        (a rank-0 input is a 0-d array). Logprobs come back with `target_tokens`' shape;
        metrics are `loss:sum` and the loss's `custom/<name>:sum|mean` (mean = sum / datums).
        """
        ...

    def optim_step(self, adapter_id: str, params: AdamStep) -> dict[str, float]: ...

    def save_state(self, adapter_id: str, directory: Path, *, with_optimizer: bool) -> int:
        """Write adapter (PEFT layout) [+ optimizer state] into `directory`; return bytes written.

        A training checkpoint is `adapter_model.safetensors`, `adapter_config.json`,
        `optimizer.safetensors` (when with_optimizer) and an empty `checkpoint_complete`.
        A sampler checkpoint is the same without the optimizer file.
        """
        ...

    def load_state(
        self, adapter_id: str, base_model: str, directory: Path, *, with_optimizer: bool
    ) -> LoraSpec:
        """Create (or replace) `adapter_id` from a checkpoint directory; return its LoraSpec."""
        ...

    def sample(self, requests: Sequence[SampleRequest]) -> list[SampleResult | EngineUserError]:
        """Run several sampling requests together (batched); one result or error per request."""
        ...
