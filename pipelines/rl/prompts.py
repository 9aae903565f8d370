"""Prompts for GRPO: a text file (one per line, the target text in double quotes) or JSONL records."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lance_core.rewards import extract_target

from .config import PromptsConfig

BUILT_IN = (
    'A shop sign that reads "Lance"',
    'A poster with the words "Hello World"',
    'A road sign saying "Stop"',
    'A chalkboard with "Open Today" written on it',
    'A neon sign glowing "Cafe"',
    'A book cover titled "Ray"',
)


@dataclass(frozen=True)
class Prompt:
    text: str
    target: str | None
    """The OCR target; None when the prompt names none."""
    key: str


@dataclass
class PromptSet:
    train: list[Prompt]
    eval: list[Prompt]
    rejected: int
    """Prompts dropped at load because they named no target (``require_target``)."""
    missing_target: int
    """Kept prompts without a target (their OCR reward is 0, counted)."""


def _read_records(path: Path, cfg: PromptsConfig) -> list[Prompt]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {str(path)!r} (prompts.path)")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    is_jsonl = path.suffix in (".jsonl", ".json")
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        key = f"{path.name}:{number}"
        if not is_jsonl:
            records.append(Prompt(line, extract_target(line), key))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(cfg.text_field), str):
            raise ValueError(  # noqa: TRY004 (a data error, reported like the others)
                f"{path}:{number}: a JSON object with a string field {cfg.text_field!r} is needed")
        text = row[cfg.text_field]
        target = row.get(cfg.target_field)
        if target is not None and (not isinstance(target, str) or not target.strip()):
            raise ValueError(f"{path}:{number}: field {cfg.target_field!r} must be a non-empty string")
        records.append(Prompt(text, target or extract_target(text), str(row.get("key", key))))
    return records


def load_prompts(cfg: PromptsConfig, seed: int = 0) -> PromptSet:
    records = _read_records(Path(cfg.path), cfg) if cfg.path else [
        Prompt(text, extract_target(text), f"builtin:{i}") for i, text in enumerate(BUILT_IN)]
    if cfg.limit:
        records = records[: cfg.limit]
    kept = [p for p in records if p.target is not None or not cfg.require_target]
    rejected = len(records) - len(kept)
    if not kept:
        raise ValueError("no usable prompts" + (f" ({rejected} rejected without a quoted target)" if rejected else ""))
    eval_count = min(cfg.eval_count, max(len(kept) - 1, 0))
    train, held_out = kept[: len(kept) - eval_count], kept[len(kept) - eval_count:]
    random.Random(seed).shuffle(train)
    return PromptSet(train, held_out, rejected, sum(p.target is None for p in kept))


def epoch_prompts(prompts: list[Prompt], epoch: int, count: int) -> list[Prompt]:
    """The ``count`` prompts of an epoch, cycling through the (shuffled) list."""
    start = (epoch * count) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(count)]
