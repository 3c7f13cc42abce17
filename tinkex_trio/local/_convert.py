"""Wire types → engine types, with the checks that make bad input a clear user error.

Everything here raises `EngineUserError` with a message naming the field (`data[2]
.loss_fn_inputs['weights']`) and the fix; the app turns that into a 400 at submit time, so a
bad request never reaches the engine and never consumes a worker slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from tinkex_trio.types import (
    UNSET,
    AdamParams,
    Datum,
    EncodedTextChunk,
    LoraConfig,
    ModelInput,
    SampleRequest,
    TensorData,
    UnsetType,
)

from ._engine_api import (
    LOSS_NAMES,
    AdamStep,
    DatumArrays,
    EngineUserError,
    LoraSpec,
    LossName,
    ModelInfo,
    SampleRequest as EngineSampleRequest,
)

T = TypeVar("T")

#: `max_tokens` when a sampling request gives none. PROTOCOL.md A.2.1 leaves the default to the
#: server; 64 tokens is a useful answer and ~6 s of CPU decoding at batch 1 (LOCAL_MODEL_NOTES.md).
DEFAULT_MAX_TOKENS = 64
#: Most samples per request: a sampling batch is this wide at most, which bounds KV-cache memory.
MAX_NUM_SAMPLES = 64
#: Seeds are folded into [0, 2**63 - 1) as the protobuf comment says (PROTOCOL.md 7.4).
_SEED_MODULUS = 2**63 - 1
#: Largest LoRA rank accepted; larger ranks than the hidden size are meaningless for our models.
MAX_LORA_RANK = 512
#: Most top-k prompt logprobs per position: the answer holds prompt length x k pairs, so k is
#: what bounds its size (1,000 x a 2,048-token prompt is already ~40 MB of JSON).
MAX_TOPK_PROMPT_LOGPROBS = 1000


def model_input_tokens(model_input: ModelInput, where: str) -> list[int]:
    tokens: list[int] = []
    for i, chunk in enumerate(model_input.chunks):
        if not isinstance(chunk, EncodedTextChunk):
            raise EngineUserError(
                f"{where}.chunks[{i}] is an image chunk; the local backend's models are "
                "text-only, so send encoded_text chunks"
            )
        tokens.extend(chunk.tokens)
    return tokens


def check_tokens(tokens: Sequence[int], model: ModelInfo, where: str) -> None:
    if not tokens:
        raise EngineUserError(f"{where} is empty; it needs at least one token")
    bad = next((t for t in tokens if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise EngineUserError(
            f"{where} contains token id {bad}, outside the vocabulary of {model.name} "
            f"(0..{model.vocab_size - 1})"
        )


def tensor_array(td: TensorData, where: str, *, max_elements: int) -> npt.NDArray[Any]:
    """The tensor as numpy, refused (naming `where`) if its shape is negative, does not match
    its data, or has more than `max_elements` cells (a sparse shape is materialised dense),
    or if it holds a float that is not finite."""
    shape = td.resolved_shape()
    if any(d < 0 for d in shape):
        raise EngineUserError(f"{where}.shape {shape} has a negative dimension")
    cells = math.prod(shape)  # Python ints: no overflow
    if cells > max_elements:
        raise EngineUserError(
            f"{where}.shape {shape} has {cells} cells, more than the {max_elements} this input "
            "can have"
        )
    if not td.is_sparse and cells != td.size:
        raise EngineUserError(f"{where} has {td.size} values but shape {shape} needs {cells}")
    try:
        array = td.to_numpy()
    except (ValueError, IndexError, OverflowError) as exc:
        raise EngineUserError(f"{where} is not a valid tensor: {exc}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise EngineUserError(f"{where} holds NaN or infinite values; every value must be finite")
    return array


def datum_arrays(datum: Datum, index: int, model: ModelInfo) -> DatumArrays:
    where = f"data[{index}]"
    tokens = model_input_tokens(datum.model_input, f"{where}.model_input")
    check_tokens(tokens, model, f"{where}.model_input")
    n = len(tokens)
    if n > model.max_context_length:
        raise EngineUserError(
            f"{where}.model_input has {n} tokens, more than the maximum context length "
            f"{model.max_context_length} of {model.name}"
        )
    inputs: dict[str, npt.NDArray[np.generic]] = {}
    for key, td in datum.loss_fn_inputs.items():
        array = tensor_array(
            td, f"{where}.loss_fn_inputs[{key!r}]", max_elements=n * model.vocab_size
        )
        if array.ndim == 0 or array.shape[0] != n:
            raise EngineUserError(
                f"{where}.loss_fn_inputs[{key!r}] has shape {list(array.shape)}, but the model "
                f"input has {n} tokens; per-token loss inputs must have length {n}"
            )
        inputs[key] = array
    if "target_tokens" not in inputs:
        raise EngineUserError(f"{where}.loss_fn_inputs needs 'target_tokens'")
    targets = inputs["target_tokens"]
    if targets.dtype != np.int64:
        raise EngineUserError(f"{where}.loss_fn_inputs['target_tokens'] must have dtype int64")
    if targets.size and (targets.min() < 0 or targets.max() >= model.vocab_size):
        raise EngineUserError(
            f"{where}.loss_fn_inputs['target_tokens'] has ids outside the vocabulary of "
            f"{model.name} (0..{model.vocab_size - 1})"
        )
    return DatumArrays(tokens=np.asarray(tokens, dtype=np.int64), loss_fn_inputs=inputs)


def loss_name(name: str) -> LossName:
    for known in LOSS_NAMES:
        if name == known:
            return known
    raise EngineUserError(
        f"unknown loss_fn {name!r}; the local backend supports {list(LOSS_NAMES)}"
    )


def loss_config(config: dict[str, float] | Any) -> dict[str, float]:
    if config is UNSET or config is None:
        return {}
    out = {str(k): float(v) for k, v in config.items()}
    for key, value in out.items():
        if not math.isfinite(value):
            raise EngineUserError(f"loss_fn_config[{key!r}] must be finite, got {value}")
    return out


def lora_spec(config: LoraConfig) -> LoraSpec:
    if not 1 <= config.rank <= MAX_LORA_RANK:
        raise EngineUserError(f"lora_config.rank must be in 1..{MAX_LORA_RANK}, got {config.rank}")
    if not (config.train_attn or config.train_mlp or config.train_unembed):
        raise EngineUserError(
            "lora_config: at least one of train_attn, train_mlp, train_unembed must be true"
        )
    return LoraSpec(
        rank=config.rank,
        seed=None if config.seed is UNSET else int(config.seed),
        train_attn=config.train_attn,
        train_mlp=config.train_mlp,
        train_unembed=config.train_unembed,
    )


def lora_config_dict(spec: LoraSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rank": spec.rank,
        "train_attn": spec.train_attn,
        "train_mlp": spec.train_mlp,
        "train_unembed": spec.train_unembed,
    }
    if spec.seed is not None:
        out["seed"] = spec.seed
    return out


def adam_step(adam: AdamParams | Any, optimizer_params: dict[str, Any] | Any) -> AdamStep:
    """The step's AdamW parameters; server defaults (PROTOCOL.md A.6.3) fill omitted ones."""
    if adam is UNSET and optimizer_params is not UNSET:
        family = str(optimizer_params.get("type", ""))
        if family not in ("adam", "adamw"):
            raise EngineUserError(
                f"optimizer_params type {family!r} is not supported by the local backend; "
                "send adam_params (AdamW)"
            )
        fields = {k: v for k, v in optimizer_params.items() if k != "type"}
        try:
            adam = AdamParams(**fields)
        except (TypeError, ValueError) as exc:
            raise EngineUserError(f"optimizer_params: {exc}") from None
    if adam is UNSET:
        adam = AdamParams()
    return AdamStep(
        learning_rate=adam.learning_rate,
        beta1=adam.beta1,
        beta2=adam.beta2,
        eps=adam.eps,
        weight_decay=adam.weight_decay,
        grad_clip_norm=adam.grad_clip_norm,
    )


def sample_request(
    req: SampleRequest, model: ModelInfo, adapter_dir: Path | None
) -> EngineSampleRequest:
    prompt = model_input_tokens(req.prompt, "prompt")
    check_tokens(prompt, model, "prompt")
    if not 1 <= req.num_samples <= MAX_NUM_SAMPLES:
        raise EngineUserError(f"num_samples must be in 1..{MAX_NUM_SAMPLES}, got {req.num_samples}")
    params = req.sampling_params
    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is UNSET else int(params.max_tokens)
    if max_tokens < 1:
        raise EngineUserError(f"sampling_params.max_tokens must be >= 1, got {max_tokens}")
    if len(prompt) + max_tokens > model.max_context_length:
        raise EngineUserError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the maximum "
            f"context length {model.max_context_length} of {model.name}"
        )
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise EngineUserError(
            f"sampling_params.temperature must be finite and >= 0, got {params.temperature}"
        )
    if not 0 < params.top_p <= 1:
        raise EngineUserError(f"sampling_params.top_p must be in (0, 1], got {params.top_p}")
    topk_limit = min(MAX_TOPK_PROMPT_LOGPROBS, model.vocab_size)
    if not 0 <= req.topk_prompt_logprobs <= topk_limit:
        raise EngineUserError(
            f"topk_prompt_logprobs must be in 0..{topk_limit}, got {req.topk_prompt_logprobs}"
        )
    stop: list[str] | list[int] | None
    raw_stop = params.stop
    if raw_stop is UNSET:
        stop = None
    elif isinstance(raw_stop, str):
        stop = [raw_stop]
    elif all(isinstance(s, str) for s in raw_stop):
        stop = [str(s) for s in raw_stop]
    elif all(isinstance(s, int) for s in raw_stop):
        stop = [int(s) for s in raw_stop]
        bad = next((t for t in stop if not 0 <= t < model.vocab_size), None)
        if bad is not None:
            raise EngineUserError(
                f"sampling_params.stop holds token id {bad}, outside the vocabulary of "
                f"{model.name} (0..{model.vocab_size - 1})"
            )
    else:
        raise EngineUserError("sampling_params.stop must be all strings or all token ids")
    seed = None if params.seed is UNSET else int(params.seed) % _SEED_MODULUS
    return EngineSampleRequest(
        base_model=model.name,
        adapter_dir=adapter_dir,
        prompt=prompt,
        num_samples=req.num_samples,
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=seed,
        stop=stop,
        prompt_logprobs=req.prompt_logprobs or req.topk_prompt_logprobs > 0,
        topk_prompt_logprobs=req.topk_prompt_logprobs,
    )


def or_none(value: T | UnsetType) -> T | None:
    """UNSET → None, for optional request fields."""
    return None if isinstance(value, UnsetType) else value
