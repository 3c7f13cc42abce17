"""Training requests and results (PROTOCOL.md 3.2, 7.6, 7.7 and A.1)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import msgspec

from tinkex_trio.types._base import UNSET, Request, Response, UnsetType
from tinkex_trio.types._bounds import Id, Metadata, Seed, SeqId, Text, TtlSeconds
from tinkex_trio.types._inputs import Datum, TensorData

LossFnType = Literal[
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "stable_reinforce",
    "custom",
]
# What the SDK sends over the JSON forward/forward_backward endpoints (A.8).
JSON_LOSS_FNS: tuple[str, ...] = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")

# The loss inputs each built-in loss needs (PROTOCOL.md 8.1-8.7). stable_reinforce reads the
# sampler's log-probs from the server's recording, named by the datum's provenance spans, so it
# needs no `logprobs` input (it also needs the spans: `LOSS_FNS_NEEDING_PROVENANCE`).
LOSS_FN_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages", "sequence_ratio_mask"),
    "stable_reinforce": ("target_tokens", "advantages"),
}
LOSS_FNS_NEEDING_PROVENANCE: frozenset[str] = frozenset({"stable_reinforce"})


#: Loss options by name (PROTOCOL.md 8): a handful of numbers.
LossFnConfig = Annotated[dict[Text, float], msgspec.Meta(max_length=64)]


class LoraConfig(msgspec.Struct, kw_only=True):
    rank: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] = 32
    seed: Seed | UnsetType = UNSET
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not (self.train_unembed or self.train_mlp or self.train_attn):
            raise ValueError("at least one of train_unembed, train_mlp, train_attn must be true")


def _adamw() -> dict[str, Any]:
    return {"type": "adamw"}


class CreateModelRequest(Request, kw_only=True):
    session_id: Id
    model_seq_id: SeqId
    base_model: Text
    user_metadata: Metadata | UnsetType = UNSET
    lora_config: LoraConfig = msgspec.field(default_factory=LoraConfig)
    optimizer_config: dict[str, Any] = msgspec.field(default_factory=_adamw)
    type: Literal["create_model"] = "create_model"


class CreateModelResponse(Response, kw_only=True):
    model_id: str
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(Request, kw_only=True):
    model_id: Id
    type: Literal["get_info"] = "get_info"


class ModelData(Response, kw_only=True):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(Response, kw_only=True):
    model_id: str
    model_data: ModelData
    optimizer_config: dict[str, Any] = msgspec.field(default_factory=_adamw)
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None
    type: Literal["get_info"] = "get_info"


class LossConfigValue(Request, kw_only=True):
    """One `loss_fn_config_v2` value (PROTOCOL.md 6.1): a number or a text (exactly one)."""

    number: float | UnsetType = UNSET
    text: str | UnsetType = UNSET


class ForwardBackwardInput(Request, kw_only=True):
    data: list[Datum]
    loss_fn: Text
    loss_fn_config: LossFnConfig | UnsetType = UNSET
    # The typed config (PROTOCOL.md 6.1): the only place text values such as a custom loss's
    # `loss_id` (8.8) can go. Our SDK never sends it; the local backend reads it.
    loss_fn_config_v2: dict[str, LossConfigValue] | UnsetType = UNSET


class ForwardRequest(Request, kw_only=True):
    """Body of `POST /api/v1/forward` (A.1): the input sits under `forward_input`."""

    forward_input: ForwardBackwardInput
    model_id: Id
    seq_id: SeqId | UnsetType = UNSET


class ForwardBackwardRequest(Request, kw_only=True):
    """Body of `POST /api/v1/forward_backward` in JSON (A.1)."""

    forward_backward_input: ForwardBackwardInput
    model_id: Id
    seq_id: SeqId | UnsetType = UNSET


class ForwardBackwardOutput(Response, kw_only=True):
    """Result of forward / forward_backward: one output dict per datum, in input order.

    All three fields are required (A.1.4), so they have no defaults and are always sent.
    """

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


class AdamParams(msgspec.Struct, kw_only=True):
    """Per-step AdamW hyper-parameters (PROTOCOL.md 3.2); all are sent."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"AdamParams.{name} must be finite, got {value}")
        if self.learning_rate < 0:
            raise ValueError(f"AdamParams.learning_rate must be >= 0, got {self.learning_rate}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"AdamParams.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps < 0 or self.weight_decay < 0:
            raise ValueError("AdamParams.eps and weight_decay must be >= 0")


class OptimStepRequest(Request, kw_only=True):
    model_id: Id
    seq_id: SeqId | UnsetType = UNSET
    adam_params: AdamParams | UnsetType = UNSET
    optimizer_params: dict[str, Any] | UnsetType = UNSET
    type: Literal["optim_step"] = "optim_step"


class OptimStepResponse(Response, kw_only=True):
    metrics: dict[str, float] | None = None


class SaveWeightsRequest(Request, kw_only=True):
    model_id: Id
    path: Text
    seq_id: SeqId | UnsetType = UNSET
    ttl_seconds: TtlSeconds | UnsetType = UNSET
    overwrite: bool = False
    user_metadata: Metadata | UnsetType = UNSET
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsResponse(Response, kw_only=True):
    path: str
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerRequest(Request, kw_only=True):
    model_id: Id
    path: Text | UnsetType = UNSET
    sampling_session_seq_id: SeqId | UnsetType = UNSET
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: SeqId | UnsetType = UNSET
    ttl_seconds: TtlSeconds | UnsetType = UNSET
    user_metadata: Metadata | UnsetType = UNSET
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class SaveWeightsForSamplerResponse(Response, kw_only=True):
    """A named save has `path`, an unnamed one `sampling_session_id`; the other is null (a
    0.15 client asserts that an unnamed save's `path` is null, PROTOCOL.md A.3.8)."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class SaveWeightsExternalRequest(Request, kw_only=True):
    """`POST save_weights_external` (PROTOCOL.md 3.2): PEFT adapter files for download."""

    model_id: Id
    path: Text
    seq_id: SeqId | UnsetType = UNSET
    ttl_seconds: TtlSeconds | UnsetType = UNSET
    age_encryption_recipients: list[Text] | UnsetType = UNSET
    type: Literal["save_weights_external"] = "save_weights_external"


class SaveWeightsExternalResponse(Response, kw_only=True):
    """`path` is `tinker://<model_id>/external_weights/<name>` (required: the SDK asserts it)."""

    path: str
    size_bytes: int | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


class LoadWeightsRequest(Request, kw_only=True):
    """Create-via-load (`session_id` + `model_seq_id`) or in-place (`model_id` + `seq_id`)."""

    path: Text
    optimizer: bool
    model_id: Id | UnsetType = UNSET
    seq_id: SeqId | UnsetType = UNSET
    session_id: Id | UnsetType = UNSET
    model_seq_id: SeqId | UnsetType = UNSET
    base_model: Text | UnsetType = UNSET
    user_metadata: Metadata | UnsetType = UNSET
    type: Literal["load_weights"] = "load_weights"


class LoadWeightsResponse(Response, kw_only=True):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] = "load_weights"


class UnloadModelRequest(Request, kw_only=True):
    model_id: Id
    type: Literal["unload_model"] = "unload_model"


class UnloadModelResponse(Response, kw_only=True):
    model_id: str
    type: Literal["unload_model"] = "unload_model"
