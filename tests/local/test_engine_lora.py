"""LoRA: a fresh adapter is the identity; saved adapters reload to the same logits."""

from __future__ import annotations

from pathlib import Path

import torch

from tinkex_trio.local._engine_api import LoraSpec
from tinkex_trio.local.engine._llama import TINY_CONFIG, Llama, tiny_weights
from tinkex_trio.local.engine._lora import LoraAdapter
from tinkex_trio.local.model_files import TINY_NAME

TOKENS = torch.tensor([[5, 900, 12, 40000, 7, 7, 31]])


def _model() -> Llama:
    return Llama(TINY_CONFIG, tiny_weights())


def test_b_zero_gives_base_logits() -> None:
    model = _model()
    lora = LoraAdapter.create(TINY_NAME, TINY_CONFIG, LoraSpec(rank=8, seed=0))
    assert all(float(a.detach().abs().max()) > 0 for a, _ in lora.pairs.values())  # A is random
    with torch.no_grad():
        base = model.logits(model.hidden_states(TOKENS))
        adapted = model.logits(model.hidden_states(TOKENS, lora), lora)
        torch.testing.assert_close(adapted, base, rtol=0, atol=0)
        for _, b in lora.pairs.values():
            b.add_(0.05)
        changed = model.logits(model.hidden_states(TOKENS, lora), lora)
    assert float((changed - base).abs().max()) > 1e-3


def test_seeded_init_is_reproducible_and_kaiming_bounded() -> None:
    one = LoraAdapter.create(TINY_NAME, TINY_CONFIG, LoraSpec(rank=4, seed=11))
    two = LoraAdapter.create(TINY_NAME, TINY_CONFIG, LoraSpec(rank=4, seed=11))
    three = LoraAdapter.create(TINY_NAME, TINY_CONFIG, LoraSpec(rank=4, seed=12))
    for name, (a, _) in one.pairs.items():
        assert torch.equal(a, two.pairs[name][0])
        assert not torch.equal(a, three.pairs[name][0])
        assert float(a.detach().abs().max()) <= 1 / a.shape[1] ** 0.5
    assert one.scale == 32.0 / 4


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _model()
    lora = LoraAdapter.create(TINY_NAME, TINY_CONFIG, LoraSpec(rank=4, seed=0, alpha=16))
    with torch.no_grad():
        for _, b in lora.pairs.values():
            b.normal_(0, 0.02)
    lora.save(tmp_path)
    loaded = LoraAdapter.load(tmp_path, TINY_NAME, TINY_CONFIG)
    assert loaded.spec.rank == 4 and loaded.spec.alpha == 16
    with torch.no_grad():
        want = model.logits(model.hidden_states(TOKENS, lora), lora)
        got = model.logits(model.hidden_states(TOKENS, loaded), loaded)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
