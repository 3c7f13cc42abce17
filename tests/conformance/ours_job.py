"""`official_client.py`'s job, step for step, through tinkex_trio (for the parity check)."""

from __future__ import annotations

from typing import Any

from tinkex_trio import Config, open_service, types as t
from tinkex_trio.rest import RestClient

# Same constants and data as official_client.py (PROTOCOL's "behavioral parity": same script).
STEPS = 4
LEARNING_RATE = 0.05
SAMPLE_SEED = 1234
PROMPT = [1, 17, 23, 42, 5]


def make_data() -> list[t.Datum]:
    out = []
    for k in range(5):
        tokens = [(7 * k + 3 * i) % 97 + 1 for i in range(6 + k)]
        out.append(
            t.Datum(
                model_input=t.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "weights": [1.0] * (len(tokens) - 1),
                },
            )
        )
    return out


def _logprobs(output: t.ForwardBackwardOutput) -> list[list[float]]:
    return [[float(x) for x in o["logprobs"].data] for o in output.loss_fn_outputs]


async def run_job(base_url: str, api_key: str, model: str, **config: Any) -> dict[str, Any]:
    cfg = Config(api_key=api_key, base_url=base_url, telemetry=False, **config)
    async with open_service(cfg) as service:
        training = await service.create_lora_training_client(model, rank=8, seed=0)
        data = make_data()
        losses = []
        for _ in range(STEPS):
            fb = await training.forward_backward(data, "cross_entropy")
            step = await training.optim_step(t.AdamParams(learning_rate=LEARNING_RATE))
            losses.append((await fb).metrics["loss:sum"])
            await step
        forward = await (await training.forward(data, "cross_entropy"))
        saved = await (await training.save_state("conformance"))
        resumed = await service.create_training_client_from_state_with_optimizer(saved.path)
        resumed_forward = await (await resumed.forward(data, "cross_entropy"))
        sampler = await training.save_weights_and_get_sampling_client()
        prompt = t.ModelInput.from_ints(PROMPT)
        params = t.SamplingParams(max_tokens=6, seed=SAMPLE_SEED, temperature=1.0, stop=[])
        first = await sampler.sample(prompt, 2, params, include_prompt_logprobs=True)
        second = await sampler.sample(prompt, 2, params)
        full = [
            *data[0].model_input.to_ints(),
            int(data[0].loss_fn_inputs["target_tokens"].data[-1]),
        ]
        computed = await sampler.compute_logprobs(t.ModelInput.from_ints(full))
        rest: RestClient = service.create_rest_client()
        runs = await rest.list_training_runs()
        checkpoints = await rest.list_checkpoints(training.model_id)
    return {
        "losses": losses,
        "forward": _logprobs(forward),
        "resumed_forward": _logprobs(resumed_forward),
        "saved_path": saved.path,
        "sample_tokens": [list(s.tokens) for s in first.sequences],
        "sample_tokens_again": [list(s.tokens) for s in second.sequences],
        "sample_stop_reasons": [s.stop_reason for s in first.sequences],
        "prompt_logprobs": first.prompt_logprobs,
        "computed_logprobs": computed,
        "run_ids": [r.training_run_id for r in runs.training_runs],
        "checkpoint_ids": [c.checkpoint_id for c in checkpoints.checkpoints],
        "model_id": training.model_id,
    }
