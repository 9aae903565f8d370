"""Evaluation during training (pipelines/train/evaluate.py) off the training path: the latents are generated
in the step (every rank takes part under ZeRO-3), but rank 0 decodes them into pictures on a thread of its
own, on the training device in the training dtype, while the ranks go on; and packs for a GPU come pinned."""

from __future__ import annotations

import threading

import torch

from lance_core.config import model_preset
from lance_core.model import build_model
from lance_core.packing import pack_samples
from lance_core.synthetic import synthetic_mix
from lance_core.tokenizer import ByteTokenizer
from pipelines.train.config import EvalSection
from pipelines.train.evaluate import SampleWriter


class _NoHeldOut:
    rows: dict = {}


def test_pictures_are_decoded_off_the_training_path(tmp_path, monkeypatch):
    cfg = model_preset("tiny")
    writer = SampleWriter(cfg, ByteTokenizer(), _NoHeldOut(), EvalSection(sampling_steps=2), "cpu", torch.bfloat16)
    assert writer.vae().dtype == torch.bfloat16  # the VAE runs in the training dtype on the training device
    release, decoding = threading.Event(), []
    original = writer._frame_strip

    def slow_decode(latents):
        decoding.append(threading.current_thread().name)
        release.wait(timeout=60)
        return original(latents)

    monkeypatch.setattr(writer, "_frame_strip", slow_decode)
    model = build_model(cfg).eval()
    result = writer.write(model, 3, tmp_path / "samples", seed=0)  # returns while the decoder waits
    assert result["image_prompt"] and not (tmp_path / "samples" / "step0000003_image.png").exists()
    release.set()
    writer.close()  # waits for the pictures
    assert (tmp_path / "samples" / "step0000003_image.png").is_file()
    assert (tmp_path / "samples" / "step0000003.json").is_file()
    assert decoding and all(name.startswith("sample-decoder") for name in decoding)


def test_packs_for_a_gpu_are_pinned_and_copied_without_blocking(monkeypatch):
    cfg = model_preset("tiny")
    batch = pack_samples(synthetic_mix(ByteTokenizer(), cfg), cfg)
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self.clone())
    copied = batch.pin_memory()
    assert len(pinned) == sum(isinstance(v, torch.Tensor) for v in vars(batch).values())
    calls = []
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    copied.to("cpu", non_blocking=True)
    assert calls and all(calls)
