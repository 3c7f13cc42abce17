"""The GGUF conversion: tokenizer golden ids (LOCAL_MODEL_NOTES.md), config, cache layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from tinkex_trio.local.model_files import SmolLM2Files, default_cache_dir, smollm2_files

GOLDEN_IDS = [
    ("Hello, world!", [19556, 28, 905, 17]),
    (
        "The year 2024 had 365 days.",
        [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 37, 2009, 30],
    ),
    (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198],
    ),
    ("  indented\tcode  \n\n", [216, 641, 6574, 197, 4635, 256, 1116]),
]


@pytest.fixture(scope="module")
def files() -> SmolLM2Files:
    return smollm2_files(weights=False)


@pytest.fixture(scope="module")
def tokenizer(files: SmolLM2Files) -> Tokenizer:
    return Tokenizer.from_file(str(files.tokenizer_path))


@pytest.mark.parametrize(("text", "ids"), GOLDEN_IDS)
def test_golden_ids_and_round_trip(tokenizer: Tokenizer, text: str, ids: list[int]) -> None:
    assert tokenizer.encode(text).ids == ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_control_tokens_are_special(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == 49152
    assert tokenizer.token_to_id("<|im_start|>") == 1
    assert tokenizer.token_to_id("<|im_end|>") == 2
    assert tokenizer.decode([1, 19556, 2], skip_special_tokens=True) == "Hello"


def test_config_and_chat_template(files: SmolLM2Files) -> None:
    config = json.loads(files.config_path.read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["rms_norm_eps"] == 1e-5
    assert "You are a helpful AI assistant named SmolLM" in files.chat_template


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("TINKEX_TRIO_CACHE", str(tmp_path))
    assert str(default_cache_dir()) == str(tmp_path)
    monkeypatch.delenv("TINKEX_TRIO_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "tinkex_trio")


def test_model_files_does_not_import_torch(files: SmolLM2Files) -> None:
    code = (
        "import sys; from tinkex_trio.local.model_files import smollm2_files; "
        "smollm2_files(weights=False); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
