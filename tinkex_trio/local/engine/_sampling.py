"""Batched sampling with a KV cache.

Each request's prompt is prefilled on its own (batch 1, no padding, so its prompt logprobs are
exact), then all sequences of all requests that share a model and adapter decode together:
their caches are copied into one left-padded cache and one token per sequence is generated
per step. Finished sequences are dropped from the batch.

Choices (documented for the server and users):
- Randomness: every sequence has its own `torch.Generator`, seeded from (request seed, sample
  index), and draws one uniform number per token (inverse-CDF sampling). So a seeded request
  gives the same tokens whatever else is in the batch (up to float rounding in the batched
  matmuls). No seed = fresh OS entropy.
- Filtering order: temperature, then top_k (a cheap prefilter), then top_p (nucleus, keeps the
  smallest prefix of the sorted distribution whose mass reaches top_p). temperature 0 = greedy.
- Returned `logprobs` are log_softmax(logits) of the chosen token at temperature 1 with no
  truncation: the same quantity training computes for `target_tokens`, so an importance ratio
  exp(lp - q) is exactly 1 for unchanged weights.
- Stops: `stop=None` stops at EOS (any of the model's end-of-sequence ids); `stop=[]` never stops (runs to max_tokens); a list of ids
  stops at any of them (EOS only if listed); a list of strings stops as soon as the decoded
  completion (special tokens included) contains one, and EOS then does not stop: an explicit
  list replaces the default, as `[]` does. The token that triggered the stop is kept in
  `tokens` and `stop_reason` is "stop"; otherwise "length".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer

from .._engine_api import SampledSequenceResult, SampleRequest, SampleResult
from ._llama import KVCache, LinearHook, Llama

_PROMPT_LOGPROB_CHUNK = 512
"""Prompt positions per log-softmax chunk: bounds the [chunk, vocab] temporaries (~100 MB)."""


def sequence_seed(seed: int, sample_index: int) -> int:
    """A generator seed in [0, 2^63) for sample `sample_index` of a request seeded `seed`."""
    state = np.random.SeedSequence([seed % (1 << 64), sample_index]).generate_state(2, np.uint64)
    return int(state[0]) >> 1


@dataclass
class _Row:
    request: int
    generator: torch.Generator
    request_params: SampleRequest
    position: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


def sample_batch(
    model: Llama, hook: LinearHook | None, tokenizer: Tokenizer, requests: Sequence[SampleRequest]
) -> list[SampleResult]:
    """Sample every request (already validated) with one model + adapter."""
    config = model.config
    results = [SampleResult(sequences=[]) for _ in requests]
    prefills: list[KVCache] = []
    last_logits: list[torch.Tensor] = []
    for index, req in enumerate(requests):
        cache, logits = _prefill(model, hook, req, results[index])
        prefills.append(cache)
        last_logits.append(logits)

    rows: list[_Row] = []
    for index, req in enumerate(requests):
        for sample in range(req.num_samples):
            gen = torch.Generator()
            if req.seed is None:
                gen.seed()
            else:
                gen.manual_seed(sequence_seed(req.seed, sample))
            rows.append(_Row(index, gen, req, position=len(req.prompt)))

    longest_prompt = max(len(r.prompt) for r in requests)
    new_tokens = max(r.max_tokens for r in requests)
    cache = KVCache(config, len(rows), longest_prompt + new_tokens)
    for b, row in enumerate(rows):
        src = prefills[row.request]
        start = longest_prompt - row.position
        for layer in range(config.num_layers):
            cache.keys[layer][b, :, start:longest_prompt] = src.keys[layer][0]
            cache.values[layer][b, :, start:longest_prompt] = src.values[layer][0]
        cache.valid[b, start:longest_prompt] = True
    cache.length = longest_prompt
    del prefills
    logits = torch.stack([last_logits[row.request] for row in rows])

    active = list(range(len(rows)))
    for row in rows:
        if row.request_params.max_tokens <= 0:
            row.stop_reason = "length"
    while True:
        for slot, b in enumerate(active):
            row = rows[b]
            if row.stop_reason is None:
                _append_token(row, logits[slot], tokenizer, config.eos_token_ids)
        still = [slot for slot, b in enumerate(active) if rows[b].stop_reason is None]
        if not still:
            break
        if len(still) != len(active):
            cache.select_rows(torch.tensor(still, dtype=torch.int64))
            active = [active[slot] for slot in still]
        step_tokens = torch.tensor([[rows[b].tokens[-1]] for b in active], dtype=torch.int64)
        positions = torch.tensor([[rows[b].position - 1] for b in active], dtype=torch.int64)
        hidden = model.hidden_states(step_tokens, hook, positions=positions, cache=cache)
        logits = model.logits(hidden[:, -1], hook)

    for row in rows:
        results[row.request].sequences.append(
            SampledSequenceResult(
                tokens=row.tokens,
                logprobs=row.logprobs,
                stop_reason="stop" if row.stop_reason == "stop" else "length",
            )
        )
    return results


def _prefill(
    model: Llama, hook: LinearHook | None, req: SampleRequest, result: SampleResult
) -> tuple[KVCache, torch.Tensor]:
    """Run the prompt into a fresh cache; fill prompt logprobs; return the last logits."""
    prompt = torch.tensor([req.prompt], dtype=torch.int64)
    cache = KVCache(model.config, 1, prompt.shape[1])
    hidden = model.hidden_states(
        prompt, hook, positions=torch.arange(prompt.shape[1]).unsqueeze(0), cache=cache
    )[0]
    if req.prompt_logprobs or req.topk_prompt_logprobs > 0:
        _prompt_logprobs(model, hook, hidden, prompt[0], req, result)
    return cache, model.logits(hidden[-1], hook)


def _prompt_logprobs(
    model: Llama,
    hook: LinearHook | None,
    hidden: torch.Tensor,
    prompt: torch.Tensor,
    req: SampleRequest,
    result: SampleResult,
) -> None:
    values: list[float | None] = [None]
    topk: list[list[tuple[int, float]] | None] = [None]
    k = min(req.topk_prompt_logprobs, model.config.vocab_size)
    for start in range(0, prompt.numel() - 1, _PROMPT_LOGPROB_CHUNK):
        end = min(start + _PROMPT_LOGPROB_CHUNK, prompt.numel() - 1)
        logp = torch.log_softmax(model.logits(hidden[start:end], hook), dim=-1)
        picked = logp.gather(1, prompt[start + 1 : end + 1].unsqueeze(1)).squeeze(1)
        values.extend(float(v) for v in picked)
        if k > 0:
            top_values, top_ids = logp.topk(k, dim=-1)
            topk.extend(
                list(zip(ids, vals, strict=True))
                for ids, vals in zip(top_ids.tolist(), top_values.tolist(), strict=True)
            )
    if req.prompt_logprobs:
        result.prompt_logprobs = values
    if k > 0:
        result.topk_prompt_logprobs = topk


def _append_token(
    row: _Row, logits: torch.Tensor, tokenizer: Tokenizer, eos: tuple[int, ...]
) -> None:
    params = row.request_params
    token = _choose(logits, params, row.generator)
    row.tokens.append(token)
    row.logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
    row.position += 1
    stop = params.stop
    if stop is None:
        hit = token in eos
    elif not stop:
        hit = False
    elif isinstance(stop[0], int):
        hit = token in stop
    else:
        text = tokenizer.decode(row.tokens, skip_special_tokens=False)
        hit = any(s in text for s in stop if isinstance(s, str))
    if hit:
        row.stop_reason = "stop"
    elif len(row.tokens) >= params.max_tokens:
        row.stop_reason = "length"


def _choose(logits: torch.Tensor, params: SampleRequest, generator: torch.Generator) -> int:
    """One token id from `logits` [vocab] under temperature / top_k / top_p."""
    if params.temperature <= 0:
        return int(logits.argmax())
    scaled = logits / params.temperature
    ids: torch.Tensor | None = None
    if 0 < params.top_k < scaled.numel():
        scaled, ids = scaled.topk(params.top_k)  # sorted, descending
    elif params.top_p < 1.0:
        scaled, ids = scaled.sort(descending=True)
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        before = probs.cumsum(0) - probs
        probs = torch.where(before < params.top_p, probs, torch.zeros_like(probs))
    cdf = probs.double().cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    choice = min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)
    return int(ids[choice]) if ids is not None else choice
