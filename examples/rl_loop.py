"""A small RL loop on a task with a checkable answer: single-digit addition.

Each iteration:

1. fan out `--num-samples` completions for each of `--prompts` prompts ("3+4=") from one
   nursery, all concurrently, with the current policy's sampling client;
2. score each completion (reward 1 if it starts with the right sum, else 0);
3. compute group-relative advantages: reward minus the mean reward of its prompt's group
   (a group where every sample scored the same teaches nothing and is skipped);
4. build one `Datum` per completion for the `importance_sampling` loss: `target_tokens`, the
   sampler's `logprobs` and the `advantages`, all zero on the prompt positions;
5. train: `forward_backward` and `optim_step` are submitted back to back (pipelined) and
   awaited together, then `save_weights_and_get_sampling_client()` gives the next policy.

It prints the mean reward per iteration.

Runs against the local backend (`tinkex_trio.local`) unless both TINKER_API_KEY and
TINKER_BASE_URL are set, in which case it uses that service. Usage::

    python examples/rl_loop.py                       # SmolLM2-135M-Instruct, local backend
    python examples/rl_loop.py --iterations 2 --prompts 2 --num-samples 4 \\
        --model tinkex-trio/SmolLM2-tiny-random      # seconds, for tests
"""

from __future__ import annotations

import argparse
import random
import time

import trio
from _backend import add_backend_arguments, open_example_service

import tinkex_trio
from tinkex_trio import types

FEW_SHOT = "1+2=3\n4+4=8\n2+7=9\n5+3=8\n"


def make_problems(rng: random.Random, count: int) -> list[tuple[str, int]]:
    """`count` problems "a+b=" with their answers (sums of single digits)."""
    problems = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        problems.append((f"{a}+{b}=", a + b))
    return problems


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.split("\n", 1)[0].strip() if stripped else ""


def is_correct(text: str, answer: int) -> bool:
    return first_line(text) == str(answer)


def reward(text: str, answer: int) -> float:
    """1 for the right sum, else 0; minus 0.01 per extra character (at most 0.5).

    The small brevity term shapes an untrained model toward short answers (and gives a
    signal even before any answer is right); it is 0 for a correct answer.
    """
    line = first_line(text)
    extra = max(0, len(line) - len(str(answer)))
    return (1.0 if line == str(answer) else 0.0) - min(0.01 * extra, 0.5)


def make_datum(
    prompt_tokens: list[int], sequence: types.SampledSequence, advantage: float
) -> types.Datum:
    """One importance-sampling example: the loss sees only the completion's tokens."""
    tokens = prompt_tokens + list(sequence.tokens)
    n_prompt = len(prompt_tokens)
    if sequence.logprobs is None:
        raise RuntimeError("the sampler returned no logprobs; importance sampling needs them")
    # Inputs are tokens[:-1], targets tokens[1:]; target i is token i+1, which belongs to the
    # completion when i+1 >= n_prompt.
    targets = tokens[1:]
    n_completion = len(sequence.tokens)
    zeros = [0.0] * (n_prompt - 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_list(targets, "int64"),
            "logprobs": types.TensorData.from_list(zeros + list(sequence.logprobs), "float32"),
            "advantages": types.TensorData.from_list(zeros + [advantage] * n_completion, "float32"),
        },
    )


async def sample_all(
    policy: tinkex_trio.SamplingClient,
    prompts: list[list[int]],
    num_samples: int,
    params: types.SamplingParams,
) -> list[types.SampleResponse]:
    """Sample every prompt's group concurrently; the nursery waits for all of them."""
    results: list[types.SampleResponse | None] = [None] * len(prompts)

    async def sample_group(index: int) -> None:
        results[index] = await policy.sample(
            types.ModelInput.from_ints(prompts[index]),
            num_samples=num_samples,
            sampling_params=params,
        )

    async with trio.open_nursery() as nursery:
        for index in range(len(prompts)):
            nursery.start_soon(sample_group, index)
    return [r for r in results if r is not None]


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    started = time.monotonic()
    async with open_example_service(args.model, args.data_dir) as service:
        training = await service.create_lora_training_client(args.model, rank=args.rank)
        tokenizer = training.get_tokenizer()
        policy = await training.save_weights_and_get_sampling_client()
        params = types.SamplingParams(max_tokens=4, temperature=1.0, stop=["\n"])
        adam = types.AdamParams(learning_rate=args.learning_rate)
        print(
            f"model {args.model}: {args.iterations} iterations x {args.prompts} prompts x "
            f"{args.num_samples} samples, loss importance_sampling"
        )

        for iteration in range(1, args.iterations + 1):
            problems = make_problems(rng, args.prompts)
            prompts = [tokenizer.encode(FEW_SHOT + question) for question, _ in problems]
            responses = await sample_all(policy, prompts, args.num_samples, params)

            data: list[types.Datum] = []
            rewards: list[float] = []
            correct = 0
            for (_, answer), prompt_tokens, response in zip(
                problems, prompts, responses, strict=True
            ):
                texts = [
                    tokenizer.decode(s.tokens, skip_special_tokens=True) for s in response.sequences
                ]
                group = [reward(text, answer) for text in texts]
                correct += sum(is_correct(text, answer) for text in texts)
                rewards += group
                mean = sum(group) / len(group)
                if all(r == mean for r in group):
                    continue  # no preference within the group: zero advantage everywhere
                for sequence, r in zip(response.sequences, group, strict=True):
                    if sequence.tokens:
                        data.append(make_datum(prompt_tokens, sequence, r - mean))

            mean_reward = sum(rewards) / len(rewards)
            if data:
                # Pipelined: optim_step is queued right behind forward_backward.
                fb = await training.forward_backward(data, "importance_sampling")
                step = await training.optim_step(adam)
                output, _ = await fb, await step
                loss = output.metrics.get("loss:sum", float("nan"))
                trained = f"trained on {len(data)} samples, loss:sum {loss:.4g}"
            else:
                trained = "no group had differing rewards; skipped training"
            print(
                f"iteration {iteration}: mean reward {mean_reward:.3f} "
                f"({correct}/{len(rewards)} correct); {trained}",
                flush=True,
            )
            policy = await training.save_weights_and_get_sampling_client()

    print(f"done in {time.monotonic() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_backend_arguments(parser)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=8, help="problems per iteration")
    parser.add_argument("--num-samples", type=int, default=8, help="samples per problem")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 iterations x 2 prompts x 4 samples")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.prompts, args.num_samples = 2, 2, 4
    trio.run(run, args)


if __name__ == "__main__":
    main()
