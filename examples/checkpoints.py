"""Checkpoints end to end: save, list, publish, download with a progress bar, resume.

1. Train a LoRA adapter for `--steps` steps (pipelined `forward_backward` + `optim_step`).
2. `save_state` the weights and the optimizer state as `tinker://<run>/weights/<name>`.
3. List the run's checkpoints with the `RestClient`, then publish the new one.
4. Download and extract its archive with a rich progress bar.
5. Resume in a new training run with `create_training_client_from_state_with_optimizer`
   (weights and Adam moments restored) and train one more step.

Runs against the local backend (`tinkex_trio.local`) unless both TINKER_API_KEY and
TINKER_BASE_URL are set, in which case it uses that service. Usage::

    python examples/checkpoints.py                   # SmolLM2-135M-Instruct, local backend
    python examples/checkpoints.py --steps 1 --model tinkex-trio/SmolLM2-tiny-random
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import trio
from _backend import add_backend_arguments, open_example_service
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

import tinkex_trio
from tinkex_trio import types

TEXTS = [
    "The capital of France is Paris.",
    "Two plus two is four.",
    "Water boils at one hundred degrees Celsius.",
    "The quick brown fox jumps over the lazy dog.",
]


def make_data(tokenizer: tinkex_trio.Tokenizer) -> list[types.Datum]:
    """Next-token prediction on a few sentences (cross-entropy, every position weighted 1)."""
    data = []
    for text in TEXTS:
        tokens = tokenizer.encode(text)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_list(tokens[1:], "int64"),
                    "weights": types.TensorData.from_list([1.0] * (len(tokens) - 1), "float32"),
                },
            )
        )
    return data


async def train_step(
    training: tinkex_trio.TrainingClient, data: list[types.Datum], adam: types.AdamParams
) -> float:
    """One pipelined step: optim_step is queued right behind forward_backward."""
    fb = await training.forward_backward(data, "cross_entropy")
    step = await training.optim_step(adam)
    output = await fb
    await step
    tokens = sum(d.model_input.length for d in data)
    return output.metrics["loss:sum"] / tokens


async def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    adam = types.AdamParams(learning_rate=args.learning_rate)
    async with open_example_service(args.model, args.data_dir) as service:
        rest = service.create_rest_client()

        # 1. train
        training = await service.create_lora_training_client(args.model, rank=args.rank)
        data = make_data(training.get_tokenizer())
        print(f"training run {training.model_id} on {args.model}")
        for step in range(1, args.steps + 1):
            loss = await train_step(training, data, adam)
            print(f"step {step}: loss per token {loss:.4f}")

        # 2. save weights + optimizer state
        name = f"step-{args.steps}"
        saved = await (await training.save_state(name))
        print(f"saved state: {saved.path}")

        # 3. list and publish
        listed = await rest.list_checkpoints(training.model_id)
        print(f"checkpoints of {training.model_id}: {len(listed.checkpoints)}")
        for checkpoint in listed.checkpoints:
            size = "?" if checkpoint.size_bytes is None else f"{checkpoint.size_bytes} bytes"
            print(f"  {checkpoint.tinker_path}  {checkpoint.checkpoint_type}  {size}")
        await rest.publish_checkpoint_from_tinker_path(saved.path)
        listed = await rest.list_checkpoints(training.model_id)
        public = [c.tinker_path for c in listed.checkpoints if c.public]
        print(f"published: {saved.path} (public now: {saved.path in public})")

        # 4. download with a progress bar
        with Progress(
            TextColumn("downloading"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        ) as progress:
            task = progress.add_task("download", total=None)
            target = await tinkex_trio.download(
                rest,
                saved.path,
                output_dir=args.output_dir,
                force=True,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        files = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
        total_bytes = sum((target / f).stat().st_size for f in files)
        print(f"downloaded to {target}: {len(files)} files, {total_bytes} bytes")
        for file in files:
            print(f"  {file}")

        # 5. resume with the optimizer state and train one more step
        resumed = await service.create_training_client_from_state_with_optimizer(saved.path)
        print(f"resumed {saved.path} as training run {resumed.model_id} (with optimizer state)")
        loss = await train_step(resumed, data, adam)
        print(f"resumed step {args.steps + 1}: loss per token {loss:.4f}")
    print(f"done in {time.monotonic() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_backend_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="training steps before saving")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="same as --steps 1")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to extract the download (default: <data-dir>/downloads)",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps = 1
    if args.output_dir is None:
        args.output_dir = args.data_dir / "downloads"
    trio.run(run, args)


if __name__ == "__main__":
    main()
