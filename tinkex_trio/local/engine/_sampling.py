"""Batched sampling with a KV cache.

All requests that share a model and adapter run together. Prefill: the prompts, right-padded
and sorted by length, run as batches of at most `PREFILL_TOKENS` padded tokens straight into
one preallocated cache (one row per request; causal attention makes right padding exact, and
the pad slots are then marked invalid). Each request's row is then repeated once per sample, so
a prompt is prefilled once however many samples it asks for. Decoding generates one token per
sequence per step for the whole batch: new tokens go to the same cache slot in every row, each
with its true RoPE position; finished sequences are dropped from the batch. Per step, the
logits, log-probs and the choice of tokens are batched tensor operations (rows grouped by
sampling parameters); the only per-sequence work is the one uniform draw from the sequence's
own generator and the stop check.

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

PREFILL_TOKENS = 4096
"""Padded prompt tokens per prefill batch: bounds activations and attention temporaries."""

_PROMPT_LOGPROB_CHUNK = 512
"""Prompt positions per log-softmax chunk for top-k prompt log-probs (~100 MB temporaries)."""


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
    with model.adapters_frozen():
        return _sample_batch(model, hook, tokenizer, requests)


def _sample_batch(
    model: Llama, hook: LinearHook | None, tokenizer: Tokenizer, requests: Sequence[SampleRequest]
) -> list[SampleResult]:
    config = model.config
    results = [SampleResult(sequences=[]) for _ in requests]
    longest_prompt = max(len(r.prompt) for r in requests)
    new_tokens = max(r.max_tokens for r in requests)
    cache = KVCache(config, len(requests), longest_prompt + new_tokens)
    last_logits = _prefill(model, hook, requests, results, cache)

    rows: list[_Row] = []
    for index, req in enumerate(requests):
        for sample in range(req.num_samples):
            gen = torch.Generator()
            if req.seed is None:
                gen.seed()
            else:
                gen.manual_seed(sequence_seed(req.seed, sample))
            rows.append(_Row(index, gen, req, position=len(req.prompt)))
    row_requests = torch.tensor([row.request for row in rows], dtype=torch.int64)
    cache.select_rows(row_requests)
    logits = last_logits.index_select(0, row_requests)

    for row in rows:
        if row.request_params.max_tokens <= 0:
            row.stop_reason = "length"
    active = list(range(len(rows)))
    while True:
        live = [slot for slot, b in enumerate(active) if rows[b].stop_reason is None]
        if live:
            _append_tokens(
                [rows[active[slot]] for slot in live], logits[live], tokenizer, config.eos_token_ids
            )
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
    model: Llama,
    hook: LinearHook | None,
    requests: Sequence[SampleRequest],
    results: list[SampleResult],
    cache: KVCache,
) -> torch.Tensor:
    """Run every prompt into row `i` of `cache` (request i); fill prompt log-probs; return the
    logits after each prompt's last token, [requests, vocab]."""
    lengths = [len(req.prompt) for req in requests]
    hidden_size = model.config.hidden_size
    last_hidden = torch.empty(len(requests), hidden_size)
    for group in _prefill_groups(lengths):
        width = max(lengths[i] for i in group)
        tokens = torch.zeros(len(group), width, dtype=torch.int64)
        for row, index in enumerate(group):
            tokens[row, : lengths[index]] = torch.tensor(requests[index].prompt)
        part = KVCache(model.config, len(group), width)  # copied into `cache`'s rows below
        hidden = model.hidden_states(tokens, hook, cache=part)
        rows = torch.tensor(group, dtype=torch.int64)
        for layer in range(len(cache.keys)):
            cache.keys[layer][rows, :, :width] = part.keys[layer]
            cache.values[layer][rows, :, :width] = part.values[layer]
        for row, index in enumerate(group):
            cache.valid[index, : lengths[index]] = True
            last_hidden[index] = hidden[row, lengths[index] - 1]
            req = requests[index]
            if req.prompt_logprobs or req.topk_prompt_logprobs > 0:
                prompt = tokens[row, : lengths[index]]
                _prompt_logprobs(
                    model, hook, hidden[row, : lengths[index]], prompt, req, results[index]
                )
    cache.length = max(lengths)
    return model.logits(last_hidden, hook)


def _prefill_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Request indices by prompt length, in batches of at most `PREFILL_TOKENS` padded tokens
    (a longer prompt goes alone), so little is padding and memory stays bounded."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * lengths[index] <= PREFILL_TOKENS:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _prompt_logprobs(
    model: Llama,
    hook: LinearHook | None,
    hidden: torch.Tensor,
    prompt: torch.Tensor,
    req: SampleRequest,
    result: SampleResult,
) -> None:
    """Log-probs of prompt tokens 1.. (the same computation as training's), and the top k."""
    picked = model.target_logprobs(hidden[:-1], prompt[1:], hook)
    values: list[float | None] = [None, *picked.tolist()]
    topk: list[list[tuple[int, float]] | None] = [None]
    k = min(req.topk_prompt_logprobs, model.config.vocab_size)
    if k > 0:
        for start in range(0, prompt.numel() - 1, _PROMPT_LOGPROB_CHUNK):
            end = min(start + _PROMPT_LOGPROB_CHUNK, prompt.numel() - 1)
            logp = torch.log_softmax(model.logits(hidden[start:end], hook), dim=-1)
            top_values, top_ids = logp.topk(k, dim=-1)
            topk.extend(
                list(zip(ids, vals, strict=True))
                for ids, vals in zip(top_ids.tolist(), top_values.tolist(), strict=True)
            )
    if req.prompt_logprobs:
        result.prompt_logprobs = values
    if k > 0:
        result.topk_prompt_logprobs = topk


def _append_tokens(
    rows: Sequence[_Row], logits: torch.Tensor, tokenizer: Tokenizer, eos: tuple[int, ...]
) -> None:
    """Choose, record and stop-check the next token of every row (`logits` [rows, vocab])."""
    tokens = _choose(logits, rows)
    # log_softmax at the chosen token without the [rows, vocab] log-softmax.
    chosen = logits.gather(1, tokens.unsqueeze(1)).squeeze(1)
    logprobs = (chosen - torch.logsumexp(logits, dim=-1)).tolist()
    for row, token, logprob in zip(rows, tokens.tolist(), logprobs, strict=True):
        row.tokens.append(token)
        row.logprobs.append(logprob)
        row.position += 1
        params = row.request_params
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


def _choose(logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
    """One token id per row of `logits` [rows, vocab] under its temperature / top_k / top_p.

    Rows with the same parameters are processed as one batch; each row draws one uniform
    number from its own generator (inverse-CDF sampling), so its tokens do not depend on the
    other rows.
    """
    chosen = torch.empty(len(rows), dtype=torch.int64)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for slot, row in enumerate(rows):
        p = row.request_params
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(slot)
    vocab = logits.shape[1]
    for (temperature, top_k, top_p), slots in groups.items():
        index = torch.tensor(slots, dtype=torch.int64)
        group = logits.index_select(0, index)
        if temperature <= 0:
            chosen[index] = group.argmax(dim=1)
            continue
        scaled = group / temperature
        ids: torch.Tensor | None = None
        if 0 < top_k < vocab:
            scaled, ids = scaled.topk(top_k, dim=1)  # sorted, descending
        elif top_p < 1.0:
            scaled, ids = scaled.sort(dim=1, descending=True)
        probs = torch.softmax(scaled, dim=1)
        if top_p < 1.0:
            before = probs.cumsum(1) - probs
            probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
        cdf = probs.double().cumsum(1)
        draws = torch.cat(
            [torch.rand(1, generator=rows[slot].generator, dtype=torch.float64) for slot in slots]
        )
        u = (draws * cdf[:, -1]).unsqueeze(1)
        picks = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
        if ids is not None:
            picks = ids.gather(1, picks.unsqueeze(1)).squeeze(1)
        chosen[index] = picks
    return chosen
