"""RL losses through the official `tinker` SDK (0.38): `gspo` and `stable_reinforce` on real
sampled sequences, stable_reinforce with provenance from a `record_stability_info` sampler.

Run by the conformance tests with the python of the official SDK's venv:
`python official_rl_client.py BASE_URL API_KEY MODEL`. Prints one JSON object with what the
test checks (sampled tokens and log-probs, the datums' inputs, the learner log-probs and
losses, and the server's answer to a span naming an unknown sequence); the rest goes to stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import tinker
from tinker import types

PROMPT = [1, 17, 23, 42, 5]
GSPO_CONFIG = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
STABLE_CONFIG = {"kl_coeff": 0.1, "ratio_clip": 1.5}


def ready(obj: Any) -> Any:
    """0.38 returns (back-compatible) futures from client-creation methods."""
    return obj.result() if callable(getattr(type(obj), "result", None)) else obj


def build(sequence: Any, advantage: float) -> tuple[list[int], list[int], list[float]]:
    full = PROMPT + list(sequence.tokens)
    advantages = [0.0] * (len(PROMPT) - 1) + [advantage] * len(sequence.tokens)
    return full[:-1], full[1:], advantages


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = ready(service.create_lora_training_client(base_model=model, rank=8, seed=0))
    sampler = ready(
        training.save_weights_and_get_sampling_client(name="rl", record_stability_info=True)
    )
    params = types.SamplingParams(max_tokens=5, seed=7, temperature=1.0, stop=[])
    sampled = sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=4, sampling_params=params
    ).result()
    sequences = list(sampled.sequences)
    advantages = [1.0, -1.0, 0.5, -0.5]

    stable_data, gspo_data, inputs = [], [], []
    for sequence, advantage in zip(sequences, advantages, strict=True):
        tokens, targets, adv = build(sequence, advantage)
        sid = sequence.sequence_id
        n_sampled = len(sequence.tokens)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens),
            loss_fn_inputs={"target_tokens": targets, "advantages": adv},
        )
        stable_data.append(
            datum.with_provenance(
                model_input=[
                    types.PromptProvenanceSpan(sequence_id=sid, length=len(PROMPT)),
                    types.SampledProvenanceSpan(sequence_id=sid, length=n_sampled - 1),
                ],
                loss_fn_inputs=[
                    types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(PROMPT) - 1),
                    types.SampledProvenanceSpan(sequence_id=sid, length=n_sampled),
                ],
            )
        )
        logprobs = [0.0] * (len(PROMPT) - 1) + list(sequence.logprobs)
        mask = [0.0] * (len(PROMPT) - 1) + [1.0] * n_sampled
        gspo_data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens),
                loss_fn_inputs={
                    "target_tokens": targets,
                    "advantages": adv,
                    "logprobs": logprobs,
                    "sequence_ratio_mask": mask,
                },
            )
        )
        inputs.append({"advantages": adv, "logprobs": logprobs, "mask": mask})

    # Move the learner away from the sampler first (one supervised step on the samples), so
    # the importance ratios differ from 1 and the truncation and the KL term take part.
    supervised = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]},
        )
        for d in stable_data[:2]
    ]
    training.forward_backward(supervised, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=0.05)).result()

    stable = training.forward_backward(stable_data, "stable_reinforce", STABLE_CONFIG).result()
    gspo = training.forward_backward(gspo_data, "gspo", GSPO_CONFIG).result()
    training.optim_step(types.AdamParams(learning_rate=0.02)).result()

    bad = stable_data[0].with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id="no-such-sequence", length=len(PROMPT)),
            types.SampledProvenanceSpan(
                sequence_id=sequences[0].sequence_id, length=len(sequences[0].tokens) - 1
            ),
        ],
        loss_fn_inputs=stable_data[0].loss_fn_input_spans,
    )
    try:
        training.forward_backward([bad], "stable_reinforce").result()
        refusal: dict[str, Any] = {"raised": None}
    except Exception as exc:  # the SDK's error type for a 400 (BadRequestError)
        refusal = {"raised": type(exc).__name__, "message": str(exc)}
    service.close("success")

    print(
        json.dumps(
            {
                "version": tinker.__version__,
                "sequence_ids": [s.sequence_id for s in sequences],
                "sampled_tokens": [list(s.tokens) for s in sequences],
                "sampled_logprobs": [list(s.logprobs) for s in sequences],
                "inputs": inputs,
                "stable_loss": stable.metrics["loss:sum"],
                "stable_logprobs": [o["logprobs"].tolist() for o in stable.loss_fn_outputs],
                "gspo_loss": gspo.metrics["loss:sum"],
                "gspo_logprobs": [o["logprobs"].tolist() for o in gspo.loss_fn_outputs],
                "refusal": refusal,
            }
        )
    )


if __name__ == "__main__":
    main()
