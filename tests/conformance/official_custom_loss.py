"""A custom loss run by the official `tinker` 0.38 SDK (`create_custom_loss` +
`forward_backward_custom`), against whatever `custom_loss_server_side` the server announces.

`python official_custom_loss.py BASE_URL API_KEY MODEL`, with the python of the official venv.
The SDK needs torch for custom losses and its venv has none: `OURS_SITE_PACKAGES` (our venv's
site-packages) is APPENDED to sys.path, so torch comes from there while every package the
official venv has (the SDK and its own dependencies) still wins. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.append(os.environ["OURS_SITE_PACKAGES"])

import tinker
import torch
from tinker import types

LEARNING_RATE = 0.05


def ppo_like(logprobs: Any, sampler_logprobs: Any, advantages: Any) -> Any:
    ratio = torch.exp(logprobs - sampler_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    clip_fraction = (ratio != clipped).float().mean()
    return loss, {"custom/ppo_like:sum": loss, "custom/clip_fraction:mean": clip_fraction}


def make_data() -> list[Any]:
    """Three datums (two chunks with the server's chunk length of 2)."""
    out = []
    for k in range(3):
        tokens = [(11 * k + 5 * i) % 97 + 1 for i in range(5 + k)]
        n = len(tokens) - 1
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    # Far enough from the learner's logprobs that some ratios are clipped.
                    # A key the SDK has no dtype for: given as TensorData.
                    "sampler_logprobs": types.TensorData(
                        data=[-11.0 + 0.4 * ((i + k) % 3) for i in range(n)],
                        dtype="float32",
                        shape=[n],
                    ),
                    "advantages": [1.0 if (i + k) % 2 else -0.5 for i in range(n)],
                },
            )
        )
    return out


def logprobs_of(output: Any) -> list[list[float]]:
    return [list(o["logprobs"].tolist()) for o in output.loss_fn_outputs]


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=model, rank=8, seed=0).result()
    ranks = {"logprobs": 1, "sampler_logprobs": 1, "advantages": 1}
    handle = service.create_custom_loss(ppo_like, input_ranks=ranks).result()
    data = make_data()
    result = training.forward_backward_custom(data, handle).result()
    training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)).result()
    after = training.forward(data, "cross_entropy").result()
    print(
        json.dumps(
            {
                "loss_id": handle.loss_id,
                "metrics": result.metrics,
                "logprobs": logprobs_of(result),
                "after": logprobs_of(after),
            }
        )
    )
    service.close("success")


if __name__ == "__main__":
    main()
