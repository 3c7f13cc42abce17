"""LoRA adapters: creation, the forward hook, and the PEFT file layout.

An adapter adds `scale * B @ A @ x` to selected linear layers, scale = alpha / rank. A starts
kaiming-uniform (PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in))) and B
at zero, so a fresh adapter leaves the model unchanged.

Files: `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` /
`lora_B.weight` and `adapter_config.json`, which is what `peft.PeftModel.from_pretrained`
loads. The LoRA term is applied unmerged both in training and in sampling, so sampled
logprobs equal the training logprobs of the same weights (importance-sampling losses rely on
that).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._engine_api import EngineUserError, LoraSpec
from ._llama import LM_HEAD, LlamaConfig, LoraFactors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def target_suffixes(spec: LoraSpec) -> tuple[str, ...]:
    """Short module names (PEFT `target_modules`) that `spec` trains."""
    suffixes: tuple[str, ...] = ()
    if spec.train_attn:
        suffixes += ATTN_MODULES
    if spec.train_mlp:
        suffixes += MLP_MODULES
    if spec.train_unembed:
        suffixes += (LM_HEAD,)
    return suffixes


class LoraAdapter:
    """The trainable A/B matrices of one adapter; also the `LinearHook` the model calls."""

    def __init__(
        self,
        base_model: str,
        config: LlamaConfig,
        spec: LoraSpec,
        tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.base_model = base_model
        self.spec = spec
        self.scale = spec.alpha / spec.rank
        self.pairs = tensors  # module -> (A [r, in], B [out, r]), in linear_shapes order
        expected = _modules(config, spec)
        if list(tensors) != expected:
            missing = sorted(set(expected) - set(tensors))
            extra = sorted(set(tensors) - set(expected))
            raise EngineUserError(
                f"adapter does not match base model {base_model!r}: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        shapes = config.linear_shapes()
        for module, (a, b) in tensors.items():
            out_dim, in_dim = shapes[module]
            if tuple(a.shape) != (spec.rank, in_dim) or tuple(b.shape) != (out_dim, spec.rank):
                raise EngineUserError(
                    f"adapter tensor {module}: expected lora_A {(spec.rank, in_dim)} and lora_B "
                    f"{(out_dim, spec.rank)}, got {tuple(a.shape)} and {tuple(b.shape)}"
                )

    @classmethod
    def create(cls, base_model: str, config: LlamaConfig, spec: LoraSpec) -> LoraAdapter:
        if spec.rank < 1:
            raise EngineUserError(f"lora rank must be >= 1, got {spec.rank}")
        if not target_suffixes(spec):
            raise EngineUserError(
                "LoRA trains nothing: set at least one of train_attn, train_mlp, train_unembed"
            )
        gen = torch.Generator()
        if spec.seed is None:
            gen.seed()
        else:
            gen.manual_seed(spec.seed % (1 << 63))
        shapes = config.linear_shapes()
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in _modules(config, spec):
            out_dim, in_dim = shapes[module]
            bound = 1.0 / math.sqrt(in_dim)
            a = (torch.rand(spec.rank, in_dim, generator=gen) * 2 - 1) * bound
            pairs[module] = (a, torch.zeros(out_dim, spec.rank))
        adapter = cls(base_model, config, spec, pairs)
        adapter.requires_grad_(True)
        return adapter

    def requires_grad_(self, flag: bool) -> None:
        for tensor in self.parameters():
            tensor.requires_grad_(flag)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """PEFT key -> tensor, in a fixed order."""
        for module, (a, b) in self.pairs.items():
            yield f"{_PEFT_PREFIX}{module}.lora_A.weight", a
            yield f"{_PEFT_PREFIX}{module}.lora_B.weight", b

    def parameters(self) -> list[torch.Tensor]:
        return [tensor for _, tensor in self.named_parameters()]

    def factors(self, module: str) -> LoraFactors | None:
        """(A, B, scale) of `module`, or None if this adapter does not train it.

        The model multiplies them in (`Llama._linear`, `_group_linear`); nothing here forms
        `W + scale * B @ A`, so the adapter stays unmerged in training and in sampling.
        """
        pair = self.pairs.get(module)
        if pair is None:
            return None
        return pair[0], pair[1], self.scale

    # --- files -------------------------------------------------------------------------------

    def save(self, directory: Path) -> int:
        """Write the PEFT files into `directory`; return the bytes written."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {key: t.detach().contiguous() for key, t in self.named_parameters()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": list(target_suffixes(self.spec)),
            "inference_mode": True,
        }
        (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
        return sum((directory / name).stat().st_size for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))

    @classmethod
    def load(cls, directory: Path, base_model: str, config: LlamaConfig) -> LoraAdapter:
        """Read a PEFT adapter written by `save` (or by peft with the same targets)."""
        config_path = directory / ADAPTER_CONFIG
        weights_path = directory / ADAPTER_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise EngineUserError(
                f"{directory} is not an adapter checkpoint: it needs {ADAPTER_CONFIG} and "
                f"{ADAPTER_WEIGHTS}"
            )
        spec = spec_from_peft_config(json.loads(config_path.read_text()))
        raw = load_file(str(weights_path))
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in _modules(config, spec):
            key_a = f"{_PEFT_PREFIX}{module}.lora_A.weight"
            key_b = f"{_PEFT_PREFIX}{module}.lora_B.weight"
            if key_a not in raw or key_b not in raw:
                raise EngineUserError(f"{weights_path} lacks {key_a} / {key_b}")
            pairs[module] = (raw[key_a].float().contiguous(), raw[key_b].float().contiguous())
        return cls(base_model, config, spec, pairs)


def spec_from_peft_config(peft_config: dict[str, object]) -> LoraSpec:
    """The LoraSpec an `adapter_config.json` describes (the init seed is not recorded)."""
    targets = peft_config.get("target_modules", [])
    if not isinstance(targets, list):
        raise EngineUserError(f"{ADAPTER_CONFIG}: target_modules must be a list, got {targets!r}")
    names = {str(t) for t in targets}
    rank = peft_config.get("r")
    alpha = peft_config.get("lora_alpha")
    if not isinstance(rank, int) or not isinstance(alpha, int | float):
        raise EngineUserError(f"{ADAPTER_CONFIG}: needs integer 'r' and number 'lora_alpha'")
    return LoraSpec(
        rank=rank,
        alpha=float(alpha),
        train_attn=bool(names & set(ATTN_MODULES)),
        train_mlp=bool(names & set(MLP_MODULES)),
        train_unembed=LM_HEAD in names,
    )


def _modules(config: LlamaConfig, spec: LoraSpec) -> list[str]:
    suffixes = target_suffixes(spec)
    return [m for m in config.linear_shapes() if m.rsplit(".", 1)[-1] in suffixes]
