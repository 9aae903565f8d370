"""Tokenizers: the Qwen2.5 tokenizer (built in, offline), the Qwen2 tokenizer of a checkpoint folder, and a
byte-level fallback.

All expose the same small interface (:class:`TextTokenizer`) and the Qwen chat special tokens, so the
packer, the samplers and the demo never care which one is in use.

The built-in Qwen2.5 tokenizer is what the released Lance models were trained with: the byte-level BPE ranks
``qwen.tiktoken`` (the ranks of Qwen, Qwen2 and Qwen2.5 alike) as shipped inside the Apache-2.0 PyPI package
``dashscope``, applied by ``tiktoken`` with Qwen2's pre-tokenizer regex after NFC normalisation, followed by
Qwen2.5's 22 added tokens (ids 151,643-151,664, so ``len() == 151,665``). The ranks file is read from the
installed package and checked against its sha256; nothing is fetched. Where ``dashscope`` (or ``tiktoken``) is
not installed, :func:`load_tokenizer` warns and falls back to :class:`ByteTokenizer`, whose ids differ.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import logging
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import ConfigError, ModelConfig, input_path_or_name

log = logging.getLogger("lance.tokenizer")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

QWEN25 = "qwen2.5"
"""Name of the built-in Qwen2.5 tokenizer (``load_tokenizer(None)`` where dashscope is installed)."""
BYTE = "byte"
"""Name of the byte-level tokenizer (a folder literally named ``byte`` is given as ``./byte``)."""
TokenizerRef = input_path_or_name(QWEN25, BYTE)
"""A config field naming a tokenizer: ``qwen2.5``, ``byte`` (kept) or a Qwen2 tokenizer folder (made absolute)."""

QWEN25_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
"""sha256 of ``qwen.tiktoken`` (one ``base64(token) rank`` per line)."""
QWEN25_BPE_TOKENS = 151_643
QWEN25_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
"""Qwen2.5's added tokens in id order from 151,643, each with its ``special`` flag: special ones are dropped
by ``decode(skip_special=True)``, the others (tool call, fill-in-the-middle, repository markers) are text."""
QWEN25_VOCAB = QWEN25_BPE_TOKENS + len(QWEN25_ADDED_TOKENS)
"""``len()`` of the Qwen2.5 tokenizer: 151,665 (the checkpoints hold 151,936 embedding rows)."""


@dataclass(frozen=True)
class SpecialIds:
    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int


class TextTokenizer(Protocol):
    special: SpecialIds

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...

    def __len__(self) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; the Qwen chat special tokens follow. Needs no files."""

    def __init__(self) -> None:
        self._special_to_id = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {i: tok for tok, i in self._special_to_id.items()}
        ids = [self._special_to_id[t] for t in SPECIAL_TOKENS]
        self.special = SpecialIds(*ids)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._split.split(text):
            if piece in self._special_to_id:
                out.append(self._special_to_id[piece])
            elif piece:
                out.extend(piece.encode("utf-8"))
        return out

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        chunks: list[str] = []
        buf = bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            chunks.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special and i in self._id_to_special:
                chunks.append(self._id_to_special[i])
        chunks.append(buf.decode("utf-8", errors="replace"))
        return "".join(chunks)

    def __len__(self) -> int:
        return 256 + len(SPECIAL_TOKENS)


def qwen25_ranks_file() -> Path | None:
    """``qwen.tiktoken`` inside the installed ``dashscope`` package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("dashscope")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=4)
def _qwen25_encoding(ranks_file: str):
    """The tiktoken ``Encoding`` of the ranks file (parsed once per process: ~0.4 s)."""
    import tiktoken

    data = Path(ranks_file).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != QWEN25_RANKS_SHA256:
        raise ValueError(f"{ranks_file}: sha256 {digest} is not that of the Qwen2.5 ranks "
                         f"({QWEN25_RANKS_SHA256}); token ids would not match the released models")
    lines = (line.split() for line in data.splitlines() if line)
    ranks = {base64.b64decode(token): int(rank) for token, rank in lines}
    special = {text: QWEN25_BPE_TOKENS + i for i, (text, _) in enumerate(QWEN25_ADDED_TOKENS)}
    return tiktoken.Encoding(QWEN25, pat_str=QWEN25_PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                             special_tokens=special, explicit_n_vocab=QWEN25_VOCAB)


class Qwen25Tokenizer:
    """The Qwen2.5 tokenizer from the ``qwen.tiktoken`` ranks file (offline; see the module docstring).

    Every added token written in the text is matched as that token, as the transformers Qwen2 tokenizer does.
    """

    def __init__(self, ranks_file: str | os.PathLike) -> None:
        self.ranks_file = str(ranks_file)
        self._enc = _qwen25_encoding(self.ranks_file)
        ids = {text: QWEN25_BPE_TOKENS + i for i, (text, _) in enumerate(QWEN25_ADDED_TOKENS)}
        self.special = SpecialIds(*(ids[t] for t in SPECIAL_TOKENS))
        self._special_ids = frozenset(ids[text] for text, special in QWEN25_ADDED_TOKENS if special)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids outside the vocabulary (rows past ``len()``) are dropped, as are special tokens when asked."""
        keep = [i for i in map(int, ids)
                if 0 <= i < QWEN25_VOCAB and not (skip_special and i in self._special_ids)]
        return self._enc.decode(keep, errors="replace")

    def __len__(self) -> int:
        return QWEN25_VOCAB

    def __reduce__(self):
        return (type(self), (self.ranks_file,))


class QwenTokenizer:
    """The Qwen2 tokenizer of a Qwen2.5-VL checkpoint folder (local files only)."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer path {path!r} is not a folder")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"no usable tokenizer files in {path!r}: {err}") from err
        ids = []
        for token in SPECIAL_TOKENS:
            token_id = self._tok.convert_tokens_to_ids(token)
            if token_id is None or token_id == self._tok.unk_token_id:
                raise ValueError(f"tokenizer at {path!r} lacks the special token {token}")
            ids.append(int(token_id))
        self.special = SpecialIds(*ids)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def __len__(self) -> int:
        return len(self._tok)


def _builtin_qwen25() -> TextTokenizer:
    ranks_file = qwen25_ranks_file()
    missing = "dashscope" if ranks_file is None else None
    if missing is None and importlib.util.find_spec("tiktoken") is None:
        missing = "tiktoken"
    if missing is not None:
        log.warning("the Qwen2.5 tokenizer needs the %s package, which is not installed: using the "
                    "byte-level tokenizer (%d ids), whose ids differ from the released Lance models'",
                    missing, len(ByteTokenizer()))
        return ByteTokenizer()
    return Qwen25Tokenizer(ranks_file)


def load_tokenizer(path: str | None = None) -> TextTokenizer:
    """``None`` or ``"qwen2.5"``: the built-in Qwen2.5 tokenizer (the byte-level one, with a warning, where
    ``dashscope`` is not installed); ``"byte"``: the byte-level tokenizer; otherwise the Qwen2 tokenizer of a
    checkpoint folder."""
    if path is None or path == QWEN25:
        return _builtin_qwen25()
    if path == BYTE:
        return ByteTokenizer()
    return QwenTokenizer(path)


def load_tokenizer_for(cfg: ModelConfig, path: str | None = None) -> TextTokenizer:
    """The tokenizer a model of ``cfg`` runs with: ``path`` as :func:`load_tokenizer` reads it; without one
    the Qwen2.5 tokenizer where the model's logit rows hold its 151,665 ids, else the byte-level tokenizer
    (the ``tiny`` preset keeps 512 rows so that it stays small and fast on CPU). Raises ``ConfigError`` when
    the tokenizer has more ids than the model has logit rows."""
    if path is None:
        path = QWEN25 if cfg.logit_rows >= QWEN25_VOCAB else BYTE
    check_tokenizer_fits(cfg, path)
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > cfg.logit_rows:
        raise _too_many_ids(cfg, path, len(tokenizer))
    return tokenizer


def check_tokenizer_fits(cfg: ModelConfig, path: str | None) -> None:
    """Config-time check (nothing loaded): the built-in Qwen2.5 tokenizer, when named, fits the model's logit
    rows. A folder's tokenizer is checked when :func:`load_tokenizer_for` loads it."""
    if path == QWEN25 and cfg.logit_rows < QWEN25_VOCAB:
        raise _too_many_ids(cfg, path, QWEN25_VOCAB)


def _too_many_ids(cfg: ModelConfig, path: str, length: int) -> ConfigError:
    return ConfigError(
        f"model: the tokenizer ({path}) has {length} ids but the {cfg.preset} model has {cfg.logit_rows} "
        f"logit rows (vocab_size {cfg.vocab_size}, text_vocab {cfg.text_vocab}); raise vocab_size to at "
        f"least {length} or choose another tokenizer")


def chat_turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"
