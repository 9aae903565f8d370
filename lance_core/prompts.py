"""System prompts per task: the released Lance texts, one per task in training and in inference.

The release builds these with ``generate_system_prompt(type, vision)``. It trains text-to-image with
the ``t2v`` prompt of an image target but infers with a separate ``t2i`` text; the released weights
learned the former, so both paths here use it (README, "Differs from the release on purpose").
Understanding samples use their own instruction when the data carries one; otherwise one of the four
released description prompts, picked by the sample key in training and the first one at inference.
"""

from __future__ import annotations

import zlib

TEXT_TO_IMAGE = (
    "Describe the image by detailing the color, quantity, visible text, shape, size, texture, spatial "
    "relationships and motion/camera movements of the objects and background:"
)
TEXT_TO_VIDEO = (
    "Describe the video by detailing the color, quantity, visible text, shape, size, texture, spatial "
    "relationships and motion/camera movements of the objects and background:"
)
RELEASE_T2I_INFERENCE = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships "
    "of the objects and background:"
)
"""The release's inference-only t2i text; not used here (kept to name the difference)."""


def _edit(medium: str) -> str:
    return (
        f"Describe the key features of the input {medium} (color, shape, size, texture, objects, background), "
        f"then explain how the user\u2019s text instruction should alter or modify the {medium}. Generate a new "
        f"{medium} that meets the user\u2019s requirements while maintaining consistency with the original input "
        "where appropriate."
    )


def _subject(medium: str) -> str:
    return (
        "Describe the key features of the input image (color, shape, size, texture, objects, background, "
        "style), then incorporate the user\u2019s text description to generate a new "
        f"{medium} that satisfies the user\u2019s requirements while preserving the essential identity and "
        "object or style information from the reference input."
    )


def _descriptions(medium: str) -> tuple[str, ...]:
    return (
        f"Generate a detailed and accurate description of the {medium}, including all the key moments and "
        "visual details.",
        f"Write an in-depth depiction of the {medium}, covering all its aspects.",
        f"Write an exhaustive depiction of the given {medium}, capturing its essence and key moments.",
        f"Describe the key features of the input {medium}, including color, shape, size, texture, objects, "
        "background.",
    )


GENERATION_PROMPTS: dict[tuple[str, bool], str] = {
    ("t2i", False): TEXT_TO_IMAGE,
    ("t2v", True): TEXT_TO_VIDEO,
    ("i2v", True): TEXT_TO_VIDEO,
    ("i2i", False): _edit("image"),
    ("v2v", True): _edit("video"),
    ("subject", False): _subject("image"),
    ("subject", True): _subject("video"),
}
"""(task, video target) -> system prompt."""

DESCRIPTION_PROMPTS: dict[bool, tuple[str, ...]] = {False: _descriptions("image"), True: _descriptions("video")}
"""Understanding samples without an instruction of their own, by whether the media is a video."""


def generation_system_prompt(task: str, video: bool) -> str:
    try:
        return GENERATION_PROMPTS[(task, video)]
    except KeyError:
        kind = "video" if video else "image"
        raise ValueError(f"no system prompt for a {task!r} sample with a {kind} target") from None


def description_system_prompt(video: bool, key: str | None = None) -> str:
    """The first description prompt, or (training) one chosen by a stable hash of the sample key."""
    candidates = DESCRIPTION_PROMPTS[video]
    if not key:
        return candidates[0]
    return candidates[zlib.crc32(key.encode()) % len(candidates)]
