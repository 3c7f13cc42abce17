"""A hand-written Llama-family forward pass over plain tensors (no nn.Module).

Why not nn.Module: the base weights are frozen, come from an mmapped safetensors file, and are
shared by every adapter; module construction would allocate and initialise a second copy (an
nn.Embedding of 49152x576 alone costs ~2.6 s). Here the model is a dict of tensors and a few
functions, and LoRA is a hook on each linear layer (`LinearHook`).

Weights use Hugging Face names (`model.layers.N.self_attn.q_proj.weight`, ...), with Q/K rows
in rotate-half RoPE order, so the same code runs the converted GGUF, Hugging Face
safetensors of the Llama family, and the tiny random model. The family members differ in
three places, each a flag of `LlamaConfig` (facts from transformers' modeling files):

- Llama 3 (`rope_type: llama3`): RoPE inverse frequencies rescaled by wavelength
  (`Llama3RopeScaling.inverse_frequencies`).
- Qwen2 / Qwen2.5: q, k and v projections have biases (o does not): `qkv_bias`.
- Qwen3: per-head RMSNorm on the queries and keys (`q_norm`, `k_norm`, weight [head_dim]),
  applied after the projection and before RoPE: `qk_norm`.

Precision: activations, norms, attention, the KV cache and the logits are float32 whatever
the weights' dtype. Weights stored in bfloat16 (`--dtype bfloat16`) are upcast per matmul (the
unembedding in vocabulary chunks), so the computation is exactly the float32 model with
bf16-rounded weights and sampled log-probs equal training log-probs, as in float32.

Speed (2 CPU cores, where a decode step is bound by reading the weights and a training step by
the matmuls): q/k/v and gate/up each run as one matmul over weights concatenated once at load
(`FUSED_GROUPS`; the per-module names stay in `weights` as views into them), and a LoRA group
as two (A stacked, B block-diagonal) added in place with `addmm`, so no `W + BA` is ever formed.
Activations stay 2-D `[tokens, hidden]` between attention blocks. Training never forms the
`[tokens, vocab]` log-softmax: `target_logprobs` computes only the targets' log-probs and keeps
one softmax buffer for the backward pass (`_TargetLogProbs`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

LM_HEAD = "lm_head"
"""Module name of the unembedding (tied to `model.embed_tokens.weight` when there is none)."""


QWEN3_DEFAULT_HEAD_DIM = 128
"""transformers' `Qwen3Config.head_dim` default (not hidden_size / heads as for Llama)."""


@dataclass(frozen=True)
class Llama3RopeScaling:
    """`rope_type: llama3`: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend between (transformers `_compute_llama3_parameters`; its attention factor is 1)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def inverse_frequencies(self, inv_freq: torch.Tensor) -> torch.Tensor:
        old_context = float(self.original_max_position_embeddings)
        low_freq_wavelen = old_context / self.low_freq_factor
        high_freq_wavelen = old_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_context / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_context: int
    eos_token_ids: tuple[int, ...] = (2,)
    tie_word_embeddings: bool = True
    model_type: str = "llama"
    qkv_bias: bool = False  # Qwen2: biases on q/k/v_proj
    qk_norm: bool = False  # Qwen3: RMSNorm per head on q and k before RoPE
    rope_scaling: Llama3RopeScaling | None = None

    @classmethod
    def from_hf(cls, config: Mapping[str, object]) -> LlamaConfig:
        """Read the keys of a Hugging Face `config.json` (llama, qwen2 or qwen3).

        Defaults are transformers' config defaults. Both config layouts are read: RoPE as
        `rope_theta` + `rope_scaling` (transformers 4) or as `rope_parameters` (transformers 5).
        Whether the config asks for anything this engine does not compute is checked
        separately, before this (`_model_dir.check_config`).

        Raises:
            ValueError: a key is missing or has the wrong type, naming the key.
        """

        def num(
            key: str, default: float | None = None, source: Mapping[str, object] = config
        ) -> float:
            value = source.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"config.json: {key!r} must be a number, got {value!r}")
            return float(value)

        def count(
            key: str, default: int | None = None, source: Mapping[str, object] = config
        ) -> int:
            value = source.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.json: {key!r} must be an integer >= 1, got {value!r}")
            return value

        model_type = str(config.get("model_type", "llama"))
        hidden = count("hidden_size")
        heads = count("num_attention_heads")
        tie = config.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ValueError(f"config.json: 'tie_word_embeddings' must be a bool, got {tie!r}")
        kv_heads = count("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        head_dim_default = QWEN3_DEFAULT_HEAD_DIM if model_type == "qwen3" else hidden // heads
        rope = rope_settings(config)
        scaling: Llama3RopeScaling | None = None
        if rope_type(rope) == "llama3":
            scaling = Llama3RopeScaling(
                factor=num("factor", source=rope),
                low_freq_factor=num("low_freq_factor", source=rope),
                high_freq_factor=num("high_freq_factor", source=rope),
                original_max_position_embeddings=count(
                    "original_max_position_embeddings", source=rope
                ),
            )
            if not scaling.high_freq_factor > scaling.low_freq_factor:
                raise ValueError(
                    "config.json: rope_scaling high_freq_factor must exceed low_freq_factor"
                )
        return cls(
            vocab_size=count("vocab_size"),
            hidden_size=hidden,
            intermediate_size=count("intermediate_size"),
            num_layers=count("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=count("head_dim", head_dim_default),
            rope_theta=num("rope_theta", 10000.0, source=rope),
            rms_norm_eps=num("rms_norm_eps", 1e-6),
            max_context=count("max_position_embeddings"),
            eos_token_ids=token_ids(config.get("eos_token_id"), "eos_token_id"),
            tie_word_embeddings=tie,
            model_type=model_type,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            rope_scaling=scaling,
        )

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward pass reads, by Hugging Face name, with its shape."""
        h = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for name, shape in self.linear_shapes().items():
            if name != LM_HEAD:
                shapes[f"{name}.weight"] = shape
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}"
            shapes[f"{prefix}.input_layernorm.weight"] = (h,)
            shapes[f"{prefix}.post_attention_layernorm.weight"] = (h,)
            if self.qkv_bias:
                shapes[f"{prefix}.self_attn.q_proj.bias"] = (q,)
                shapes[f"{prefix}.self_attn.k_proj.bias"] = (kv,)
                shapes[f"{prefix}.self_attn.v_proj.bias"] = (kv,)
            if self.qk_norm:
                shapes[f"{prefix}.self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[f"{prefix}.self_attn.k_norm.weight"] = (self.head_dim,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes[f"{LM_HEAD}.weight"] = (self.vocab_size, h)
        return shapes

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear layer by HF module name, the LM head last."""
        h, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (f, h),
            "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f),
        }
        shapes = {
            f"model.layers.{i}.{name}": shape
            for i in range(self.num_layers)
            for name, shape in per_layer.items()
        }
        shapes[LM_HEAD] = (self.vocab_size, h)
        return shapes


def rope_settings(config: Mapping[str, object]) -> Mapping[str, object]:
    """The RoPE settings of a config.json in one mapping (`rope_theta`, `rope_type`, ...).

    transformers 5 writes `rope_parameters` (theta inside); transformers 4 writes `rope_theta`
    and an optional `rope_scaling` (`rope_type`, once called `type`). A key of the mapping
    that is not a number, or a mapping that is not a dict, is left for the checks to refuse.
    """
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        merged: dict[str, object] = {}
        if "rope_theta" in config:
            merged["rope_theta"] = config["rope_theta"]
        merged.update(params)
        return merged
    scaling = config.get("rope_scaling")
    merged = dict(scaling) if isinstance(scaling, dict) else {}
    if "rope_theta" in config:
        merged["rope_theta"] = config["rope_theta"]
    return merged


def rope_type(rope: Mapping[str, object]) -> object:
    """`rope_type` of `rope_settings(...)` ("default" when absent; old configs say `type`)."""
    return rope.get("rope_type", rope.get("type", "default"))


def token_ids(value: object, key: str) -> tuple[int, ...]:
    """A config's token id field: an int, a list of ints, or null (no ids)."""
    if value is None:
        return ()
    values: list[object] = list(value) if isinstance(value, list) else [value]
    ids = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    if len(ids) != len(values):
        raise ValueError(
            f"config.json: {key!r} must be an integer or a list of them, got {value!r}"
        )
    return tuple(ids)


LoraFactors = tuple[torch.Tensor, torch.Tensor, float]
"""(A [r, in], B [out, r], scale) of one module's low-rank term `scale * B @ A @ x`."""


class LinearHook(Protocol):
    """The low-rank terms (LoRA) added to linear layers; None for a plain layer.

    The model asks for the factors rather than for a computed delta so that it can batch the
    modules of a fused group into one matmul pair and fold the term into the output in place.
    """

    def factors(self, module: str) -> LoraFactors | None: ...


FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
"""Linear layers of a block that read the same input, run as one matmul (names per layer)."""


class KVCache:
    """Keys/values for a batch of sequences, preallocated to `capacity` slots.

    Slots hold tokens in order; `valid[b, s]` is False for slots a row does not use (padding
    after a shorter prompt), so sequences of different prompt lengths decode together. RoPE is
    applied before caching, with each token's true position, so unused slots do not shift
    positions.
    """

    def __init__(self, config: LlamaConfig, batch: int, capacity: int) -> None:
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        # Zeros, not empty: unused slots get attention weight 0, and 0 * NaN garbage is NaN.
        self.keys = [torch.zeros(shape) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape) for _ in range(config.num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool)
        self.length = 0

    @property
    def capacity(self) -> int:
        return int(self.valid.shape[1])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a LongTensor of batch indices, repeats allowed), e.g. the
        unfinished sequences, or each prompt's row once per sample after prefill."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)


UNEMBED_CHUNK_ROWS = 16384
"""Vocabulary rows upcast at a time when the unembedding is stored in bfloat16: bounds the
float32 temporary (16384 x 1024 x 4 bytes = 64 MiB for Qwen3-0.6B) instead of a full copy."""

LOGPROB_CHUNK_TOKENS = 512
"""Positions per `[chunk, vocab]` buffer when target log-probs are computed without gradient
(forward only, prompt log-probs): bounds the temporary to ~100 MB at SmolLM2's vocabulary."""


class Llama:
    """Forward pass of a Llama-family model given its (frozen) weights.

    Weights may be float32 or bfloat16 (see the module docstring); computation is float32.
    """

    def __init__(self, config: LlamaConfig, weights: Mapping[str, torch.Tensor]) -> None:
        self.config = config
        self.weights = dict(weights)
        self._check_shapes()
        self.embed = self.weights["model.embed_tokens.weight"]
        # Tied: the embedding is the unembedding (a saved lm_head is ignored, as transformers
        # ties over it); untied: lm_head.weight (required by _check_shapes).
        self.lm_head = (
            self.embed if config.tie_word_embeddings else self.weights[f"{LM_HEAD}.weight"]
        )
        self._fused = self._fuse_groups()
        self._group_cache: dict[tuple[int, str, str], tuple[torch.Tensor, torch.Tensor]] | None
        self._group_cache = None
        self._rope_cos = torch.empty(0)
        self._rope_sin = torch.empty(0)

    def _check_shapes(self) -> None:
        for name, shape in self.config.weight_shapes().items():
            weight = self.weights.get(name)
            if weight is None or tuple(weight.shape) != shape:
                got = None if weight is None else tuple(weight.shape)
                raise ValueError(f"weight {name}: expected shape {shape}, got {got}")
            if weight.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"weight {name}: dtype {weight.dtype}, expected float32/bfloat16")

    def _fuse_groups(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, list[int]]]:
        """Concatenate each `FUSED_GROUPS` member set once; the member names become views.

        One copy of the weights stays in memory (the mmapped originals are released), and the
        per-module names keep working for everything that reads `weights`.
        """
        fused: dict[str, tuple[torch.Tensor, torch.Tensor | None, list[int]]] = {}
        for layer in range(self.config.num_layers):
            prefix = f"model.layers.{layer}"
            for group, members in FUSED_GROUPS.items():
                names = [f"{prefix}.{member}" for member in members]
                parts = [self.weights[f"{name}.weight"] for name in names]
                sizes = [int(part.shape[0]) for part in parts]
                weight = torch.cat(parts)
                for name, view in zip(names, weight.split_with_sizes(sizes), strict=True):
                    self.weights[f"{name}.weight"] = view
                biases = [self.weights.get(f"{name}.bias") for name in names]
                bias: torch.Tensor | None = None
                if any(b is not None for b in biases):
                    bias = torch.cat(
                        [
                            b if b is not None else weight.new_zeros(size)
                            for b, size in zip(biases, sizes, strict=True)
                        ]
                    )
                    for name, view, b in zip(
                        names, bias.split_with_sizes(sizes), biases, strict=True
                    ):
                        if b is not None:
                            self.weights[f"{name}.bias"] = view
                fused[f"{prefix}.{group}"] = (weight, bias, sizes)
        return fused

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [B, 1, T, head_dim] for integer `positions` [B, T]."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if self._rope_cos.shape[0] < needed:
            size = max(needed, min(self.config.max_context, 4096))
            half = self.config.head_dim // 2
            inv_freq = 1.0 / (
                self.config.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / (2 * half))
            )
            if self.config.rope_scaling is not None:
                inv_freq = self.config.rope_scaling.inverse_frequencies(inv_freq)
            angles = torch.outer(torch.arange(size, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self._rope_cos = angles.cos().float()
            self._rope_sin = angles.sin().float()
        return self._rope_cos[positions].unsqueeze(1), self._rope_sin[positions].unsqueeze(1)

    def _param(self, name: str) -> torch.Tensor:
        """A float32 view of a weight: itself if stored in float32, else an upcast copy."""
        return self.weights[name].float()

    def _linear(self, module: str, x: torch.Tensor, hook: LinearHook | None) -> torch.Tensor:
        """`x` [N, in] -> [N, out]: the layer plus its LoRA term, if any."""
        bias = self.weights.get(f"{module}.bias")
        out = F.linear(x, self._param(f"{module}.weight"), None if bias is None else bias.float())
        factors = hook.factors(module) if hook is not None else None
        if factors is not None:
            a, b, scale = factors
            # In place: a linear layer's backward does not read its output.
            out.addmm_(F.linear(x, a) * scale, b.t())
        return out

    def _group_linear(
        self, prefix: str, group: str, x: torch.Tensor, hook: LinearHook | None
    ) -> torch.Tensor:
        """The members of a fused group as one matmul (and one LoRA pair), outputs side by side."""
        weight, bias, sizes = self._fused[f"{prefix}.{group}"]
        out = F.linear(x, weight.float(), None if bias is None else bias.float())
        if hook is None:
            return out
        factors = [hook.factors(f"{prefix}.{member}") for member in FUSED_GROUPS[group]]
        present = [f for f in factors if f is not None]
        if not present:
            return out
        if len(present) == len(factors) and len({f[2] for f in present}) == 1:
            # x @ [A_1; A_2; ...]^T once, then block-diag(B_1, B_2, ...): two matmuls.
            cache_key = (id(hook), prefix, group)
            stacked = self._group_cache.get(cache_key) if self._group_cache is not None else None
            if stacked is None:
                stacked = (
                    torch.cat([f[0] for f in present]),
                    torch.block_diag(*[f[1] for f in present]),  # type: ignore[no-untyped-call]
                )
                if self._group_cache is not None:
                    self._group_cache[cache_key] = stacked
            a, b = stacked
            return out.addmm_(F.linear(x, a) * present[0][2], b.t())
        deltas = [
            F.linear(F.linear(x, f[0]) * f[2], f[1]) if f is not None else x.new_zeros(len(x), n)
            for f, n in zip(factors, sizes, strict=True)
        ]
        return out + torch.cat(deltas, dim=-1)

    @contextmanager
    def adapters_frozen(self) -> Iterator[None]:
        """A block in which no adapter changes (one sampling batch, under inference mode): each
        LoRA group's stacked A and block-diagonal B are built once and reused by every decode
        step, instead of once per step. Training must not run inside it (the cached tensors
        would not carry gradients, and an optimizer step would make them stale)."""
        self._group_cache = {}
        try:
            yield
        finally:
            self._group_cache = None

    def _rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.config.rms_norm_eps) * self._param(name)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        hook: LinearHook | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] for `tokens` [B, T].

        Without `cache`, or with an empty one: every row starts at slot 0 and attention is
        causal (right padding is harmless: real tokens never attend to later pads; a caller
        that caches a right-padded batch marks the pad slots invalid afterwards). With a
        non-empty `cache`: the T new tokens go to slots `cache.length ...` and attend to all
        valid earlier slots.
        """
        c = self.config
        batch, steps = tokens.shape
        if positions is None:
            positions = torch.arange(steps).expand(batch, steps)
        cos, sin = self._rope(positions)
        mask: torch.Tensor | None = None
        start = 0
        if cache is not None:
            start = cache.length
            end = start + steps
            if end > cache.capacity:
                raise ValueError(f"KV cache overflow: {end} > {cache.capacity}")
            cache.valid[:, start:end] = True
            if start > 0 and steps == 1:
                mask = cache.valid[:, None, None, :end]  # [B, 1, 1, S]: one query per row
            elif start > 0:
                slots = torch.arange(end)
                causal = slots.unsqueeze(0) <= (start + torch.arange(steps)).unsqueeze(1)
                mask = (cache.valid[:, None, :end] & causal[None]).unsqueeze(1)  # [B, 1, T, S]
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        x = F.embedding(tokens.reshape(-1), self.embed).float()  # [B*T, hidden]
        for i in range(c.num_layers):
            prefix = f"model.layers.{i}"
            h = self._rms_norm(x, f"{prefix}.input_layernorm.weight")
            qkv = self._group_linear(prefix, "self_attn.qkv_proj", h, hook)
            q, k, v = qkv.split_with_sizes([q_width, kv_width, kv_width], dim=-1)
            q = q.view(batch, steps, c.num_heads, c.head_dim)
            k = k.view(batch, steps, c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                q = self._rms_norm(q, f"{prefix}.self_attn.q_norm.weight")
                k = self._rms_norm(k, f"{prefix}.self_attn.k_norm.weight")
            q = q.transpose(1, 2)
            k = k.transpose(1, 2)
            v = v.reshape(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if cache is not None:
                cache.keys[i][:, :, start : start + steps] = k
                cache.values[i][:, :, start : start + steps] = v
                if start > 0:
                    k = cache.keys[i][:, :, : start + steps]
                    v = cache.values[i][:, :, : start + steps]
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            attn = attn.transpose(1, 2).reshape(batch * steps, q_width)
            x = x + self._linear(f"{prefix}.self_attn.o_proj", attn, hook)
            h = self._rms_norm(x, f"{prefix}.post_attention_layernorm.weight")
            gate, up = self._group_linear(prefix, "mlp.gate_up_proj", h, hook).chunk(2, dim=-1)
            x = x + self._linear(f"{prefix}.mlp.down_proj", F.silu(gate) * up, hook)
        if cache is not None:
            cache.length += steps
        return self._rms_norm(x, "model.norm.weight").view(batch, steps, c.hidden_size)

    def logits(self, hidden: torch.Tensor, hook: LinearHook | None = None) -> torch.Tensor:
        """Unembedding of hidden states [..., hidden] -> float32 [..., vocab]."""
        flat = hidden.reshape(-1, self.config.hidden_size)
        out = _unembed(flat, self.lm_head)
        factors = hook.factors(LM_HEAD) if hook is not None else None
        if factors is not None:
            a, b, scale = factors
            out.addmm_(F.linear(flat, a) * scale, b.t())
        return out.view(*hidden.shape[:-1], self.config.vocab_size)

    def target_logprobs(
        self, hidden: torch.Tensor, targets: torch.Tensor, hook: LinearHook | None = None
    ) -> torch.Tensor:
        """log softmax(logits(hidden))[targets] for `hidden` [N, hidden], `targets` [N].

        Equal to gathering from `torch.log_softmax(self.logits(...))`, and differentiable
        (through the hidden states and the unembedding's LoRA factors), without forming the
        log-softmax: see `_TargetLogProbs`.
        """
        factors = hook.factors(LM_HEAD) if hook is not None else None
        if factors is None:
            low_rank = hidden.new_zeros(hidden.shape[0], 0)
            lora_b = hidden.new_zeros(self.config.vocab_size, 0)
        else:
            a, lora_b, scale = factors
            low_rank = F.linear(hidden, a) * scale
        out: torch.Tensor = _TargetLogProbs.apply(  # type: ignore[no-untyped-call]
            hidden, low_rank, lora_b, self.lm_head, targets
        )
        return out


def _unembed(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """`hidden` [N, h] @ `head`^T in float32 (a bfloat16 head upcast a chunk at a time)."""
    if head.dtype == torch.float32:
        return F.linear(hidden, head)
    out = hidden.new_empty(hidden.shape[0], head.shape[0])
    for row in range(0, head.shape[0], UNEMBED_CHUNK_ROWS):
        chunk = head[row : row + UNEMBED_CHUNK_ROWS]
        out[:, row : row + chunk.shape[0]] = F.linear(hidden, chunk.float())
    return out


def _unembed_backward(grad: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """`grad` [N, vocab] @ `head` [vocab, h]: the gradient of `_unembed` for its input."""
    if head.dtype == torch.float32:
        return grad @ head
    out = grad.new_zeros(grad.shape[0], head.shape[1])
    for row in range(0, head.shape[0], UNEMBED_CHUNK_ROWS):
        chunk = head[row : row + UNEMBED_CHUNK_ROWS]
        out.addmm_(grad[:, row : row + chunk.shape[0]], chunk.float())
    return out


class _TargetLogProbs(torch.autograd.Function):
    """Target log-probs of `hidden @ head^T + low_rank @ lora_b^T` with a hand-written backward.

    Autograd through `log_softmax(...).gather(...)` keeps the logits, the log-softmax and their
    gradients, several `[N, vocab]` tensors; this keeps one: the logits buffer is turned into
    the softmax in place (max, exp, sum, divide), and the backward reuses it for the gradient
    `dlp * (onehot(target) - softmax)`, from which the hidden-state, low-rank and `lora_b`
    gradients are three matmuls. Without gradient the buffer is `LOGPROB_CHUNK_TOKENS` rows,
    reused chunk after chunk.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        low_rank: torch.Tensor,
        lora_b: torch.Tensor,
        head: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        count = int(hidden.shape[0])
        keep = any(ctx.needs_input_grad[:3])
        chunk = max(count, 1) if keep else min(max(count, 1), LOGPROB_CHUNK_TOKENS)
        buffer = hidden.new_empty(chunk, head.shape[0])
        out = hidden.new_empty(count)
        for start in range(0, count, chunk):
            end = min(start + chunk, count)
            logits = buffer[: end - start]
            if head.dtype == torch.float32:
                torch.mm(hidden[start:end], head.t(), out=logits)
            else:
                logits.copy_(_unembed(hidden[start:end], head))
            if low_rank.shape[1]:
                logits.addmm_(low_rank[start:end], lora_b.t())
            picked = logits.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            logits.sub_(top).exp_()
            total = logits.sum(dim=1, keepdim=True)
            out[start:end] = picked - top.squeeze(1) - total.log().squeeze(1)
            if keep:
                logits.div_(total)  # the softmax, for backward
        if keep:
            ctx.save_for_backward(low_rank, lora_b, targets)
            ctx.softmax = buffer
            ctx.head = head
        return out

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        low_rank, lora_b, targets = ctx.saved_tensors
        softmax = ctx.softmax
        ctx.softmax = None
        count = int(grad_out.shape[0])
        # Positions whose log-prob the loss ignores (weight 0: prompt tokens, zero advantages)
        # get no gradient: leave them out of the [rows, vocab] @ [vocab, hidden] matmuls.
        used = grad_out.nonzero().squeeze(1)
        if int(used.shape[0]) == count:
            grad = softmax
        else:
            grad = softmax.index_select(0, used)
            grad_out, targets, low_rank = grad_out[used], targets[used], low_rank[used]
        # dlp/dlogits = onehot(target) - softmax, scaled by grad_out, in place.
        grad.mul_(-grad_out.unsqueeze(1))
        grad[torch.arange(grad.shape[0]), targets] += grad_out
        want_hidden, want_low_rank, want_b = ctx.needs_input_grad[:3]
        grad_hidden = grad_low_rank = grad_b = None
        if want_hidden:
            grad_hidden = _scatter_rows(_unembed_backward(grad, ctx.head), used, count)
        if want_low_rank:
            grad_low_rank = _scatter_rows(grad @ lora_b, used, count)
        if want_b:
            grad_b = grad.t() @ low_rank
        return grad_hidden, grad_low_rank, grad_b, None, None


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    """`values` [len(rows), d] placed at `rows` of a [count, d] zero tensor (as is if all)."""
    if int(rows.shape[0]) == count:
        return values
    out = values.new_zeros(count, values.shape[1])
    out[rows] = values
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


TINY_CONFIG = LlamaConfig(
    vocab_size=49152,  # SmolLM2's tokenizer, so the tiny model accepts the same token ids
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_context=2048,
)
TINY_SEED = 20240917
"""Fixed seed of the tiny model's random weights: every process gets the same model."""
_TINY_INIT_STD = 0.02  # the usual Llama `initializer_range`


def tiny_weights(
    config: LlamaConfig = TINY_CONFIG, seed: int = TINY_SEED
) -> dict[str, torch.Tensor]:
    """Deterministic random weights (normal(0, 0.02) matrices, unit norms), tied embeddings."""
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(
            config.vocab_size, config.hidden_size, generator=gen
        ).mul_(_TINY_INIT_STD)
    }
    for name, (out_dim, in_dim) in config.linear_shapes().items():
        if name == LM_HEAD:
            continue
        std = _TINY_INIT_STD
        if name.endswith(("o_proj", "down_proj")):
            std /= math.sqrt(2 * config.num_layers)  # GPT-2 style residual scaling
        weights[f"{name}.weight"] = torch.randn(out_dim, in_dim, generator=gen).mul_(std)
    for i in range(config.num_layers):
        weights[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(config.hidden_size)
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(
            config.hidden_size
        )
    weights["model.norm.weight"] = torch.ones(config.hidden_size)
    return weights
