"""Supervised LoRA fine-tune of SmolLM2-135M on a small chat dataset, with sampling before/after.

The dataset (examples/data/vellmora.jsonl) teaches facts about a made-up island, Vellmora,
that the base model cannot know. forward_backward and optim_step are pipelined: both are
submitted back to back and awaited afterwards, so the server never waits for the client.
16 steps of 8 chats: the loss per answer token falls from ~2.1 to ~0.03 and the tuned model
gives every trained answer (`--steps 24` takes it to ~0.001, with the same answers).

    .venv/bin/python examples/sl_quickstart.py              # about a minute on 2 idle CPU cores
    .venv/bin/python examples/sl_quickstart.py --quick      # the tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import trio
from _backend import TINY_MODEL, add_backend_arguments, open_example_service
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tinkex_trio import AdamParams, Datum, ModelInput, SamplingParams, Tokenizer

DATA = Path(__file__).parent / "data" / "vellmora.jsonl"
EVAL_QUESTIONS = [
    "What is the capital of Vellmora?",
    "What currency does Vellmora use?",
    "What is the national dish of Vellmora?",
    "Which river flows through Vellmora's capital?",  # not in the data: watch it improvise
]


def load_conversations() -> list[list[dict[str, str]]]:
    with DATA.open() as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def prompt_tokens(tokenizer: Tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    return tokenizer.encode(text)


def make_datum(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[Datum, int]:
    """The chat as one sequence; the loss is weighted on the answer (and its end token) only."""
    prompt = prompt_tokens(tokenizer, messages[0]["content"])
    answer = tokenizer.encode(messages[1]["content"] + "<|im_end|>")
    full = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    datum = Datum(
        model_input=ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": weights},
    )
    return datum, len(answer)


async def answers(
    sampler, tokenizer: Tokenizer, questions: list[str], max_tokens: int
) -> list[str]:
    """Greedy answers to every question, sampled concurrently from one nursery."""
    out = [""] * len(questions)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(i: int) -> None:
        result = await sampler.sample(
            ModelInput.from_ints(prompt_tokens(tokenizer, questions[i])), 1, params
        )
        out[i] = tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True).strip()

    async with trio.open_nursery() as nursery:
        for i in range(len(questions)):
            nursery.start_soon(one, i)
    return out


async def main(args: argparse.Namespace) -> None:
    console = Console()
    started = time.perf_counter()
    conversations = load_conversations()
    async with open_example_service(args.model, args.data_dir) as service:
        training = await service.create_lora_training_client(args.model, rank=args.rank, seed=0)
        tokenizer = training.get_tokenizer()
        examples = [make_datum(tokenizer, c) for c in conversations]
        base = await service.create_sampling_client(base_model=args.model)
        before = await answers(base, tokenizer, EVAL_QUESTIONS, args.max_tokens)

        rng = random.Random(0)
        losses: list[float] = []
        with Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss/token {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("train", total=args.steps, loss="-")
            for _ in range(args.steps):
                batch = rng.sample(examples, min(args.batch_size, len(examples)))
                # Pipelining: queue both requests, then wait for both.
                fb = await training.forward_backward([d for d, _ in batch], "cross_entropy")
                step = await training.optim_step(AdamParams(learning_rate=args.lr))
                output = await fb
                await step
                loss = output.metrics["loss:sum"] / sum(n for _, n in batch)
                losses.append(loss)
                progress.update(task, advance=1, loss=f"{loss:.4f}")

        tuned = await training.save_weights_and_get_sampling_client()
        after = await answers(tuned, tokenizer, EVAL_QUESTIONS, args.max_tokens)

    table = Table(title="Answers before and after fine-tuning")
    table.add_column("question")
    table.add_column("base model")
    table.add_column("fine-tuned")
    for question, b, a in zip(EVAL_QUESTIONS, before, after, strict=True):
        table.add_row(question, b, a)
    console.print(table)
    curve = " ".join(f"{x:.3f}" for x in losses)
    print(f"loss curve (per answer token): {curve}")
    print(f"first loss {losses[0]:.4f} -> last loss {losses[-1]:.4f}")
    print(f"done in {time.perf_counter() - started:.1f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_backend_arguments(parser)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, 6 steps (for tests)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.max_tokens = TINY_MODEL, 6, 8
    return args


if __name__ == "__main__":
    trio.run(main, parse_args())
