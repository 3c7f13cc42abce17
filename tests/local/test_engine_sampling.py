"""Sampling on the tiny model: seeds, batching, stop rules, logprobs, adapters, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tinkex_trio.local._engine_api import (
    AdamStep,
    DatumArrays,
    EngineUserError,
    LoraSpec,
    SampleRequest,
    SampleResult,
)
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import TINY_NAME

PROMPT = [504, 3575, 282, 4649, 314]
EOS = 2


def _req(**kw: object) -> SampleRequest:
    base: dict[str, object] = {
        "base_model": TINY_NAME,
        "adapter_dir": None,
        "prompt": PROMPT,
        "max_tokens": 8,
        "seed": 123,
    }
    base.update(kw)
    return SampleRequest(**base)  # type: ignore[arg-type]


def _one(engine: TorchEngine, req: SampleRequest) -> SampleResult:
    (result,) = engine.sample([req])
    assert isinstance(result, SampleResult), result
    return result


def test_seeded_sampling_is_repeatable(tiny_engine: TorchEngine) -> None:
    req = _req(num_samples=3)
    first, second = _one(tiny_engine, req), _one(tiny_engine, req)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) == 3  # samples differ
    other = _one(tiny_engine, _req(num_samples=3, seed=124))
    assert [s.tokens for s in other.sequences] != [s.tokens for s in first.sequences]


def test_seeded_sampling_is_independent_of_the_batch(tiny_engine: TorchEngine) -> None:
    target = _req(num_samples=2, max_tokens=10, top_p=0.9, top_k=50)
    alone = _one(tiny_engine, target)
    batch = tiny_engine.sample(
        [
            _req(prompt=[7] * 23, num_samples=3, seed=9, max_tokens=4),
            target,
            _req(prompt=[11, 12], seed=None, max_tokens=12, temperature=0.7),
        ]
    )
    together = batch[1]
    assert isinstance(together, SampleResult)
    for a, b in zip(alone.sequences, together.sequences, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)
    assert [len(s.tokens) for s in batch[0].sequences] == [4, 4, 4]  # type: ignore[union-attr]


def test_greedy_equals_top_k_1_and_tiny_top_p(tiny_engine: TorchEngine) -> None:
    greedy = _one(tiny_engine, _req(temperature=0.0, stop=[])).sequences[0].tokens
    assert _one(tiny_engine, _req(top_k=1, stop=[])).sequences[0].tokens == greedy
    assert _one(tiny_engine, _req(top_p=1e-6, stop=[])).sequences[0].tokens == greedy


def test_stop_rules(tiny_engine: TorchEngine) -> None:
    free = _one(tiny_engine, _req(temperature=0.0, stop=[], max_tokens=12)).sequences[0]
    assert len(free.tokens) == 12 and free.stop_reason == "length"
    tokens = free.tokens

    stop_id = tokens[4]
    cut = tokens.index(stop_id)
    by_id = _one(tiny_engine, _req(temperature=0.0, stop=[stop_id, 1], max_tokens=12)).sequences[0]
    assert by_id.tokens == tokens[: cut + 1] and by_id.stop_reason == "stop"

    tokenizer = tiny_engine._model(TINY_NAME).tokenizer
    stop_text = tokenizer.decode(tokens[5:7], skip_special_tokens=False)[1:4]
    assert stop_text
    expected = next(
        i + 1
        for i in range(len(tokens))
        if stop_text in tokenizer.decode(tokens[: i + 1], skip_special_tokens=False)
    )
    by_text = _one(
        tiny_engine, _req(temperature=0.0, stop=[stop_text, "never"], max_tokens=12)
    ).sequences[0]
    assert by_text.tokens == tokens[:expected] and by_text.stop_reason == "stop"

    zero = _one(tiny_engine, _req(max_tokens=0)).sequences[0]
    assert zero.tokens == [] and zero.stop_reason == "length"


def _eos_adapter(engine: TorchEngine, directory: Path) -> None:
    """Train an adapter that answers every token with EOS, and save it for sampling."""
    engine.create_adapter("eos", TINY_NAME, LoraSpec(rank=4, seed=0))
    seq = np.array([*PROMPT, EOS, EOS, EOS], dtype=np.int64)
    datum = DatumArrays(seq, {"target_tokens": np.full(seq.shape, EOS, np.int64)})
    for _ in range(15):
        engine.forward_backward("eos", [datum], "cross_entropy", {}, False)
        engine.optim_step("eos", AdamStep(learning_rate=5e-2))
    engine.save_state("eos", directory, with_optimizer=False)


def test_stop_none_stops_at_eos_but_empty_list_does_not(
    tiny_engine: TorchEngine, tmp_path: Path
) -> None:
    _eos_adapter(tiny_engine, tmp_path)
    base = _one(tiny_engine, _req(temperature=0.0, max_tokens=3)).sequences[0]
    assert EOS not in base.tokens  # the base model does not say EOS here...
    default = _one(tiny_engine, _req(adapter_dir=tmp_path, temperature=0.0)).sequences[0]
    assert default.tokens == [EOS] and default.stop_reason == "stop"  # ...the adapter does
    never = _one(tiny_engine, _req(adapter_dir=tmp_path, temperature=0.0, stop=[])).sequences[0]
    assert len(never.tokens) == 8 and never.stop_reason == "length"
    assert never.tokens[0] == EOS


def test_sampled_and_prompt_logprobs_match_training_logprobs(tiny_engine: TorchEngine) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=2, seed=0))  # B = 0: base model
    result = _one(
        tiny_engine, _req(max_tokens=6, stop=[], prompt_logprobs=True, topk_prompt_logprobs=3)
    )
    seq = result.sequences[0]
    full = PROMPT + seq.tokens
    forward = tiny_engine.forward_backward(
        "a",
        [DatumArrays(np.array(full[:-1]), {"target_tokens": np.array(full[1:])})],
        "cross_entropy",
        {},
        True,
    ).logprobs[0]
    assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
    np.testing.assert_allclose(
        np.array(result.prompt_logprobs[1:], dtype=np.float32),
        forward[: len(PROMPT) - 1],
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(seq.logprobs, forward[len(PROMPT) - 1 :], rtol=1e-4, atol=1e-5)

    topk = result.topk_prompt_logprobs
    assert topk is not None and topk[0] is None and len(topk) == len(PROMPT)
    for position, entries in enumerate(topk[1:], start=1):
        assert entries is not None and len(entries) == 3
        values = [lp for _, lp in entries]
        assert values == sorted(values, reverse=True)
        actual = result.prompt_logprobs[position]
        assert actual is not None and values[0] >= actual - 1e-6


def test_errors_are_per_request(tiny_engine: TorchEngine, tmp_path: Path) -> None:
    good = _req()
    results = tiny_engine.sample(
        [
            _req(base_model="nope"),
            good,
            _req(prompt=[49152]),
            _req(prompt=[1] * 2000, max_tokens=100),
            _req(adapter_dir=tmp_path),
            _req(prompt=[]),
            dataclasses.replace(good, num_samples=0),
            _req(stop=[99999]),
        ]
    )
    messages = [str(r) if isinstance(r, EngineUserError) else None for r in results]
    assert messages[1] is None
    assert "unknown base_model 'nope'" in str(messages[0])
    assert "outside the vocabulary" in str(messages[2])
    assert "exceeds the context length 2048" in str(messages[3])
    assert "adapter_model.safetensors" in str(messages[4])
    assert "empty" in str(messages[5])
    assert "num_samples" in str(messages[6])
    assert "stop token ids" in str(messages[7])
