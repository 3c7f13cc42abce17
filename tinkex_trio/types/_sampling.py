"""Sampling requests and results (PROTOCOL.md 3.3, 7.4, 7.5 and A.2)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from tinkex_trio.types._base import UNSET, Request, Response, UnsetType
from tinkex_trio.types._bounds import Count, Id, Seed, SeqId, Text
from tinkex_trio.types._inputs import ModelInput

#: A stop token id: any int64 (the server checks it against the model's vocabulary).
StopTokenId = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class SamplingParams(msgspec.Struct, kw_only=True):
    """How to sample. `stop` omitted = stop at EOS; `stop=[]` = never stop before max_tokens.

    `stop` is a string, a list of strings (stop strings) or a list of ints (stop token ids).
    """

    max_tokens: Count | UnsetType = UNSET
    seed: Seed | UnsetType = UNSET
    stop: Text | Annotated[list[Text | StopTokenId], msgspec.Meta(max_length=256)] | UnsetType = (
        UNSET
    )
    temperature: float = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)] = -1
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens is not UNSET and self.max_tokens < 0:
            raise ValueError(f"SamplingParams.max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(
                f"SamplingParams.top_k must be -1 (no limit) or >= 1, got {self.top_k}"
            )
        if isinstance(self.stop, list) and self.stop:
            kinds = {type(s) for s in self.stop}
            if kinds not in ({str}, {int}):
                raise ValueError(
                    "SamplingParams.stop must be all strings (stop strings) or all ints "
                    "(stop token ids), not a mix"
                )

    def stop_list(self) -> list[str] | list[int] | None:
        """`None` for default EOS stopping, else the stop strings or token ids."""
        if self.stop is UNSET:
            return None
        if isinstance(self.stop, str):
            return [self.stop]
        if all(isinstance(s, int) for s in self.stop):
            return [int(s) for s in self.stop]
        return [str(s) for s in self.stop]


class SampleRequest(Request, kw_only=True):
    """Body of `POST /api/v1/asample`."""

    num_samples: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] = 1
    prompt: ModelInput
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    base_model: Text | UnsetType = UNSET
    model_path: Text | UnsetType = UNSET
    sampling_session_id: Id | UnsetType = UNSET
    seq_id: SeqId | UnsetType = UNSET
    prompt_logprobs: bool = False
    topk_prompt_logprobs: Count = 0
    # PROTOCOL.md 3.3: the sampling client's flag, on every request; true makes the server
    # record each returned sequence for stable_reinforce (8.7).
    record_stability_info: bool = False
    type: Literal["sample"] = "sample"


TopkLogprobs = list[tuple[int, float]]


class SampledSequence(Response, kw_only=True):
    stop_reason: Literal["stop", "length"]
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = None
    topk_logprobs: list[TopkLogprobs | None] | None = None


class SampleResponse(Response, kw_only=True):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[TopkLogprobs | None] | None = None
    prompt_cache_hit_tokens: int = 0
    type: Literal["sample"] = "sample"


class CreateSamplingSessionRequest(Request, kw_only=True):
    session_id: Id
    sampling_session_seq_id: SeqId
    base_model: Text | UnsetType = UNSET
    model_path: Text | UnsetType = UNSET
    type: Literal["create_sampling_session"] = "create_sampling_session"


class CreateSamplingSessionResponse(Response, kw_only=True):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"


class GetSamplerResponse(Response, kw_only=True):
    sampler_id: str
    base_model: str
    model_path: str | None = None
