"""Tokenizers: the Qwen2 tokenizer from a local path, and an offline byte-level fallback.

Both expose the same small interface (:class:`TextTokenizer`) and the Qwen chat special tokens, so the
packer, the samplers and the demo never care which one is in use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Protocol

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


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


def load_tokenizer(path: str | None) -> TextTokenizer:
    """Qwen2 tokenizer from ``path``; the offline byte-level tokenizer when ``path`` is None."""
    return ByteTokenizer() if path is None else QwenTokenizer(path)


def chat_turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"
