"""`serve --model [NAME=]PATH`: naming, the hub-cache lookup, `--dtype`, the memory bound.

The served name follows NAME=, then --model-name, then the hub repository id, then the
config's `_name_or_path`; get_server_capabilities, get_info and the tokenizer all follow it.
Start-up refusals (not found, no name, two models under one name, too little memory) are one
line and exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hf_dirs import family_config, family_tensors, write_family_dir, write_model_dir

from tinkex_trio import Config, open_service, types as t
from tinkex_trio.local._engine_api import ModelDirectoryError, ModelMemoryError
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.engine._models import ModelSource
from tinkex_trio.local.hf_cache import write_hf_cache
from tinkex_trio.local.model_files import TINY_NAME
from tinkex_trio.local.model_locator import (
    LocatedModel,
    ModelArgument,
    locate_model,
    locate_models,
)

NAMED = "acme/qwen3-tiny"
SERVE = [sys.executable, "-m", "tinkex_trio.cli", "serve", "--port", "0"]


def _named_dir(directory: Path, name: str | None = NAMED) -> Path:
    config = family_config("qwen3", tied=False)
    if name is not None:
        config["_name_or_path"] = name
    return write_model_dir(directory, config, family_tensors(config))


def _fake_hub(root: Path, repo_id: str, source: Path) -> Path:
    """A hub cache holding `source`'s files as `repo_id` at refs/main (as a download leaves)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return snapshot


def test_model_argument_forms() -> None:
    assert ModelArgument.parse("org/name=/models/x") == ModelArgument("org/name", "/models/x")
    assert ModelArgument.parse("/models/x") == ModelArgument(None, "/models/x")
    assert ModelArgument.parse("Qwen/Qwen3-0.6B") == ModelArgument(None, "Qwen/Qwen3-0.6B")
    for bad, named in [("=/x", "empty NAME"), ("n=", "empty PATH"), ("a b=/x", "whitespace")]:
        with pytest.raises(ValueError, match=named):
            ModelArgument.parse(bad)


def test_served_name_precedence(tmp_path: Path) -> None:
    directory = _named_dir(tmp_path / "m")
    assert locate_model(ModelArgument(None, str(directory))).name == NAMED
    assert locate_model(ModelArgument(None, str(directory)), "me/renamed").name == "me/renamed"
    assert locate_model(ModelArgument("x/y", str(directory)), "me/renamed").name == "x/y"
    # A path in _name_or_path (a fine-tune saved from a local path) names nothing.
    unnamed = _named_dir(tmp_path / "u", name="/fsx/checkpoints/step-100")
    with pytest.raises(ModelDirectoryError, match="--model NAME=PATH or --model-name") as info:
        locate_model(ModelArgument(None, str(unnamed)))
    assert str(unnamed / "config.json") in str(info.value)


def test_hub_cache_lookup_is_offline_and_names_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    snapshot = _fake_hub(hub, "Qwen/Qwen3-tiny", _named_dir(tmp_path / "src", name=None))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    found = locate_model(ModelArgument(None, "Qwen/Qwen3-tiny"))
    assert found == LocatedModel("Qwen/Qwen3-tiny", snapshot)
    engine = TorchEngine(models=[], extra_models={found.name: found.directory}, threads=1)
    assert [m.name for m in engine.models()] == ["Qwen/Qwen3-tiny"]
    with pytest.raises(ModelDirectoryError) as info:
        locate_model(ModelArgument(None, "Qwen/Qwen3-absent"))
    message = str(info.value)
    assert "not in the Hugging Face hub cache" in message and str(hub) in message
    assert "nothing is downloaded" in message and "\n" not in message


def test_two_models_need_two_names(tmp_path: Path) -> None:
    a, b = _named_dir(tmp_path / "a"), _named_dir(tmp_path / "b")
    with pytest.raises(ModelDirectoryError, match="give each model its own name"):
        locate_models([ModelArgument(None, str(a)), ModelArgument(None, str(b))])
    with pytest.raises(ValueError, match="--model-name names the one --model given"):
        locate_models([ModelArgument(None, str(a)), ModelArgument(None, str(b))], "x/y")
    both = locate_models([ModelArgument(None, str(a)), ModelArgument("me/b", str(b))])
    assert [m.name for m in both] == [NAMED, "me/b"]


def test_memory_bound_counts_every_model_at_the_serving_dtype(tmp_path: Path) -> None:
    directory = write_family_dir(tmp_path / "m", "llama", tied=False)
    f32 = ModelSource("u/m", directory).weight_bytes() + ModelSource(TINY_NAME).weight_bytes()
    models = {"models": [TINY_NAME], "extra_models": {"u/m": directory}, "threads": 1}
    TorchEngine(**models, max_model_memory=f32)  # type: ignore[arg-type]
    with pytest.raises(ModelMemoryError) as info:
        TorchEngine(**models, max_model_memory=f32 - 1)  # type: ignore[arg-type]
    assert "--dtype bfloat16" in str(info.value) and "\n" not in str(info.value)
    TorchEngine(**models, dtype="bfloat16", max_model_memory=f32 // 2)  # type: ignore[arg-type]
    with pytest.raises(ModelMemoryError):
        TorchEngine(**models, dtype="bfloat16", max_model_memory=f32 // 2 - 1)  # type: ignore[arg-type]


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVE, "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_serve_refuses_what_does_not_fit_in_one_line(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--max-model-memory", "100M")
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    # SmolLM2 (513.3 MiB of float32 weights) plus the tiny model (12.1 MiB).
    assert "the weights of 2 model(s) need 525.4 MiB as float32" in line
    assert "allows 100.0 MiB" in line and "--dtype bfloat16" in line
    assert "listening" not in result.stdout


def test_serve_refuses_an_unnamed_model_in_one_line(tmp_path: Path) -> None:
    unnamed = _named_dir(tmp_path / "u", name=None)
    result = _serve(tmp_path, "--model", str(unnamed))
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert str(unnamed / "config.json") in line and "--model-name" in line


async def test_serve_a_directory_under_its_config_name_in_bfloat16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command: `serve --model DIR --dtype bfloat16`; the SDK sees the config's name
    in get_server_capabilities and get_info, and loads its tokenizer by that name from the
    hub cache that hf-cache wrote."""
    directory = _named_dir(tmp_path / "m")
    write_hf_cache([LocatedModel(NAMED, directory)], hf_home=tmp_path / "hf", builtins=())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    command = [*SERVE, "--data-dir", str(tmp_path / "data"), "--model", str(directory)]
    command += ["--dtype", "bfloat16", "--api-key", "tml-serve-test"]
    env = {**os.environ, "TINKEX_TRIO_TORCH_THREADS": "1"}
    with trio.fail_after(120):
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        try:
            assert process.stdout is not None
            output = b""
            while b"listening on " not in output or not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, output.decode()
                output += chunk
            url = output.decode().split("listening on ", 1)[1].split()[0]
            config = Config(api_key="tml-serve-test", base_url=url, telemetry=False)
            async with open_service(config) as service:
                capabilities = await service.get_server_capabilities()
                names = [m.model_name for m in capabilities.supported_models]
                assert NAMED in names
                training = await service.create_lora_training_client(NAMED, rank=4)
                info = training.get_info()
                assert info.model_data.model_name == NAMED
                assert info.model_data.tokenizer_id == NAMED
                assert info.model_data.arch == "qwen3"
                tokenizer = training.get_tokenizer()
                assert tokenizer.encode("Hello, world!") == [19556, 28, 905, 17]
                assert tokenizer.source is not None and str(tmp_path / "hf") in str(
                    tokenizer.source
                )
                sampler = await service.create_sampling_client(base_model=NAMED)
                logprobs = await sampler.compute_logprobs(t.ModelInput.from_ints([1, 2, 3, 4]))
                assert logprobs[0] is None and all(isinstance(x, float) for x in logprobs[1:])
        finally:
            process.terminate()
            await process.wait()
    assert json.loads((directory / "config.json").read_text())["_name_or_path"] == NAMED
