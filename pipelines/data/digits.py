"""``lance synth digits DIR``: real handwritten digits as a dataset, for showing that the whole system learns.

The data is UCI's optical recognition of handwritten digits as scikit-learn ships it inside its wheel
(``sklearn.datasets.load_digits``: 1,797 images of 8x8 pixels, 16 grey levels, written by 43 people; no
download). Each image is written as a real file, upscaled (bilinear) to ``size`` pixels, white ink on black,
RGB. A fixed split holds out every ``holdout_every``-th image of each digit (by its index among that
digit's images), so the held-out share is the same for every digit and the same on every run.

Written under DIR:

- ``images/{train,heldout}/NNNN_D.png``: the images (NNNN its index in the dataset, D the digit);
- ``train.jsonl`` / ``heldout.jsonl``: rows ``{"image", "digit", "caption"}`` (``image`` relative to DIR);
- ``parquet/t2i.parquet`` (``caption, image_bytes``) and ``parquet/i2t.parquet`` (``image_bytes, caption_i,
  caption_q, caption_a``): the training split in the Lance release's Parquet layouts, for ``lance precompute``;
- ``heldout_parquet/i2t.parquet``: the held-out images in the i2t layout (their answers are the truth to
  judge by, never trained on), so that their ViT features come out of the same precompute;
- ``prompts/grpo_train.jsonl`` / ``prompts/grpo_eval.jsonl``: prompts ``{"prompt", "target"}`` for GRPO, each
  digit in both, with disjoint phrasings (the evaluation phrasings are never trained on by GRPO);
- ``judge.joblib`` and ``judge.json``: an independent judge, a scikit-learn classifier (an RBF SVM with
  calibrated probabilities) of the training split's real images (grey, [0, 1], flattened), and its accuracy on
  the held-out real images. It scores generated digits and is the GRPO classifier reward's model.

Captions name the digit in several phrasings (as a word or a numeral), so the text is not a fixed string.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = (
    "a handwritten digit {word}",
    "the number {digit}, written by hand",
    "handwritten {digit} in white ink",
    "a {word} drawn by hand on black",
)
GRPO_TRAIN_PHRASINGS = (0, 1)
GRPO_EVAL_PHRASINGS = (2, 3)
QUESTION = "Which digit is written here?"
INSTRUCTION = "Describe the image."


def caption(digit: int, phrasing: int) -> str:
    return PHRASINGS[phrasing].format(word=DIGIT_WORDS[digit], digit=digit)


def names_digit(text: str, digit: int) -> bool:
    """Whether ``text`` names ``digit`` (as a numeral or a word) and no other digit: how a caption is judged."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    named = {d for d in range(10) if str(d) in words or DIGIT_WORDS[d] in words}
    return named == {digit}


def load_digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size) uint8 images (white ink on black) and (N,) digits of scikit-learn's bundled set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("lance synth digits needs scikit-learn (it ships the dataset): "
                          "pip install 'lance-train[demo]' or pip install scikit-learn") from err
    data = load_digits()
    images = np.stack([np.asarray(Image.fromarray((image * (255 / 16)).round().astype(np.uint8))
                                  .resize((size, size), Image.BILINEAR)) for image in data.images])
    return images, data.target.astype(np.int64)


def split_indexes(digits: np.ndarray, holdout_every: int) -> tuple[list[int], list[int]]:
    """(train, held-out) dataset indexes: every ``holdout_every``-th image of each digit is held out."""
    train, heldout = [], []
    seen = [0] * 10
    for index, digit in enumerate(digits.tolist()):
        (heldout if seen[digit] % holdout_every == 0 else train).append(index)
        seen[digit] += 1
    return train, heldout


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(image[..., None], 3, axis=-1)).save(buffer, format="PNG")
    return buffer.getvalue()


def train_judge(images: np.ndarray, digits: np.ndarray, train: list[int], heldout: list[int], path: Path) -> float:
    """The judge, fitted on ``train``, saved with joblib at ``path``; returns its held-out accuracy."""
    import joblib
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    flat = images.reshape(len(images), -1) / 255.0
    judge = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), ensemble=False)
    judge.fit(flat[train], digits[train].astype(str))
    joblib.dump(judge, path)
    return float(judge.score(flat[heldout], digits[heldout].astype(str)))


def _write_i2t(path: Path, images: list[bytes], answers: list[str]) -> None:
    pq.write_table(pa.table({"image_bytes": images, "caption_i": [INSTRUCTION] * len(images),
                             "caption_q": [QUESTION] * len(images), "caption_a": answers}), path)


def write_digits(root: Path, size: int = 16, holdout_every: int = 5, seed: int = 0) -> dict[str, Path]:
    """Write the dataset under ``root``; returns the paths of what it wrote, by name."""
    root = Path(root)
    images, digits = load_digit_images(size)
    train, heldout = split_indexes(digits, holdout_every)
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    for split, indexes in (("train", train), ("heldout", heldout)):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in indexes:
            digit = int(digits[index])
            path = folder / f"{index:04d}_{digit}.png"
            path.write_bytes(_png(images[index]))
            rows[split].append({"image": str(path.relative_to(root)), "digit": digit,
                                "caption": caption(digit, rng.randrange(len(PHRASINGS)))})
    for split, split_rows in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    parquet = root / "parquet"
    parquet.mkdir(exist_ok=True)
    train_rows = rows["train"]
    image_bytes = [(root / r["image"]).read_bytes() for r in train_rows]
    pq.write_table(pa.table({"caption": [r["caption"] for r in train_rows], "image_bytes": image_bytes}),
                   parquet / "t2i.parquet")
    _write_i2t(parquet / "i2t.parquet", image_bytes,
               [caption(r["digit"], rng.randrange(len(PHRASINGS))) for r in train_rows])
    heldout_parquet = root / "heldout_parquet"
    heldout_parquet.mkdir(exist_ok=True)
    _write_i2t(heldout_parquet / "i2t.parquet", [(root / r["image"]).read_bytes() for r in rows["heldout"]],
               [r["caption"] for r in rows["heldout"]])
    prompts = root / "prompts"
    prompts.mkdir(exist_ok=True)
    for name, phrasings in (("grpo_train", GRPO_TRAIN_PHRASINGS), ("grpo_eval", GRPO_EVAL_PHRASINGS)):
        lines = [json.dumps({"prompt": caption(d, p), "target": str(d)}) for p in phrasings for d in range(10)]
        (prompts / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    accuracy = train_judge(images, digits, train, heldout, root / "judge.joblib")
    (root / "judge.json").write_text(json.dumps({"model": "SVC (RBF, C=10) with calibrated probabilities",
                                                 "input": f"{size}x{size} grey in [0, 1], flattened",
                                                 "heldout_accuracy": accuracy}, indent=2))
    return {"judge": root / "judge.joblib", "train": root / "train.jsonl", "heldout": root / "heldout.jsonl", "t2i": parquet / "t2i.parquet",
            "i2t": parquet / "i2t.parquet", "heldout_i2t": heldout_parquet / "i2t.parquet",
            "grpo_train_prompts": prompts / "grpo_train.jsonl",
            "grpo_eval_prompts": prompts / "grpo_eval.jsonl"}
