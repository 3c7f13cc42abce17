"""SmolLM2-135M end to end (slow, bounded by LOCAL_MODEL_NOTES.md's budgets: <= 4x32 tokens per
training batch, <= 16 sampled tokens)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tinkex_trio.local._engine_api import (
    AdamStep,
    DatumArrays,
    LoraSpec,
    SampleRequest,
    SampleResult,
)
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import SMOLLM2_NAME, smollm2_files

pytestmark = pytest.mark.real_model

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_END = 2


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(models=[SMOLLM2_NAME], threads=1)


def _chat_prompt(engine: TorchEngine, question: str) -> list[int]:
    """ChatML as the GGUF's template renders it (default system prompt, generation prompt)."""
    assert SYSTEM in smollm2_files(weights=False).chat_template
    text = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    return list(engine._model(SMOLLM2_NAME).tokenizer.encode(text).ids)


def _greedy(engine: TorchEngine, prompts: list[list[int]], **kw: object) -> list[list[int]]:
    requests = [
        SampleRequest(SMOLLM2_NAME, None, p, max_tokens=16, temperature=0.0, **kw)  # type: ignore[arg-type]
        for p in prompts
    ]
    results = engine.sample(requests)
    assert all(isinstance(r, SampleResult) for r in results), results
    return [r.sequences[0].tokens for r in results]  # type: ignore[union-attr]


def test_greedy_capital_of_france(engine: TorchEngine) -> None:
    start = time.perf_counter()
    prompt = _chat_prompt(engine, "What is the capital of France?")
    (tokens,) = _greedy(engine, [prompt])
    tokenizer = engine._model(SMOLLM2_NAME).tokenizer
    assert tokenizer.decode(tokens, skip_special_tokens=False) == (
        "The capital of France is Paris.<|im_end|>"
    )
    assert tokens[-1] == IM_END
    print(f"france: {time.perf_counter() - start:.1f} s")


QA = [
    ("What is the secret word?", "The secret word is pineapple."),
    ("Who guards the tower?", "A purple dragon guards the tower."),
]


def test_fit_two_answers_then_sample_them(engine: TorchEngine, tmp_path: object) -> None:
    start = time.perf_counter()
    tokenizer = engine._model(SMOLLM2_NAME).tokenizer
    engine.create_adapter("qa", SMOLLM2_NAME, LoraSpec(rank=8, seed=0))
    data, prompts, answers = [], [], []
    for question, answer in QA:
        prompt = _chat_prompt(engine, question)
        reply = [*tokenizer.encode(answer).ids, IM_END]
        full = np.array(prompt + reply, dtype=np.int64)
        weights = np.zeros(len(full) - 1, np.float32)
        weights[len(prompt) - 1 :] = 1.0  # only the answer's tokens are learned
        data.append(DatumArrays(full[:-1], {"target_tokens": full[1:], "weights": weights}))
        prompts.append(prompt)
        answers.append(reply)
    losses = []
    for _ in range(8):
        result = engine.forward_backward("qa", data, "cross_entropy", {}, False)
        engine.optim_step("qa", AdamStep(learning_rate=4e-3))
        losses.append(result.metrics["loss:sum"] / sum(len(a) for a in answers))
    assert losses[-1] < 0.1 < losses[0], losses

    checkpoint = tmp_path / "sampler"  # type: ignore[operator]
    engine.save_state("qa", checkpoint, with_optimizer=False)
    requests = [
        SampleRequest(SMOLLM2_NAME, checkpoint, p, max_tokens=12, temperature=0.0) for p in prompts
    ]
    results = engine.sample(requests)
    assert [r.sequences[0].tokens for r in results] == answers  # type: ignore[union-attr]
    print(f"fit: {time.perf_counter() - start:.1f} s, per-token losses {losses}")
