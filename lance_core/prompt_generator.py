"""Training prompts for the OCR (text rendering) task: templates x phrases, deterministic for a seed.

Flow-GRPO's OCR prompt file is its evaluation split, so training draws its prompts from here instead. A
prompt is a scene template with one quoted phrase, the OCR target::

    A storefront sign that says "OPEN LATE"

Phrases are built from our own word lists in a few patterns (adjective + noun, verb + noun, noun + number,
...) and written in Title Case or capitals. ``generate_prompts(count, seed)`` returns distinct prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TEMPLATES = (
    'A storefront sign that says "{text}"',
    'A neon sign glowing "{text}" above a bar door at night',
    'A hand-painted wooden sign reading "{text}" at the edge of a farm road',
    'A chalkboard menu outside a cafe with "{text}" written in white chalk',
    'A vintage travel poster with the headline "{text}"',
    'A paperback book cover titled "{text}", lying on a wooden table',
    'A coffee mug printed with the words "{text}"',
    'A t-shirt on a hanger with "{text}" printed across the chest',
    'A highway billboard advertising "{text}" under a clear blue sky',
    'A brass plaque on a brick wall engraved with "{text}"',
    'A birthday cake with "{text}" piped in blue icing',
    'A street banner stretched between two lampposts that reads "{text}"',
    'A glowing laptop screen showing the title "{text}"',
    'A cardboard box stamped with "{text}" in red ink',
    'A movie theatre marquee announcing "{text}"',
    'A sticky note on a fridge that says "{text}"',
    'A handwritten letter beginning with the words "{text}"',
    'A delivery van with "{text}" painted on its side',
    'A protest placard held high that reads "{text}"',
    'A glass jar on a kitchen shelf labelled "{text}"',
    'A tote bag with "{text}" printed in bold letters',
    'A mural on a city wall spelling out "{text}"',
    'A wooden crate at a market stall branded "{text}"',
    'A train station departure board displaying "{text}"',
    'A restaurant napkin with "{text}" scribbled in pen',
    'A shop window with "{text}" in gold vinyl lettering',
    'A magazine cover with the bold headline "{text}"',
    'A doormat that says "{text}" in front of a green door',
    'A sand castle beside a message written in the sand: "{text}"',
    'A luggage tag reading "{text}" tied to a leather suitcase',
    'A bottle of lemonade with a label that says "{text}"',
    'A whiteboard in a classroom with "{text}" written in marker',
    'A baseball cap embroidered with "{text}"',
    'A paper lantern painted with the words "{text}"',
    'A road sign on a mountain pass warning "{text}"',
    'A retro arcade screen flashing "{text}"',
    'A postcard of a seaside town with "{text}" printed in the corner',
    'A bakery box tied with string and stamped "{text}"',
    'A ticket stub for an event called "{text}"',
    'A small flag fluttering in the wind with "{text}" stitched on it',
    'A bus stop poster that reads "{text}" in large letters',
    'A candle in a glass jar with a label reading "{text}"',
)

ADJECTIVES = (
    "amber", "ancient", "arctic", "autumn", "azure", "bold", "brave", "bright", "broken", "bronze", "busy",
    "calm", "clever", "cobalt", "cosmic", "cozy", "crimson", "crispy", "curious", "daring", "dusty", "eager",
    "electric", "emerald", "endless", "fancy", "floating", "foggy", "frosty", "gentle", "giant", "gilded",
    "glowing", "golden", "grand", "hidden", "hollow", "humble", "icy", "idle", "ivory", "jolly", "kind",
    "lazy", "little", "lonely", "loud", "lucky", "lunar", "magic", "marble", "mellow", "merry", "midnight",
    "misty", "modern", "noble", "northern", "odd", "orange", "pale", "patient", "polar", "proud", "purple",
    "quiet", "rapid", "rosy", "royal", "rusty", "salty", "scarlet", "secret", "shiny", "silent", "silver",
    "sleepy", "smoky", "snowy", "solar", "spicy", "steady", "stormy", "sunny", "swift", "tidy", "tiny",
    "twin", "velvet", "violet", "wandering", "wild", "windy", "wise", "wooden", "young", "zesty",
)

NOUNS = (
    "acorn", "anchor", "apple", "arrow", "atlas", "badger", "bakery", "balloon", "banjo", "barn", "basket",
    "beacon", "bicycle", "biscuit", "blossom", "boat", "bookshop", "bridge", "bucket", "bunny", "butter",
    "cabin", "cactus", "camel", "candle", "canyon", "castle", "cellar", "cherry", "chimney", "clock",
    "cloud", "clover", "comet", "compass", "cookie", "cottage", "crane", "cricket", "crown", "cupcake",
    "daisy", "desert", "dolphin", "donkey", "dragon", "drum", "eagle", "ember", "falcon", "feather", "fern",
    "ferry", "fiddle", "forest", "fox", "garden", "garage", "glacier", "goat", "gravel", "guitar", "hammer",
    "harbor", "hedgehog", "heron", "hill", "honey", "island", "jasmine", "kettle", "kitchen", "kite",
    "ladder", "lagoon", "lantern", "lemon", "library", "lighthouse", "lily", "llama", "lobster", "lotus",
    "mango", "maple", "market", "meadow", "mill", "mitten", "monkey", "moose", "mountain", "muffin",
    "noodle", "nutmeg", "oak", "oasis", "orchard", "otter", "owl", "paddle", "pancake", "panda", "parrot",
    "peach", "pebble", "pelican", "pepper", "pickle", "pier", "pine", "pizza", "planet", "plum", "pony",
    "pretzel", "pumpkin", "quilt", "rabbit", "radio", "raven", "reef", "ribbon", "river", "robot", "rocket",
    "saddle", "sailboat", "salmon", "sparrow", "spoon", "squirrel", "station", "studio", "sunflower",
    "teapot", "thistle", "tiger", "toast", "tortoise", "tower", "tram", "tulip", "tunnel", "turtle",
    "valley", "violin", "walrus", "waffle", "whale", "willow", "window", "wolf", "workshop", "zebra",
)

VERBS = (
    "adopt", "bake", "build", "catch", "chase", "climb", "collect", "cook", "count", "draw", "feed", "find",
    "fix", "fold", "follow", "grow", "guard", "hug", "juggle", "launch", "mend", "paint", "plant", "pour",
    "race", "read", "rescue", "ride", "sail", "save", "share", "sketch", "spot", "steer", "stir", "swap",
    "tame", "taste", "trade", "visit", "wake", "wash", "watch", "wrap",
)

CONNECTORS = ("&", "and", "of the", "for", "by the")

_NUMBERS = tuple(range(2, 100))


@dataclass(frozen=True)
class GeneratedPrompt:
    text: str
    target: str
    """The quoted phrase of ``text``."""


def _plural(noun: str) -> str:
    if noun == "wolf":
        return "wolves"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _phrase(rng: random.Random) -> str:
    adjective, noun, other, verb = (rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS),
                                    rng.choice(VERBS))
    patterns = (
        f"{adjective} {noun}",
        f"the {adjective} {noun}",
        f"{adjective} {noun} {other}",
        f"{noun} {other}",
        f"{verb} the {noun}",
        f"{verb} {_plural(noun)}",
        f"{noun} {rng.choice(CONNECTORS)} {other}",
        f"{noun} {rng.choice(_NUMBERS)}",
        f"{adjective} {noun} {rng.choice(_NUMBERS)}",
    )
    return rng.choice(patterns)


def _write(phrase: str, rng: random.Random) -> str:
    if rng.random() < 0.35:
        return phrase.upper()
    small = {"the", "of", "and", "for", "by"}
    words = phrase.split()
    return " ".join(w if (k and w in small) or not w[0].isalpha() else w.capitalize() for k, w in enumerate(words))


def generate_prompts(count: int, seed: int = 0) -> list[GeneratedPrompt]:
    """``count`` distinct prompts; the same ``seed`` gives the same list, in the same order."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(seed)
    prompts, seen = [], set()
    for _ in range(50 * count + 100):
        if len(prompts) == count:
            break
        target = _write(_phrase(rng), rng)
        text = rng.choice(TEMPLATES).format(text=target)
        if text not in seen:
            seen.add(text)
            prompts.append(GeneratedPrompt(text, target))
    if len(prompts) < count:
        raise ValueError(f"could not generate {count} distinct prompts")
    return prompts
