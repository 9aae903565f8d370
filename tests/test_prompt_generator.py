"""Generated OCR training prompts: deterministic per seed, one quoted target each, and never a target of
Flow-GRPO's OCR evaluation split (shared/data/ocr_prompts.txt)."""

from __future__ import annotations

from lance_core.prompt_generator import TEMPLATES, generate_prompts
from lance_core.rewards import extract_target
from lance_core.rewards.ocr import normalise_text


def test_generator_is_deterministic_per_seed():
    first, again, other = generate_prompts(500, seed=3), generate_prompts(500, seed=3), generate_prompts(500, seed=4)
    assert first == again
    assert first != other
    assert generate_prompts(100, seed=3) == first[:100]
    assert len({p.text for p in first}) == 500
    assert len(TEMPLATES) >= 40


def test_each_prompt_quotes_its_target_once():
    for prompt in generate_prompts(2000, seed=0):
        assert prompt.text.count('"') == 2
        assert extract_target(prompt.text) == prompt.target and prompt.target.strip() == prompt.target


def test_generated_targets_are_disjoint_from_the_evaluation_split(shared_dir):
    lines = (shared_dir / "data" / "ocr_prompts.txt").read_text(encoding="utf-8").splitlines()
    evaluation = {extract_target(line) for line in lines if line.strip()}
    assert None not in evaluation and len(evaluation) > 900
    lowered = {target.lower() for target in evaluation}
    squeezed = {normalise_text(target) for target in evaluation}
    for seed in (0, 1, 2):
        generated = generate_prompts(10_000, seed=seed)
        assert not {p.target.lower() for p in generated} & lowered
        assert not {normalise_text(p.target) for p in generated} & squeezed
        assert not {p.text for p in generated} & set(lines)
