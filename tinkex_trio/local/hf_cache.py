"""`tinkex-trio hf-cache`: the served models in the Hugging Face hub cache layout, offline.

Other tools find a model by name in the hub cache: the official SDK's `get_tokenizer()`,
`transformers.AutoTokenizer.from_pretrained(name)` and `AutoModelForCausalLM.from_pretrained
(name)`. With `HF_HUB_OFFLINE=1` they read `<HF_HOME>/hub/models--<org>--<name>/refs/main`
and the snapshot it names, and never touch the network. This module writes that entry for
every model the local backend serves: config.json (loadable by transformers),
tokenizer.json, tokenizer_config.json (chat template, bos/eos/pad/unk, tokenizer class),
generation_config.json and the weights as safetensors.

Tied embeddings are written untied. A tied model (SmolLM2, many small Qwen/Llama releases)
has no `lm_head.weight`, and our LoRA on `lm_head` (train_unembed) then has nothing to merge
into; merging into the tied matrix would change the input embeddings too. So the entry says
`tie_word_embeddings: false` and carries an explicit `lm_head.weight` equal to the embedding:
the logits are identical, and `peft`'s `merge_and_unload()` (or any merge tool) of an adapter
the backend exported gives exactly the logits the backend samples from.

Weights are not copied: the backend's files are linked (symlinks, as the hub cache itself
links snapshots to blobs) as shards of an index, and only the untied `lm_head` is a new
file. Only the tiny random model, which exists in memory only, is written in full. Moving or
deleting the linked files (`TINKEX_TRIO_CACHE`, a model directory) breaks the entry; run the
command again.

An entry is rewritten only if this command wrote it (a marker file in the repository
directory): a model that is already in the hub cache from a real download is left alone.
The revision is a hash of the entry's content, so running the command again with nothing
changed writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tinkex_trio.tokenizer import hf_hub_cache_dir, hub_repo_dir

from .model_files import SMOLLM2_NAME, TINY_NAME, smollm2_files
from .model_locator import LocatedModel

MARKER_FILE: Final = ".written-by-tinkex-trio-hf-cache"
EMBED: Final = "model.embed_tokens.weight"
LM_HEAD_WEIGHT: Final = "lm_head.weight"
_COPIED_TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True)
class CachedModel:
    """One model's hub-cache entry: where its snapshot is, and whether this run wrote it."""

    name: str
    snapshot: Path
    status: str  # "written", "unchanged", or "skipped: <why>"


@dataclass
class _Entry:
    """The files of one snapshot before it is written: text, links and tensors to save."""

    texts: dict[str, str] = field(default_factory=dict)
    links: dict[str, Path] = field(default_factory=dict)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> name -> tensor

    def revision(self) -> str:
        """40 hex digits from the content (a link counts by target, size and mtime)."""
        digest = hashlib.sha1(usedforsecurity=False)
        for name, text in sorted(self.texts.items()):
            digest.update(f"text {name}\0{text}\0".encode())
        for name, target in sorted(self.links.items()):
            stat = target.stat()
            digest.update(f"link {name}\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        for name, tensors in sorted(self.tensors.items()):
            digest.update(f"tensors {name}\0".encode())
            for key, tensor in sorted(tensors.items()):
                digest.update(key.encode() + b"\0")
                digest.update(tensor.contiguous().view(-1).view(dtype=_uint8()).numpy().tobytes())
        return digest.hexdigest()


def _uint8() -> Any:
    import torch

    return torch.uint8


def default_hf_home() -> Path:
    """`$HF_HOME`, else `~/.cache/huggingface` (the hub library's default)."""
    env = os.environ.get("HF_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "huggingface"


def write_hf_cache(
    models: Sequence[LocatedModel],
    *,
    hf_home: Path | None = None,
    builtins: Sequence[str] = (SMOLLM2_NAME, TINY_NAME),
) -> list[CachedModel]:
    """Write (or refresh) the hub-cache entry of every built-in and user model.

    `hf_home=None`: where the hub library itself looks (`$HF_HUB_CACHE`, `$HF_HOME/hub`,
    `~/.cache/huggingface/hub`). A user model named like a built-in replaces it, as in
    `serve`.
    """
    hub = hf_hub_cache_dir() if hf_home is None else Path(hf_home) / "hub"
    user = {model.name: model for model in models}
    results: list[CachedModel] = []
    for name in builtins:
        if name not in user:
            results.append(_write(hub, name, lambda n=name: _builtin_entry(n)))
    for model in models:
        results.append(_write(hub, model.name, lambda m=model: _directory_entry(m)))
    return results


def _write(hub: Path, name: str, build: Any) -> CachedModel:
    repo = hub_repo_dir(hub, name)
    if repo.exists() and not (repo / MARKER_FILE).is_file():
        return CachedModel(
            name, repo, "skipped: already in the hub cache (not written by tinkex-trio)"
        )
    entry: _Entry = build()
    revision = entry.revision()
    snapshots = repo / "snapshots"
    snapshot = snapshots / revision
    ref = repo / "refs" / "main"
    unchanged = snapshot.is_dir() and ref.is_file() and ref.read_text().strip() == revision
    if not unchanged:
        snapshots.mkdir(parents=True, exist_ok=True)
        (repo / MARKER_FILE).touch()
        if not snapshot.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=snapshots))
            try:
                _materialize(entry, staging)
                os.replace(staging, snapshot)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        ref.parent.mkdir(exist_ok=True)
        _write_text_atomically(ref, revision)
    for old in snapshots.iterdir():
        if old.name != revision:
            shutil.rmtree(old, ignore_errors=True)
    return CachedModel(name, snapshot, "unchanged" if unchanged else "written")


def _materialize(entry: _Entry, directory: Path) -> None:
    from safetensors.torch import save_file

    for name, text in entry.texts.items():
        (directory / name).write_text(text, encoding="utf-8")
    for name, target in entry.links.items():
        (directory / name).symlink_to(target.resolve())
    for name, tensors in entry.tensors.items():
        save_file(
            {k: t.contiguous() for k, t in tensors.items()},
            str(directory / name),
            metadata={"format": "pt"},
        )


def _write_text_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


# --- built-in models -------------------------------------------------------------------------


def _builtin_entry(name: str) -> _Entry:
    files = smollm2_files(weights=name == SMOLLM2_NAME)
    entry = _Entry()
    entry.texts["tokenizer.json"] = files.tokenizer_path.read_text(encoding="utf-8")
    if name == SMOLLM2_NAME:
        config = json.loads(files.config_path.read_text(encoding="utf-8"))
        _link_untied(entry, [files.weights_path], _embedding(files.weights_path))
    else:
        from .engine._llama import TINY_CONFIG, tiny_weights

        config = _tiny_config(TINY_CONFIG)
        weights = tiny_weights()
        weights[LM_HEAD_WEIGHT] = weights[EMBED].clone()
        entry.tensors["model.safetensors"] = weights
    config["tie_word_embeddings"] = False
    config["_name_or_path"] = name
    entry.texts["config.json"] = _json(config)
    entry.texts["tokenizer_config.json"] = _json(
        _smollm2_tokenizer_config(files.tokenizer_path, files.chat_template, config)
    )
    entry.texts["generation_config.json"] = _json(
        {
            key: config[key]
            for key in ("bos_token_id", "eos_token_id", "pad_token_id")
            if key in config
        }
    )
    return entry


def _tiny_config(c: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_context,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": c.eos_token_ids[0],
        "pad_token_id": c.eos_token_ids[0],
        "torch_dtype": "float32",
    }


def _smollm2_tokenizer_config(
    tokenizer_path: Path, chat_template: str, config: dict[str, Any]
) -> dict[str, Any]:
    """What transformers needs to load our tokenizer.json as is, with its special tokens.

    `PreTrainedTokenizerFast` (not `GPT2Tokenizer`): it takes tokenizer.json verbatim,
    including the Digits pre-tokenizer that SmolLM2 needs (LOCAL_MODEL_NOTES.md).
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))

    def token(key: str) -> str | None:
        value = config.get(key)
        return tokenizer.id_to_token(value) if isinstance(value, int) else None

    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("pad_token_id"),
        "unk_token": tokenizer.id_to_token(0),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": chat_template,
    }
    return {key: value for key, value in out.items() if value is not None}


# --- user directories ------------------------------------------------------------------------


def _directory_entry(model: LocatedModel) -> _Entry:
    from .engine._model_dir import read_config, read_weight_entries

    directory = model.directory
    config = read_config(directory)
    _, tensors = read_weight_entries(directory)
    shards = sorted({entry.file for entry in tensors.values()})
    entry = _Entry()
    for name in _COPIED_TOKENIZER_FILES:
        if (directory / name).is_file():
            entry.texts[name] = (directory / name).read_text(encoding="utf-8")
    tied = config.get("tie_word_embeddings", False) is True
    if tied:
        if LM_HEAD_WEIGHT in tensors:
            # transformers ties over a saved lm_head; untied, it would read it: drop it.
            holder = tensors[LM_HEAD_WEIGHT].file
            shards = [s for s in shards if s != holder]
            kept = _tensors_without(holder, LM_HEAD_WEIGHT)
            entry.tensors["model-rewritten.safetensors"] = kept
        _link_untied(entry, shards, _embedding(tensors[EMBED].file))
        config = {**config, "tie_word_embeddings": False}
    elif len(shards) == 1 and not entry.tensors:
        entry.links["model.safetensors"] = shards[0]
    else:
        _link_untied(entry, shards, None)
    entry.texts["config.json"] = _json({**config, "_name_or_path": model.name})
    return entry


def _tensors_without(path: Path, drop: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors.pop(drop, None)
    return tensors


def _embedding(path: Path) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as stream:
        return stream.get_tensor(EMBED).clone()


def _link_untied(entry: _Entry, shards: Sequence[Path], embedding: Any) -> None:
    """Link `shards` (and any tensors already in `entry`) plus an `lm_head` shard equal to
    `embedding` (None: none) under one `model.safetensors.index.json`."""
    from .engine._model_dir import read_safetensors_header

    extra: dict[str, dict[str, Any]] = dict(entry.tensors)
    if embedding is not None:
        extra["lm_head.safetensors"] = {LM_HEAD_WEIGHT: embedding}
    total = len(shards) + len(extra)
    weight_map: dict[str, str] = {}
    size = 0
    entry.tensors = {}
    for index, shard in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{total:05d}.safetensors"
        entry.links[name] = shard
        for tensor_name, info in read_safetensors_header(shard).items():
            weight_map[tensor_name] = name
            size += _nbytes(info.shape, info.dtype)
    for index, tensors in enumerate(extra.values(), start=len(shards) + 1):
        name = f"model-{index:05d}-of-{total:05d}.safetensors"
        entry.tensors[name] = tensors
        for tensor_name, tensor in tensors.items():
            weight_map[tensor_name] = name
            size += tensor.numel() * tensor.element_size()
    entry.texts["model.safetensors.index.json"] = _json(
        {"metadata": {"total_size": size}, "weight_map": weight_map}
    )


_DTYPE_BYTES: Final = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * _DTYPE_BYTES.get(dtype, 4)


def main(argv: Sequence[str] | None = None) -> int:
    """`tinkex-trio hf-cache`: write every served model into the Hugging Face hub cache."""
    import argparse
    import sys

    from ._engine_api import ModelDirectoryError
    from .model_locator import add_model_arguments, locate_models

    parser = argparse.ArgumentParser(
        prog="tinkex-trio hf-cache",
        description="Write the hub-cache entry (config, tokenizer, weights) of every model the "
        "local backend serves, so that with HF_HUB_OFFLINE=1 the official SDK's "
        "get_tokenizer() and transformers' from_pretrained(name) find them offline.",
    )
    parser.add_argument(
        "--hf-home",
        type=Path,
        default=None,
        metavar="DIR",
        help="write under DIR/hub (default: where huggingface_hub looks: $HF_HUB_CACHE, "
        "$HF_HOME/hub, ~/.cache/huggingface/hub)",
    )
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        located = locate_models(args.model, args.model_name)
        results = write_hf_cache(located, hf_home=args.hf_home)
    except ModelDirectoryError as exc:
        print(f"tinkex-trio hf-cache: {exc}", file=sys.stderr, flush=True)
        return 2
    except ValueError as exc:
        parser.error(str(exc))
    for result in results:
        print(f"{result.name}: {result.status} ({result.snapshot})", flush=True)
    hf_home = args.hf_home.resolve() if args.hf_home is not None else default_hf_home()
    print(f"  export HF_HOME={hf_home}", flush=True)
    print("  export HF_HUB_OFFLINE=1", flush=True)
    return 0
