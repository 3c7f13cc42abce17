"""`tinkex-trio hf-cache`: transformers and peft find the served models offline, unchanged.

- The command writes a hub-cache entry for SmolLM2 (from the GGUF conversion), the tiny model
  and a user's Qwen3 directory; with `HF_HOME` and `HF_HUB_OFFLINE=1` (a subprocess, since
  huggingface_hub reads them at import) `AutoTokenizer.from_pretrained(name)` gives our
  tokenizer's ids and chat-template text, and `AutoModelForCausalLM.from_pretrained(name)`
  our engine's logits (1e-4).
- SmolLM2 read back from its hub-cache directory gives the logits of the GGUF package.
- Tied models are written untied, so a LoRA adapter trained with `train_unembed` against the
  real HTTP server, downloaded, and merged with `peft`'s `merge_and_unload()` into the
  hub-cache base gives the logits the backend samples from (issue 10, item 5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trio

pytest.importorskip("transformers")
pytest.importorskip("peft")

import peft
import transformers
from hf_dirs import write_family_dir

from tinkex_trio import Config, download, get_tokenizer, open_service, types as t
from tinkex_trio.local import open_local_backend
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.engine._llama import TINY_CONFIG, Llama, tiny_weights
from tinkex_trio.local.engine._lora import LoraAdapter
from tinkex_trio.local.engine._models import ModelSource
from tinkex_trio.local.hf_cache import MARKER_FILE, write_hf_cache
from tinkex_trio.local.model_files import SMOLLM2_NAME, TINY_NAME
from tinkex_trio.local.model_locator import LocatedModel

TOLERANCE = 1e-4
QWEN3 = "tinkex-test/Qwen3-tiny-tied"
PROBE = Path(__file__).with_name("hf_offline_probe.py")
TOKENS = [[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 19556, 28, 905, 17]]
GOLDEN = [
    "Hello, world!",
    "The year 2024 had 365 days.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "  indented\tcode  \n\n",
]


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`tinkex-trio hf-cache` run once: the HF_HOME, the user directory, the command output."""
    root = tmp_path_factory.mktemp("hf-cache")
    qwen3_dir = write_family_dir(root / "qwen3", "qwen3", tied=True)
    hf_home = root / "hf-home"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinkex_trio.cli",
            "hf-cache",
            "--hf-home",
            str(hf_home),
            "--model",
            f"{QWEN3}={qwen3_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return {"hf_home": hf_home, "qwen3_dir": qwen3_dir, "stdout": done.stdout}


def _snapshot(hf_home: Path, name: str) -> Path:
    repo = hf_home / "hub" / ("models--" + name.replace("/", "--"))
    revision = (repo / "refs" / "main").read_text().strip()
    assert len(revision) == 40 and (repo / MARKER_FILE).is_file()
    return repo / "snapshots" / revision


def _engine_logits(source: ModelSource) -> torch.Tensor:
    model = source.load().model
    with torch.inference_mode():
        return model.logits(model.hidden_states(torch.tensor(TOKENS)))


def test_command_writes_every_served_model(cached: dict[str, Any]) -> None:
    for name in (SMOLLM2_NAME, TINY_NAME, QWEN3):
        assert f"{name}: written" in cached["stdout"]
        snapshot = _snapshot(cached["hf_home"], name)
        config = json.loads((snapshot / "config.json").read_text())
        assert config["tie_word_embeddings"] is False
        assert config["_name_or_path"] == name
        for file in ("tokenizer.json", "tokenizer_config.json"):
            assert (snapshot / file).is_file()
    assert f"export HF_HOME={cached['hf_home']}" in cached["stdout"]
    # SmolLM2's weights are linked, not copied; only the untied lm_head is a new file.
    smollm2 = _snapshot(cached["hf_home"], SMOLLM2_NAME)
    index = json.loads((smollm2 / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))
    assert (smollm2 / first).is_symlink() and not (smollm2 / second).is_symlink()
    assert index["weight_map"]["lm_head.weight"] == second


@pytest.mark.real_model
def test_transformers_loads_every_model_offline_like_our_engine(cached: dict[str, Any]) -> None:
    hf_home: Path = cached["hf_home"]
    names = [SMOLLM2_NAME, TINY_NAME, QWEN3]
    out = hf_home / "probe.npz"
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(PROBE), str(out), *names],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probed = json.loads(done.stdout.strip().splitlines()[-1])
    logits = np.load(out)
    sources = {
        SMOLLM2_NAME: ModelSource(SMOLLM2_NAME),
        TINY_NAME: ModelSource(TINY_NAME),
        QWEN3: ModelSource(QWEN3, cached["qwen3_dir"]),
    }
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for index, name in enumerate(names):
        ours = get_tokenizer(cached["qwen3_dir"] if name == QWEN3 else name)
        assert probed[name]["ids"] == [ours.encode(text) for text in GOLDEN], name
        assert probed[name]["chat"] == ours.apply_chat_template(messages), name
        assert probed[name]["eos_token"] == "<|im_end|>"
        assert probed[name]["tied"] is False
        diff = float(np.abs(_engine_logits(sources[name]).numpy() - logits[f"logits{index}"]).max())
        print(f"{name}: transformers from the hub cache vs engine, max abs {diff:.2e}")
        assert diff <= TOLERANCE, name
    assert probed[SMOLLM2_NAME]["ids"][1] == [
        504,
        713,
        216,
        34,
        32,
        34,
        36,
        761,
        216,
        35,
        38,
        37,
        2009,
        30,
    ]


@pytest.mark.real_model
def test_smollm2_from_its_hub_cache_directory_equals_the_gguf_package(
    cached: dict[str, Any],
) -> None:
    snapshot = _snapshot(cached["hf_home"], SMOLLM2_NAME)
    from_directory = _engine_logits(ModelSource(SMOLLM2_NAME, snapshot))
    from_gguf = _engine_logits(ModelSource(SMOLLM2_NAME))
    assert torch.equal(from_directory, from_gguf)


def test_rewrites_only_what_it_wrote(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    foreign = hf_home / "hub" / "models--someone--downloaded"
    (foreign / "snapshots" / "abc").mkdir(parents=True)
    (foreign / "snapshots" / "abc" / "config.json").write_text("{}")
    user = LocatedModel("someone/downloaded", write_family_dir(tmp_path / "m", "llama", tied=False))
    first = write_hf_cache([user], hf_home=hf_home, builtins=(TINY_NAME,))
    assert first[0].status == "written"
    assert first[1].status.startswith("skipped: already in the hub cache")
    assert (foreign / "snapshots" / "abc" / "config.json").read_text() == "{}"
    again = write_hf_cache([user], hf_home=hf_home, builtins=(TINY_NAME,))
    assert again[0].status == "unchanged" and again[0].snapshot == first[0].snapshot


async def test_adapter_trained_on_a_tied_model_merges_into_the_hub_cache_base(
    tmp_path: Path,
) -> None:
    [entry] = write_hf_cache([], hf_home=tmp_path / "hf", builtins=(TINY_NAME,))
    data = [
        t.Datum(
            model_input=t.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        for tokens in ([1, 4093, 198, 1780, 314, 216, 34], [19556, 28, 905, 17, 504, 713])
    ]
    engine = TorchEngine(models=[TINY_NAME], threads=1)
    with trio.fail_after(180):
        async with (
            open_local_backend(data_dir=tmp_path / "data", engine=engine) as backend,
            open_service(
                Config(api_key=backend.api_key, base_url=backend.base_url, telemetry=False)
            ) as service,
        ):
            training = await service.create_lora_training_client(TINY_NAME, rank=4, seed=1)
            for _ in range(3):
                step = await training.forward_backward(data, "cross_entropy")
                await (await training.optim_step(t.AdamParams(learning_rate=0.05)))
                await step
            saved = await (await training.save_weights_for_sampler("merge-me"))
            sampler = await service.create_sampling_client(model_path=saved.path)
            served = await sampler.sample(
                t.ModelInput.from_ints(TOKENS[0]),
                1,
                t.SamplingParams(max_tokens=1, temperature=1.0),
                include_prompt_logprobs=True,
                topk_prompt_logprobs=5,
            )
            adapter_dir = await download(
                service.create_rest_client(), saved.path, output_dir=tmp_path / "adapter"
            )
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"]

    base = transformers.AutoModelForCausalLM.from_pretrained(entry.snapshot, dtype=torch.float32)
    embedding = base.model.embed_tokens.weight.detach().clone()
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.eval()
    with torch.inference_mode():
        merged_logits = merged(input_ids=torch.tensor(TOKENS)).logits[0]
    # The unembedding was trained and merged; the input embeddings were left alone.
    assert torch.equal(merged.model.embed_tokens.weight, embedding)
    assert float((merged.lm_head.weight - embedding).abs().max()) > 1e-3

    # The backend's sampler logits (the engine with the downloaded adapter, unmerged) ...
    model = Llama(TINY_CONFIG, tiny_weights())
    adapter = LoraAdapter.load(adapter_dir, TINY_NAME, TINY_CONFIG)
    with torch.inference_mode():
        ours = model.logits(model.hidden_states(torch.tensor(TOKENS), adapter), adapter)[0]
    diff = float((ours - merged_logits).abs().max())
    print(f"merged (peft) vs backend sampler logits: max abs {diff:.2e}")
    assert diff <= TOLERANCE
    # ... and what the server answered over HTTP.
    logp = torch.log_softmax(merged_logits, dim=-1)
    expected = logp[:-1].gather(1, torch.tensor(TOKENS[0][1:])[:, None]).squeeze(1)
    assert served.prompt_logprobs is not None and served.topk_prompt_logprobs is not None
    got = torch.tensor(served.prompt_logprobs[1:])
    assert float((got - expected).abs().max()) <= TOLERANCE
    assert len(served.topk_prompt_logprobs) == len(TOKENS[0])
    for position, top in enumerate(served.topk_prompt_logprobs[1:], start=0):
        assert top is not None
        values, ids = logp[position].topk(5)
        assert [token for token, _ in top] == ids.tolist()
        np.testing.assert_allclose([v for _, v in top], values.numpy(), atol=TOLERANCE)
