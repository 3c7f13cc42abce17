"""The engine's fast paths compute exactly what the plain formulas compute.

- `Llama.target_logprobs` (one softmax buffer, hand-written backward) equals
  `log_softmax(logits).gather(targets)` in value and in the gradients it sends to the hidden
  states and to the unembedding's LoRA factors, for float32 and bfloat16 weights, with and
  without gradient (the chunked path).
- Fused q/k/v and gate/up weights: one copy in memory, the per-module names are views of it.
- A LoRA group applied as stacked A / block-diagonal B equals module-by-module `B @ A @ x`.
- Batched prefill: prompts of different lengths, split over several prefill batches, give each
  request the prompt log-probs and seeded tokens it gets alone.
- Sampling through adapters (factors stacked once per batch) gives the log-probs training
  computes with the same adapter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinkex_trio.local._engine_api import DatumArrays, LoraSpec, SampleRequest, SampleResult
from tinkex_trio.local.engine import TorchEngine, _llama, _sampling
from tinkex_trio.local.engine._llama import LM_HEAD, TINY_CONFIG, Llama, tiny_weights
from tinkex_trio.local.engine._lora import LoraAdapter
from tinkex_trio.local.model_files import TINY_NAME

TOKENS = torch.tensor([[504, 3575, 282, 4649, 314, 19556, 28, 905, 17, 2]])


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(TINY_CONFIG, tiny_weights())


def _adapter_with_b(seed: int = 0) -> LoraAdapter:
    lora = LoraAdapter.create(TINY_NAME, TINY_CONFIG, LoraSpec(rank=4, alpha=8.0, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, b in lora.pairs.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)  # B != 0: the term is real
    return lora


def _reference_logprobs(
    model: Llama, hidden: torch.Tensor, targets: torch.Tensor, lora: LoraAdapter | None
) -> torch.Tensor:
    logits = F.linear(hidden, model.lm_head.float())
    if lora is not None:
        a, b = lora.pairs[LM_HEAD]
        logits = logits + F.linear(F.linear(hidden, a), b) * lora.scale
    return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize(
    ("with_lora", "some_ignored"), [(False, False), (True, False), (True, True)]
)
def test_target_logprobs_and_gradients_equal_log_softmax(
    model: Llama, with_lora: bool, some_ignored: bool
) -> None:
    lora = _adapter_with_b() if with_lora else None
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(37, TINY_CONFIG.hidden_size, generator=gen) * 3
    targets = torch.randint(0, TINY_CONFIG.vocab_size, (37,), generator=gen)
    weights = torch.rand(37, generator=gen) - 0.3  # signed: any loss, not just NLL
    if some_ignored:
        weights[::3] = 0.0  # positions the loss ignores: the backward skips their rows

    ours_hidden = hidden.clone().requires_grad_(True)
    ours = model.target_logprobs(ours_hidden, targets, lora)
    (ours * weights).sum().backward()  # type: ignore[no-untyped-call]
    ours_grads = [p.grad.clone() for p in lora.pairs[LM_HEAD]] if lora else []
    if lora:
        for p in lora.pairs[LM_HEAD]:
            p.grad = None

    ref_hidden = hidden.clone().requires_grad_(True)
    ref = _reference_logprobs(model, ref_hidden, targets, lora)
    (ref * weights).sum().backward()  # type: ignore[no-untyped-call]

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours_hidden.grad is not None and ref_hidden.grad is not None
    assert float(ref_hidden.grad.abs().max()) > 0
    torch.testing.assert_close(ours_hidden.grad, ref_hidden.grad, rtol=1e-4, atol=1e-6)
    if lora:
        ref_grads = [p.grad for p in lora.pairs[LM_HEAD]]
        for got, want in zip(ours_grads, ref_grads, strict=True):
            assert want is not None and float(want.abs().max()) > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_target_logprobs_without_gradient_runs_in_chunks(
    model: Llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_llama, "LOGPROB_CHUNK_TOKENS", 8)  # 37 rows: five chunks, one short
    lora = _adapter_with_b()
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(37, TINY_CONFIG.hidden_size, generator=gen)
    targets = torch.randint(0, TINY_CONFIG.vocab_size, (37,), generator=gen)
    with torch.inference_mode():
        ours = model.target_logprobs(hidden, targets, lora)
        ref = _reference_logprobs(model, hidden, targets, lora)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_target_logprobs_with_bfloat16_head_upcasts_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_llama, "UNEMBED_CHUNK_ROWS", 10000)  # 49152 rows: five chunks
    weights = {k: v.bfloat16() for k, v in tiny_weights().items()}
    model = Llama(TINY_CONFIG, weights)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(9, TINY_CONFIG.hidden_size, generator=gen).requires_grad_(True)
    targets = torch.randint(0, TINY_CONFIG.vocab_size, (9,), generator=gen)
    ours = model.target_logprobs(hidden, targets)
    ours.sum().backward()  # type: ignore[no-untyped-call]
    assert hidden.grad is not None
    ours_grad = hidden.grad.clone()
    hidden.grad = None
    ref = _reference_logprobs(model, hidden, targets, None)
    ref.sum().backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grad, hidden.grad, rtol=1e-4, atol=1e-6)


def test_fused_weights_are_one_copy_viewed_by_module_name(model: Llama) -> None:
    prefix = "model.layers.1"
    q = model.weights[f"{prefix}.self_attn.q_proj.weight"]
    v = model.weights[f"{prefix}.self_attn.v_proj.weight"]
    gate = model.weights[f"{prefix}.mlp.gate_proj.weight"]
    up = model.weights[f"{prefix}.mlp.up_proj.weight"]
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
    assert torch.equal(q, tiny_weights()[f"{prefix}.self_attn.q_proj.weight"])
    assert torch.equal(up, tiny_weights()[f"{prefix}.mlp.up_proj.weight"])


def test_lora_group_equals_module_by_module(model: Llama) -> None:
    lora = _adapter_with_b(seed=3)
    with torch.inference_mode():
        fused = model.logits(model.hidden_states(TOKENS, lora), lora)
    # The same model with each weight separate and the LoRA term added per module.
    plain = _PerModuleLlama(TINY_CONFIG, tiny_weights())
    with torch.inference_mode():
        separate = plain.logits(plain.hidden_states(TOKENS, lora), lora)
        base = plain.logits(plain.hidden_states(TOKENS))
    assert float((separate - base).abs().max()) > 1e-3  # the adapter changes the output
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)


class _PerModuleLlama(Llama):
    """`Llama` with every group member run as its own linear layer plus `B @ A @ x`."""

    def _group_linear(
        self, prefix: str, group: str, x: torch.Tensor, hook: _llama.LinearHook | None
    ) -> torch.Tensor:
        outs = []
        for member in _llama.FUSED_GROUPS[group]:
            module = f"{prefix}.{member}"
            out = F.linear(x, self.weights[f"{module}.weight"])
            factors = hook.factors(module) if hook is not None else None
            if factors is not None:
                a, b, scale = factors
                out = out + F.linear(F.linear(x, a), b) * scale
            outs.append(out)
        return torch.cat(outs, dim=-1)


def _sample(engine: TorchEngine, requests: list[SampleRequest]) -> list[SampleResult]:
    results = engine.sample(requests)
    assert all(isinstance(r, SampleResult) for r in results), results
    return [r for r in results if isinstance(r, SampleResult)]


def test_batched_prefill_over_several_batches_equals_each_request_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = TorchEngine(models=[TINY_NAME], threads=1)
    base = SampleRequest(
        base_model=TINY_NAME,
        adapter_dir=None,
        prompt=[],
        max_tokens=5,
        stop=[],
        seed=0,
        prompt_logprobs=True,
    )
    requests = [
        dataclasses.replace(base, prompt=[(7 * i + j) % 5000 + 3 for j in range(n)], seed=i)
        for i, n in enumerate([3, 17, 9, 30, 1, 12])
    ]
    requests[2] = dataclasses.replace(requests[2], num_samples=3)
    alone = [_sample(engine, [req])[0] for req in requests]
    monkeypatch.setattr(_sampling, "PREFILL_TOKENS", 40)  # several prefill batches
    assert len(_sampling._prefill_groups([len(r.prompt) for r in requests])) >= 3
    together = _sample(engine, requests)
    for one, batched in zip(alone, together, strict=True):
        assert [s.tokens for s in one.sequences] == [s.tokens for s in batched.sequences]
        assert one.prompt_logprobs is not None and batched.prompt_logprobs is not None
        assert one.prompt_logprobs[0] is None and batched.prompt_logprobs[0] is None
        torch.testing.assert_close(
            torch.tensor(batched.prompt_logprobs[1:]),
            torch.tensor(one.prompt_logprobs[1:]),
            rtol=1e-5,
            atol=1e-5,
        )
        for a, b in zip(one.sequences, batched.sequences, strict=True):
            torch.testing.assert_close(
                torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-5
            )


def test_sampling_through_an_adapter_matches_its_training_logprobs(tmp_path: Path) -> None:
    """The decode steps reuse each LoRA group's stacked factors (`adapters_frozen`); they must
    be the right ones for every layer and group, and for each adapter of a mixed batch."""
    engine = TorchEngine(models=[TINY_NAME], threads=1)
    directories = []
    for seed in (0, 1):
        engine.create_adapter(f"a{seed}", TINY_NAME, LoraSpec(rank=4, alpha=8.0, seed=seed))
        gen = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for _, b in engine._adapters[f"a{seed}"].lora.pairs.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
        directory = tmp_path / f"a{seed}"
        engine.save_state(f"a{seed}", directory, with_optimizer=False)
        directories.append(directory)
    prompt = TOKENS[0].tolist()
    requests = [
        SampleRequest(
            base_model=TINY_NAME,
            adapter_dir=directory,
            prompt=prompt,
            max_tokens=6,
            stop=[],
            seed=3,
            prompt_logprobs=True,
        )
        for directory in [*directories, None]
    ]
    results = _sample(engine, requests)
    assert results[0].sequences[0].tokens != results[1].sequences[0].tokens  # adapters differ
    for seed, result in enumerate(results[:2]):
        full = prompt + result.sequences[0].tokens
        datum = DatumArrays(np.array(full[:-1]), {"target_tokens": np.array(full[1:])})
        training = engine.forward_backward(f"a{seed}", [datum], "cross_entropy", {}, True)
        assert result.prompt_logprobs is not None
        sampled = [*result.prompt_logprobs[1:], *result.sequences[0].logprobs]
        np.testing.assert_allclose(sampled, training.logprobs[0], rtol=1e-4, atol=1e-5)
