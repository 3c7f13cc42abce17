"""Checks of a Hugging Face model directory before it is served: refuse what we would ignore.

The engine implements one computation per supported `model_type` (see `_llama.py`): a Llama
decoder (RMSNorm, rotate-half RoPE, grouped-query attention, a SiLU-gated MLP, tied or untied
unembedding), with Llama 3 RoPE scaling, Qwen2's q/k/v biases and Qwen3's q/k norms. A
`config.json` field that asks for anything else (another RoPE type, sliding windows, biases
where the family has none, another activation), or a weight tensor the forward pass would not
read, would make the served log-probs silently differ from the model's. So every config key
is either understood, known to be metadata, or pinned to the one value the engine implements,
and the weights must hold exactly the tensors the engine reads. Anything else is refused at
start-up with one line that names the file, the field and what to do.

Only the safetensors headers are read here (names, shapes, dtypes), so checking a multi-GB
model costs milliseconds and no memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._engine_api import ModelDirectoryError
from ._llama import rope_settings, rope_type

CONFIG_FILE: Final = "config.json"
WEIGHTS_FILE: Final = "model.safetensors"
WEIGHTS_INDEX_FILE: Final = "model.safetensors.index.json"
TOKENIZER_FILE: Final = "tokenizer.json"
TOKENIZER_CONFIG_FILE: Final = "tokenizer_config.json"
GENERATION_CONFIG_FILE: Final = "generation_config.json"

# Keys every family's engine code reads (LlamaConfig.from_hf, rope_settings).
_UNDERSTOOD_KEYS: Final = frozenset(
    {
        "model_type",
        "architectures",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "eos_token_id",
    }
)

# Keys that do not change the forward pass: provenance, storage dtype (the engine computes in
# float32, `--dtype` chooses the storage), generation/cache hints, initialisation,
# special-token ids the tokenizer owns.
_METADATA_KEYS: Final = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "pad_token_id",
        "is_llama_config",
        "transformers.js_config",
        "pretraining_tp",  # a tensor-parallel slicing of the same matmuls in transformers
        "tokenizer_class",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation_autoset",
    }
)

# Qwen's sliding-window settings are inert while `use_sliding_window` is false and every
# `layer_types` entry is "full_attention" (both pinned below), as in the released models.
_QWEN_INERT_KEYS: Final = frozenset({"sliding_window", "max_window_layers"})

# Keys the engine accepts only at the value it implements (None also means "absent"), for
# every family; each family adds its own.
_COMMON_PINNED: Final[Mapping[str, tuple[object, ...]]] = {
    "hidden_act": ("silu",),
    "attention_dropout": (0, 0.0, None),
    "rope_interleaved": (False, None),
    "use_sliding_window": (False, None),
}

FULL_ATTENTION: Final = "full_attention"
LAYER_TYPES_KEY: Final = "layer_types"

ROPE_TYPES: Final[Mapping[str, frozenset[str]]] = {
    "default": frozenset({"rope_type", "type", "rope_theta"}),
    "llama3": frozenset(
        {
            "rope_type",
            "type",
            "rope_theta",
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        }
    ),
}
"""RoPE types the engine computes, with the keys each may carry (`rope_scaling` or
`rope_parameters`); other types (linear, dynamic, yarn, longrope, ...) are refused."""


@dataclass(frozen=True)
class Family:
    """One supported `model_type`: its architecture class and its extra config keys."""

    model_type: str
    architecture: str
    metadata: frozenset[str]
    pinned: Mapping[str, tuple[object, ...]]
    has_layer_types: bool  # transformers 5 writes `layer_types` for these


FAMILIES: Final[Mapping[str, Family]] = {
    "llama": Family(
        model_type="llama",
        architecture="LlamaForCausalLM",
        metadata=frozenset(),
        pinned={"attention_bias": (False, None), "mlp_bias": (False, None)},
        has_layer_types=False,
    ),
    "qwen2": Family(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        metadata=_QWEN_INERT_KEYS,
        pinned={},
        has_layer_types=True,
    ),
    "qwen3": Family(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        metadata=_QWEN_INERT_KEYS,
        pinned={"attention_bias": (False, None)},
        has_layer_types=True,
    ),
}

SUPPORTED_MODEL_TYPES: Final = tuple(FAMILIES)
SUPPORTED_ARCHITECTURES: Final = tuple(f.architecture for f in FAMILIES.values())
SUPPORTED_WEIGHT_DTYPES: Final = ("F32", "BF16", "F16")
"""safetensors dtypes the engine reads (upcast to float32 or stored as bfloat16)."""

_SUPPORTED = (
    f"it serves {', '.join(SUPPORTED_ARCHITECTURES)} "
    f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
)


def _refuse(path: Path, message: str) -> ModelDirectoryError:
    return ModelDirectoryError(f"{path}: {message}")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _refuse(path, f"not readable JSON ({exc})") from None


def read_config(directory: Path) -> dict[str, object]:
    """`config.json` of `directory`, checked; raises ModelDirectoryError naming file and fix."""
    if not directory.is_dir():
        raise _refuse(directory, "not a directory; --model takes a Hugging Face model directory")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise _refuse(
            path,
            "missing; a model directory needs config.json, model.safetensors (or sharded "
            "weights with model.safetensors.index.json) and tokenizer.json, as written by "
            "save_pretrained",
        )
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise _refuse(path, "must hold a JSON object")
    check_config(raw, path)
    return raw


def check_config(config: Mapping[str, object], path: Path) -> None:
    """Refuse a config that asks for computation the engine does not implement."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise _refuse(
            path, f"model_type {model_type!r} is not supported by the local engine; {_SUPPORTED}"
        )
    architectures = config.get("architectures")
    if architectures is not None and architectures != [family.architecture]:
        raise _refuse(
            path,
            f"architectures {architectures!r} is not supported by the local engine for "
            f"model_type {model_type!r}; it serves [{family.architecture!r}]",
        )
    pinned = {**_COMMON_PINNED, **family.pinned}
    for key, allowed in pinned.items():
        if key not in config:
            continue  # absent: the transformers default, which is the implemented value
        value = config[key]
        if not any(value == ok and type(value) is type(ok) for ok in allowed):
            raise _refuse(
                path,
                f"{key} = {value!r} is not implemented by the local engine for {model_type} "
                f"(it implements {' or '.join(repr(v) for v in allowed if v is not None)}); "
                "serving this model would give wrong log-probs, so it is refused",
            )
    allowed_keys = _UNDERSTOOD_KEYS | _METADATA_KEYS | family.metadata | set(pinned)
    if family.has_layer_types:
        allowed_keys |= {LAYER_TYPES_KEY}
        _check_layer_types(config, path)
    unknown = sorted(set(config) - allowed_keys)
    if unknown:
        raise _refuse(
            path,
            f"unknown config field(s) {unknown} for model_type {model_type!r}: the local "
            "engine does not know what they change, so it refuses the model rather than "
            "ignore them",
        )
    _check_rope(config, path)


def _check_layer_types(config: Mapping[str, object], path: Path) -> None:
    layer_types = config.get(LAYER_TYPES_KEY)
    if layer_types is None:
        return
    if not isinstance(layer_types, list) or any(t != FULL_ATTENTION for t in layer_types):
        raise _refuse(
            path,
            f"{LAYER_TYPES_KEY} = {layer_types!r}: the local engine implements only "
            f"{FULL_ATTENTION!r} layers (no sliding windows), so the model is refused",
        )


def _check_rope(config: Mapping[str, object], path: Path) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise _refuse(path, f"{key} must be an object or null, got {value!r}")
    rope = rope_settings(config)
    kind = rope_type(rope)
    allowed = ROPE_TYPES.get(kind) if isinstance(kind, str) else None
    if allowed is None:
        raise _refuse(
            path,
            f"RoPE type {kind!r} is not implemented by the local engine (it implements "
            f"{' and '.join(repr(k) for k in ROPE_TYPES)}); serving this model would give "
            "wrong log-probs, so it is refused",
        )
    unknown = sorted(set(rope) - allowed)
    if unknown:
        raise _refuse(
            path,
            f"RoPE field(s) {unknown} are not implemented by the local engine for rope_type "
            f"{kind!r}; it refuses the model rather than ignore them",
        )


# --- weights ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: where it is, its shape and dtype."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> entry from a safetensors file's JSON header (the data is not read)."""
    try:
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(stream.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries: dict[str, TensorEntry] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape = tuple(int(n) for n in entry["shape"])
            entries[name] = TensorEntry(path, shape, str(entry["dtype"]))
    except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise _refuse(path, f"not a readable safetensors file ({exc})") from None
    return entries


def weight_files(directory: Path) -> tuple[Path, list[Path]]:
    """(the file to name in errors, the safetensors files): one file, or an index's shards."""
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return single, [single]
    index_path = directory / WEIGHTS_INDEX_FILE
    if not index_path.is_file():
        raise _refuse(
            single,
            f"missing (and no {WEIGHTS_INDEX_FILE} for sharded weights); save the model with "
            "`save_pretrained(dir, safe_serialization=True)`",
        )
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for v in weight_map.values()
    ):
        raise _refuse(index_path, "needs a 'weight_map' of tensor name -> shard file name")
    shards = [directory / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise _refuse(shard, f"missing, but {WEIGHTS_INDEX_FILE} names it; re-download it")
    return index_path, shards


def read_weight_entries(directory: Path) -> tuple[Path, dict[str, TensorEntry]]:
    """Every tensor of the directory's weights (single file or shards), by name."""
    named, files = weight_files(directory)
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            if name in entries:
                raise _refuse(
                    path, f"tensor {name} is also in {entries[name].file.name}; which one is meant?"
                )
            entries[name] = entry
    if named.name == WEIGHTS_INDEX_FILE:
        weight_map = _read_json(named)
        assert isinstance(weight_map, dict)  # checked by weight_files
        for name, shard in weight_map["weight_map"].items():
            found = entries.get(name)
            if found is None or found.file.name != shard:
                raise _refuse(
                    named,
                    f"says tensor {name} is in {shard}, but "
                    f"{'no shard holds it' if found is None else f'it is in {found.file.name}'}"
                    "; the index does not belong to these shards",
                )
    return named, entries


def check_weights(
    path: Path,
    entries: Mapping[str, TensorEntry],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignorable: frozenset[str] = frozenset(),
) -> None:
    """Every tensor the engine needs is present with its shape and a readable dtype, and
    nothing else is.

    `ignorable` names tensors that transformers itself ignores (a tied model's saved
    `lm_head.weight` is replaced by the embedding), so ignoring them changes nothing.
    """
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise _refuse(
            path,
            f"lacks tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} that config.json "
            "implies; is the directory complete and does config.json belong to these weights?",
        )
    unused = sorted(set(entries) - set(expected) - ignorable)
    if unused:
        raise _refuse(
            path,
            f"holds tensor(s) the local engine would ignore: {unused[:4]}"
            f"{' ...' if len(unused) > 4 else ''}; such a model needs computation the engine "
            "does not implement (biases, extra norms) or config.json does not match the "
            "weights, so it is refused",
        )
    for name, shape in expected.items():
        entry = entries[name]
        if entry.shape != tuple(shape):
            raise _refuse(
                entry.file,
                f"tensor {name} has shape {list(entry.shape)} but config.json implies "
                f"{list(shape)}; does config.json belong to these weights?",
            )
        if entry.dtype not in SUPPORTED_WEIGHT_DTYPES:
            raise _refuse(
                entry.file,
                f"tensor {name} has dtype {entry.dtype}; the local engine reads "
                f"{', '.join(SUPPORTED_WEIGHT_DTYPES)} weights (quantized checkpoints are "
                "not supported: use the model's float release)",
            )


def check_tokenizer(directory: Path) -> Path:
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise _refuse(
            path,
            "missing; the local backend needs the fast tokenizer file (save it with "
            "`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)",
        )
    config_path = directory / TOKENIZER_CONFIG_FILE
    if config_path.is_file() and not isinstance(_read_json(config_path), dict):
        raise _refuse(config_path, "must hold a JSON object")
    return path


def generation_eos_ids(directory: Path) -> tuple[int, ...]:
    """`eos_token_id` of `generation_config.json` (what `generate` stops on), if any."""
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return ()
    raw = _read_json(path)
    value = raw.get("eos_token_id") if isinstance(raw, dict) else None
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0)
