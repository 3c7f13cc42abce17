"""A training + sampling job written against the official `tinker` SDK (0.15 or 0.38).

Run by the conformance tests with the python of a virtual environment that has `tinker`
installed (never our own venv): `python official_client.py BASE_URL API_KEY MODEL`. Prints one
JSON object with the values the test checks; everything else goes to stderr.

The same job is mirrored by `ours_job.py` through tinkex_trio, for the parity check; keep
the two in step (data, seeds, learning rate, order of calls).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import tinker
from tinker import types

STEPS = 4
LEARNING_RATE = 0.05
SAMPLE_SEED = 1234
PROMPT = [1, 17, 23, 42, 5]


def make_data() -> list[Any]:
    """Five short datums (chunked 2 per request when the server's flag says so)."""
    out = []
    for k in range(5):
        tokens = [(7 * k + 3 * i) % 97 + 1 for i in range(6 + k)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "weights": [1.0] * (len(tokens) - 1),
                },
            )
        )
    return out


def ready(obj: Any) -> Any:
    """0.38 returns futures from client-creation methods (0.15 returns clients)."""
    return obj.result() if callable(getattr(type(obj), "result", None)) else obj


def logprobs_of(output: Any) -> list[list[float]]:
    return [list(o["logprobs"].tolist()) for o in output.loss_fn_outputs]


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    version = tinker.__version__ if hasattr(tinker, "__version__") else "unknown"
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = ready(service.create_lora_training_client(base_model=model, rank=8, seed=0))
    data = make_data()

    losses = []
    for _ in range(STEPS):
        fb = training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)).result()
        losses.append(fb.metrics["loss:sum"])
    forward = training.forward(data, "cross_entropy").result()

    saved = training.save_state("conformance").result()
    resumed = ready(service.create_training_client_from_state_with_optimizer(saved.path))
    resumed_forward = resumed.forward(data, "cross_entropy").result()

    sampler = ready(training.save_weights_and_get_sampling_client(name="conformance-sampler"))
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=6, seed=SAMPLE_SEED, temperature=1.0, stop=[])
    first = sampler.sample(
        prompt, num_samples=2, sampling_params=params, include_prompt_logprobs=True
    ).result()
    second = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    full = [*data[0].model_input.to_ints(), data[0].loss_fn_inputs["target_tokens"].tolist()[-1]]
    computed = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()

    rest = service.create_rest_client()
    runs = rest.list_training_runs().result()
    checkpoints = rest.list_checkpoints(training.model_id).result()
    if hasattr(service, "close"):  # 0.15 has no close (PROTOCOL.md A.6.1)
        service.close("success")

    print(
        json.dumps(
            {
                "version": version,
                "losses": losses,
                "forward": logprobs_of(forward),
                "resumed_forward": logprobs_of(resumed_forward),
                "saved_path": saved.path,
                "sample_tokens": [list(s.tokens) for s in first.sequences],
                "sample_tokens_again": [list(s.tokens) for s in second.sequences],
                "sample_stop_reasons": [str(s.stop_reason) for s in first.sequences],
                "prompt_logprobs": first.prompt_logprobs,
                "computed_logprobs": computed,
                "run_ids": [r.training_run_id for r in runs.training_runs],
                "checkpoint_ids": [c.checkpoint_id for c in checkpoints.checkpoints],
                "model_id": training.model_id,
            }
        )
    )


if __name__ == "__main__":
    main()
