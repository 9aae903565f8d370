"""Prompts for GRPO: generated OCR prompts (the default) or a text file (one per line, the target text in
double quotes) or JSONL records; evaluation prompts held out from them or read from a file of their own
(e.g. Flow-GRPO's OCR test split), never trained on."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lance_core.prompt_generator import generate_prompts
from lance_core.rewards import extract_target
from lance_core.rewards.ocr import normalise_text

from .config import PromptsConfig


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
    excluded: int = 0
    """Training prompts dropped because an evaluation prompt has the same text or target."""


def _read_records(path: Path, cfg: PromptsConfig, field: str = "path") -> list[Prompt]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {str(path)!r} (prompts.{field})")
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


def _training_records(cfg: PromptsConfig, seed: int) -> list[Prompt]:
    if cfg.source == "file":
        return _read_records(Path(cfg.path), cfg)
    return [Prompt(p.text, p.target, f"generated:{seed}:{i}")
            for i, p in enumerate(generate_prompts(cfg.generated_count, seed))]


def _not_evaluated(train: list[Prompt], evaluation: list[Prompt], by_target: bool = True) -> list[Prompt]:
    """``train`` without the prompts whose text, or (``by_target``) normalised target, is an evaluation
    prompt's."""
    texts = {p.text for p in evaluation}
    targets = {normalise_text(p.target) for p in evaluation if p.target} if by_target else set()
    return [p for p in train if p.text not in texts and (not p.target or normalise_text(p.target) not in targets)]


def load_prompts(cfg: PromptsConfig, seed: int = 0) -> PromptSet:
    records = _training_records(cfg, seed)
    if cfg.limit:
        records = records[: cfg.limit]
    kept = [p for p in records if p.target is not None or not cfg.require_target]
    rejected = len(records) - len(kept)
    if not kept:
        raise ValueError("no usable prompts" + (f" ({rejected} rejected without a quoted target)" if rejected else ""))
    if cfg.eval_path:
        evaluation = _read_records(Path(cfg.eval_path), cfg, "eval_path")
        usable = [p for p in evaluation if p.target is not None or not cfg.require_target]
        rejected += len(evaluation) - len(usable)
        train, held_out = kept, usable[: cfg.eval_count]
    else:
        eval_count = min(cfg.eval_count, max(len(kept) - 1, 0))
        train, held_out = kept[: len(kept) - eval_count], kept[len(kept) - eval_count:]
        evaluation = held_out
    trainable = _not_evaluated(train, evaluation, cfg.disjoint_targets)
    if not trainable:
        raise ValueError(f"each of the {len(train)} training prompts is also an evaluation prompt")
    random.Random(seed).shuffle(trainable)
    return PromptSet(trainable, held_out, rejected, sum(p.target is None for p in trainable + held_out),
                     len(train) - len(trainable))


def epoch_prompts(prompts: list[Prompt], epoch: int, count: int) -> list[Prompt]:
    """The ``count`` prompts of an epoch, cycling through the (shuffled) list."""
    start = (epoch * count) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(count)]
