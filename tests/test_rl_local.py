"""Short RL runs with `stable_reinforce` and `gspo` through our SDK against the real local
backend (Hypercorn on 127.0.0.1, TorchEngine, the tiny model), with real sampling.

Each step samples from the current weights (a `record_stability_info` sampler for
stable_reinforce), rewards sequences by how many of their tokens fall in a fixed half of the
vocabulary, and trains on the centred rewards. The check: at every step, the batch's
reward-weighted log-prob `J = sum_i A_i * sum_t lp_it` is higher after the optimizer step than
before it (a loss with the wrong sign or no gradient makes it fall or stay).
Real sockets and a torch thread: outcomes only, under `trio.fail_after`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import trio

pytest.importorskip("torch")

from tinkex_trio import (
    AdamParams,
    Datum,
    InvalidInputError,
    ModelInput,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
    SamplingParams,
    open_service,
    types as t,
)
from tinkex_trio.local import open_local_backend

TINY = "tinkex-trio/SmolLM2-tiny-random"
LIMIT = 240
PROMPT = [1, 4093, 198, 1780, 314]
HALF_VOCAB = 49152 // 2
STEPS = 3


def reward(tokens: list[int]) -> float:
    return float(np.mean([tok < HALF_VOCAB for tok in tokens]))


def rl_datum(
    loss_fn: str, sequence: t.SampledSequence, advantage: float, prompt: list[int]
) -> Datum:
    """prompt + sampled tokens as one datum: input = full[:-1], targets = full[1:]."""
    full = prompt + list(sequence.tokens)
    n_prompt, n_sampled = len(prompt), len(sequence.tokens)
    advantages = np.array([0.0] * (n_prompt - 1) + [advantage] * n_sampled, np.float32)
    inputs: dict[str, object] = {"target_tokens": np.array(full[1:]), "advantages": advantages}
    if loss_fn == "gspo":
        assert sequence.logprobs is not None
        inputs["logprobs"] = np.array([0.0] * (n_prompt - 1) + sequence.logprobs, np.float32)
        inputs["sequence_ratio_mask"] = (advantages != 0).astype(np.float32)
    datum = Datum(model_input=ModelInput.from_ints(full[:-1]), loss_fn_inputs=inputs)  # type: ignore[arg-type]
    if loss_fn != "stable_reinforce":
        return datum
    sid = sequence.sequence_id
    assert sid is not None
    return datum.with_provenance(
        model_input=[
            PromptProvenanceSpan(sequence_id=sid, length=n_prompt),
            SampledProvenanceSpan(sequence_id=sid, length=n_sampled - 1),
        ],
        loss_fn_inputs=[
            PromptProvenanceSpan(sequence_id=sid, offset=1, length=n_prompt - 1),
            SampledProvenanceSpan(sequence_id=sid, length=n_sampled),
        ],
    )


def weighted_logprob(outputs: list[dict[str, t.TensorData]], batch: list[Datum]) -> float:
    total = 0.0
    for output, datum in zip(outputs, batch, strict=True):
        lp = np.asarray(output["logprobs"].to_numpy(), np.float64)
        total += float(np.sum(lp * datum.loss_fn_inputs["advantages"].to_numpy()))
    return total


@pytest.mark.parametrize(
    ("loss_fn", "wire_format"),
    [("stable_reinforce", "json"), ("stable_reinforce", "protobuf"), ("gspo", "protobuf")],
)
async def test_short_rl_run_raises_reward_weighted_logprob(
    tmp_path: Path, loss_fn: str, wire_format: Literal["json", "protobuf"]
) -> None:
    config = {"kl_coeff": 0.05} if loss_fn == "stable_reinforce" else {}
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(data_dir=tmp_path / "data", models=[TINY]) as backend,
            open_service(
                base_url=backend.base_url,
                api_key=backend.api_key,
                telemetry=False,
                wire_format=wire_format,
            ) as service,
        ):
            training = await service.create_lora_training_client(TINY, rank=8, seed=0)
            gains = []
            for step in range(STEPS):
                sampler = await training.save_weights_and_get_sampling_client(
                    record_stability_info=loss_fn == "stable_reinforce"
                )
                result = await sampler.sample(
                    ModelInput.from_ints(PROMPT),
                    num_samples=8,
                    sampling_params=SamplingParams(max_tokens=6, seed=step, stop=[]),
                )
                rewards = np.array([reward(s.tokens) for s in result.sequences])
                assert rewards.std() > 0, rewards  # something to learn from
                advantages = rewards - rewards.mean()
                batch = [
                    rl_datum(loss_fn, s, float(a), PROMPT)
                    for s, a in zip(result.sequences, advantages, strict=True)
                ]
                fb = await (await training.forward_backward(batch, loss_fn, config))
                await (await training.optim_step(AdamParams(learning_rate=2e-2)))
                after = await (await training.forward(batch, "cross_entropy"))
                gains.append(
                    weighted_logprob(after.loss_fn_outputs, batch)
                    - weighted_logprob(fb.loss_fn_outputs, batch)
                )
            # Every step moved its batch's reward-weighted log-prob up, clearly.
            assert min(gains) > 0.1, gains


async def test_sdk_refuses_stable_reinforce_data_without_provenance(tmp_path: Path) -> None:
    """Checked before sending: no spans, mis-tiled spans, wrong dtypes."""
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(data_dir=tmp_path / "data", models=[TINY]) as backend,
            open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service,
        ):
            training = await service.create_lora_training_client(TINY, rank=4, seed=0)
            bare = Datum(
                model_input=ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3, 4], "advantages": [0.0, 1.0, 1.0]},
            )
            with pytest.raises(InvalidInputError, match=r"data\[0\] has no provenance spans"):
                await training.forward_backward([bare], "stable_reinforce")
            mistiled = Datum(
                model_input=bare.model_input,
                loss_fn_inputs=bare.loss_fn_inputs,
                model_input_spans=[SampledProvenanceSpan(sequence_id="s", length=2)],
                loss_fn_input_spans=[SampledProvenanceSpan(sequence_id="s", length=3)],
            )
            with pytest.raises(
                InvalidInputError, match=r"data\[0\]\.model_input_spans cover 2 positions"
            ):
                await training.forward_backward([mistiled], "stable_reinforce")
            with pytest.raises(ValueError, match="model_input spans cover 1 positions"):
                bare.with_provenance(
                    model_input=[SampledProvenanceSpan(sequence_id="s", length=1)],
                    loss_fn_inputs=[SampledProvenanceSpan(sequence_id="s", length=3)],
                )
            int_mask = Datum(
                model_input=bare.model_input,
                loss_fn_inputs={
                    **bare.loss_fn_inputs,
                    "logprobs": [-1.0, -1.0, -1.0],
                    "sequence_ratio_mask": np.ones(3, np.int64),
                },
            )
            with pytest.raises(
                InvalidInputError, match=r"\['sequence_ratio_mask'\] has dtype int64.*float32"
            ):
                await training.forward_backward([int_mask], "gspo")
            with pytest.raises(InvalidInputError, match="record_stability_info must be a bool"):
                await training.save_weights_and_get_sampling_client(
                    record_stability_info="yes"  # type: ignore[arg-type]
                )
            assert training.statistics().next_seq_id == 1  # nothing was sent


README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_stable_reinforce_program_runs(tmp_path: Path) -> None:
    """The README's RL example runs as written (with the tiny model, so it takes seconds)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (program,) = [b for b in blocks if "stable_reinforce" in b and "trio.run(main)" in b]
    program = program.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(TINY)).replace(
        "open_local_backend(models=", f"open_local_backend(data_dir={str(tmp_path)!r}, models="
    )
    script = tmp_path / "rl.py"
    script.write_text(program)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]
    # step, mean reward (distinct tokens among 8 sampled: 1..8), the loss.
    assert all(1.0 <= float(line.split()[1]) <= 8.0 for line in lines)
    assert all(np.isfinite(float(line.split()[2])) for line in lines)
