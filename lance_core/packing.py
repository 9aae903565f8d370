"""Interleaved multi-task samples and the packed batch: the contract between data and model.

A :class:`Sample` is a list of :class:`Span` objects laid out with Qwen's chat template (MODEL.md,
"Sequence layout"). :func:`pack_samples` concatenates samples into one flat :class:`PackedBatch`; every
per-token field is a tensor of length L (the packed length), so the model never loops over samples.

PackedBatch fields (L tokens, S spans, V VAE tokens, U ViT tokens):

===================  ==========  ====================================================================
field                shape       meaning
===================  ==========  ====================================================================
input_ids            (L,)        text id, or the image/video pad id at visual tokens
is_gen               (L,)        True = GEN expert (VAE tokens), False = UND expert (text, ViT)
token_kind           (L,)        TEXT / VIT / VAE_CLEAN / VAE_NOISY
position_ids         (3, L)      (t, h, w) mRoPE ids, MaPE applied per sample
sample_index         (L,)        packed sample of the token (padding: its own index past the samples)
span_index           (L,)        global span of the token; spans are contiguous and ordered
span_bidirectional   (L,)        span mode is ``full`` or ``noise`` (bidirectional inside)
span_noise           (L,)        span mode is ``noise``: no token outside the span may attend to it
ce_labels            (L,)        next-token target predicted at this position, -100 = no CE loss
mse_mask             (L,)        flow-matching target token (noisy, not a clean i2v frame)
target_index         (L,)        noisy target clip of the token (one timestep per clip), -1 otherwise
task_index           (L,)        index into TASKS of the token's sample (-1 = padding)
vae_positions        (V,)        token index of each VAE token, in sequence order
vae_latents          (V, C)      clean latents x0 of those tokens (normalised, C = 48)
vae_grid             (V, 3)      (frame, row, column) of each VAE token in its latent grid
vit_positions        (U,)        token index of each ViT token
vit_features         (U, D)      ViT features (D = hidden size) placed at those tokens
===================  ==========  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Iterator, Literal

import torch

from .positions import Role, SpanPosition, position_ids
from .tokenizer import TextTokenizer, chat_turn

TASKS = ("t2i", "t2v", "i2v", "i2i", "v2v", "i2t", "v2t", "subject")
GENERATION_TASKS = ("t2i", "t2v", "i2v", "i2i", "v2v", "subject")
UNDERSTANDING_TASKS = ("i2t", "v2t")

TASK_SYSTEM_PROMPTS = {
    "t2i": "You are a helpful assistant that generates an image from the user's description.",
    "t2v": "You are a helpful assistant that generates a video from the user's description.",
    "i2v": "You are a helpful assistant that animates the given first frame into a video following the user's description.",
    "i2i": "You are a helpful assistant that edits the given image following the user's instruction.",
    "v2v": "You are a helpful assistant that edits the given video following the user's instruction.",
    "subject": "You are a helpful assistant that generates an image of the given subjects following the user's description.",
    "i2t": "You are a helpful assistant.",
    "v2t": "You are a helpful assistant.",
}

TEXT, VIT, VAE_CLEAN, VAE_NOISY = 0, 1, 2, 3
IGNORE_INDEX = -100
SpanMode = Literal["causal", "full", "noise"]


@dataclass
class Span:
    """A contiguous run of one kind of token inside a sample."""

    mode: SpanMode
    role: Role
    token_ids: torch.Tensor
    """(n,) text ids, or the pad id for visual tokens."""
    grid: tuple[int, int, int] | None = None
    latents: torch.Tensor | None = None
    """(n, C) clean VAE latents for VAE spans."""
    vit_features: torch.Tensor | None = None
    """(n, D) ViT features for ViT spans."""
    ce_targets: torch.Tensor | None = None
    """(n,) bool: text tokens that are CE targets (predicted from the token before them)."""
    clean_frames: int = 0
    """Noise spans: leading latent frames kept clean (t = 0, no loss), the i2v first frame."""

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    @property
    def is_gen(self) -> bool:
        return self.latents is not None

    @property
    def kind(self) -> int:
        if self.latents is not None:
            return VAE_NOISY if self.mode == "noise" else VAE_CLEAN
        return VIT if self.vit_features is not None else TEXT


@dataclass
class Sample:
    task: str
    spans: list[Span]
    key: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.spans)

    @property
    def has_gen(self) -> bool:
        return any(s.is_gen for s in self.spans)

    def span_positions(self, temporal_step: float) -> list[SpanPosition]:
        return [SpanPosition(len(s), s.role, s.grid, temporal_step) for s in self.spans]


# ---------------------------------------------------------------------------------------------- builders


class _SpanBuilder:
    """Collects text pieces and visual spans; adjacent text pieces merge into one causal span."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tok = tokenizer
        self.spans: list[Span] = []
        self._ids: list[int] = []
        self._ce: list[bool] = []

    def text(self, text: str, ce: bool = False) -> "_SpanBuilder":
        ids = self.tok.encode(text)
        self._ids += ids
        self._ce += [ce] * len(ids)
        return self

    def _flush(self) -> None:
        if self._ids:
            ce = torch.tensor(self._ce, dtype=torch.bool)
            self.spans.append(Span("causal", "text", torch.tensor(self._ids), ce_targets=ce))
        self._ids, self._ce = [], []

    def vit(self, features: torch.Tensor, grid: tuple[int, int, int], video: bool) -> "_SpanBuilder":
        special = self.tok.special
        pad = special.video_pad if video else special.image_pad
        self.text("<|vision_start|>")._flush()
        n = features.shape[0]
        self.spans.append(Span("full", "vit", torch.full((n,), pad), grid=grid, vit_features=features))
        return self.text("<|vision_end|>")

    def vae(self, latents: torch.Tensor, role: Role, noisy: bool, clean_frames: int = 0, close: bool = True):
        """``latents`` is (T', H', W', C); it becomes T'·H'·W' tokens in raster order."""
        frames, height, width, channels = latents.shape
        self.text("<|vision_start|>")._flush()
        span = Span(
            "noise" if noisy else "full", role, torch.full((frames * height * width,), self.tok.special.video_pad),
            grid=(frames, height, width), latents=latents.reshape(-1, channels), clean_frames=clean_frames,
        )
        self.spans.append(span)
        return self.text("<|vision_end|>") if close else self

    def build(self) -> list[Span]:
        self._flush()
        return self.spans


@dataclass
class VisualInput:
    """A conditioning visual: latents (T', H', W', C) and/or ViT features (N, D) with their grid."""

    latents: torch.Tensor | None = None
    vit_features: torch.Tensor | None = None
    vit_grid: tuple[int, int, int] | None = None
    is_video: bool = False


def build_generation_sample(
    tokenizer: TextTokenizer,
    task: str,
    caption: str,
    target: torch.Tensor,
    *,
    source: VisualInput | None = None,
    references: Iterable[VisualInput] = (),
    first_frame_clean: bool = False,
    system: str | None = None,
    key: str = "",
) -> Sample:
    """t2i / t2v / i2v / i2i / v2v / subject: ``[system][user: conditions | caption][assistant: noisy target]``.

    The noisy target is the last span: nothing may attend to it, so the closing tokens are left out.
    An empty caption gives the unconditional sequence used for classifier-free guidance.
    """
    if task not in GENERATION_TASKS:
        raise ValueError(f"task {task!r} is not a generation task; allowed: {', '.join(GENERATION_TASKS)}")
    b = _SpanBuilder(tokenizer)
    b.text(chat_turn("system", system or TASK_SYSTEM_PROMPTS[task]) + "<|im_start|>user\n")
    for ref in references:
        if ref.vit_features is not None:
            b.vit(ref.vit_features, ref.vit_grid, ref.is_video)
        if ref.latents is not None:
            b.vae(ref.latents, "reference", noisy=False)
    if source is not None:
        if source.vit_features is not None:
            b.vit(source.vit_features, source.vit_grid, source.is_video)
        if source.latents is not None:
            b.vae(source.latents, "source", noisy=False)
    b.text(caption + "<|im_end|>\n<|im_start|>assistant\n")
    b.vae(target, "target", noisy=True, clean_frames=1 if first_frame_clean else 0, close=False)
    return Sample(task, b.build(), key)


def build_understanding_sample(
    tokenizer: TextTokenizer,
    task: str,
    media: VisualInput,
    question: str,
    answer: str | None,
    *,
    system: str | None = None,
    key: str = "",
) -> Sample:
    """i2t / v2t: ``[system][user: ViT(media) | question][assistant: answer]``; CE on the answer and
    its closing ``<|im_end|>``. ``answer=None`` stops after the assistant header (inference prompt)."""
    if task not in UNDERSTANDING_TASKS:
        raise ValueError(f"task {task!r} is not an understanding task; allowed: {', '.join(UNDERSTANDING_TASKS)}")
    if media.vit_features is None or media.vit_grid is None:
        raise ValueError("understanding samples need ViT features and their grid")
    b = _SpanBuilder(tokenizer)
    b.text(chat_turn("system", system or TASK_SYSTEM_PROMPTS[task]) + "<|im_start|>user\n")
    b.vit(media.vit_features, media.vit_grid, media.is_video)
    b.text(question + "<|im_end|>\n<|im_start|>assistant\n")
    if answer is not None:
        b.text(answer + "<|im_end|>", ce=True)
    return Sample(task, b.build(), key)


# ---------------------------------------------------------------------------------------------- packing


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    is_gen: torch.Tensor
    token_kind: torch.Tensor
    position_ids: torch.Tensor
    sample_index: torch.Tensor
    span_index: torch.Tensor
    span_bidirectional: torch.Tensor
    span_noise: torch.Tensor
    ce_labels: torch.Tensor
    mse_mask: torch.Tensor
    target_index: torch.Tensor
    task_index: torch.Tensor
    vae_positions: torch.Tensor
    vae_latents: torch.Tensor
    vae_grid: torch.Tensor
    vit_positions: torch.Tensor
    vit_features: torch.Tensor
    num_targets: int = 0
    num_samples: int = 0
    num_real_tokens: int = 0
    sample_tasks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PackedBatch":
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                changes[f.name] = value.to(device=device, dtype=cast)
        return replace(self, **changes)

    def token_slice(self, start: int, stop: int) -> "PackedBatch":
        """Tokens [start, stop) as a batch of their own (used to split a prefix from a noisy span)."""
        per_token = {
            f.name: getattr(self, f.name)[..., start:stop]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor) and getattr(self, f.name).shape[-1:] == (len(self),)
            and f.name not in ("vae_positions", "vit_positions")
        }
        vae_keep = (self.vae_positions >= start) & (self.vae_positions < stop)
        vit_keep = (self.vit_positions >= start) & (self.vit_positions < stop)
        return replace(
            self, **per_token,
            vae_positions=self.vae_positions[vae_keep] - start, vae_latents=self.vae_latents[vae_keep],
            vae_grid=self.vae_grid[vae_keep],
            vit_positions=self.vit_positions[vit_keep] - start, vit_features=self.vit_features[vit_keep],
            num_real_tokens=int((per_token["task_index"] >= 0).sum()),
        )


def _latent_grid_coords(grid: tuple[int, int, int]) -> torch.Tensor:
    frames, height, width = grid
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def pack_samples(
    samples: list[Sample],
    *,
    mape: bool = True,
    temporal_step: float = 2.0,
    pad_to: int | None = None,
    pad_id: int = 0,
    latent_channels: int = 48,
    vit_dim: int | None = None,
) -> PackedBatch:
    """Concatenate samples into one :class:`PackedBatch`, padding with isolated tokens to ``pad_to``."""
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "input_ids", "is_gen", "token_kind", "position_ids", "sample_index", "span_index", "span_bidirectional",
        "span_noise", "ce_labels", "mse_mask", "target_index", "task_index")}
    vae_pos, vae_lat, vae_grid, vit_pos, vit_feat = [], [], [], [], []
    offset = span_counter = target_counter = 0
    for sample_no, sample in enumerate(samples):
        if sample.task not in TASKS:
            raise ValueError(f"unknown task {sample.task!r}; allowed: {', '.join(TASKS)}")
        pos = position_ids(sample.span_positions(temporal_step), mape=mape)
        cols["position_ids"].append(pos)
        ids = torch.cat([s.token_ids for s in sample.spans])
        labels = torch.full_like(ids, IGNORE_INDEX)
        ce_flags = torch.cat([s.ce_targets if s.ce_targets is not None else torch.zeros(len(s), dtype=torch.bool)
                              for s in sample.spans])
        labels[:-1][ce_flags[1:]] = ids[1:][ce_flags[1:]]
        cols["input_ids"].append(ids)
        cols["ce_labels"].append(labels)
        cols["task_index"].append(torch.full_like(ids, TASKS.index(sample.task)))
        cols["sample_index"].append(torch.full_like(ids, sample_no))
        local = 0
        for span in sample.spans:
            n = len(span)
            cols["is_gen"].append(torch.full((n,), span.is_gen))
            kind = torch.full((n,), span.kind, dtype=torch.int8)
            mse = torch.zeros(n, dtype=torch.bool)
            target = torch.full((n,), -1, dtype=torch.long)
            if span.kind == VAE_NOISY:
                clean = span.clean_frames * span.grid[1] * span.grid[2]
                kind[:clean] = VAE_CLEAN
                mse[clean:] = True
                target[clean:] = target_counter
                target_counter += 1
            cols["token_kind"].append(kind)
            cols["mse_mask"].append(mse)
            cols["target_index"].append(target)
            cols["span_index"].append(torch.full((n,), span_counter))
            cols["span_bidirectional"].append(torch.full((n,), span.mode != "causal"))
            cols["span_noise"].append(torch.full((n,), span.mode == "noise"))
            if span.latents is not None:
                vae_pos.append(torch.arange(offset + local, offset + local + n))
                vae_lat.append(span.latents.float())
                vae_grid.append(_latent_grid_coords(span.grid))
            if span.vit_features is not None:
                vit_pos.append(torch.arange(offset + local, offset + local + n))
                vit_feat.append(span.vit_features.float())
            span_counter += 1
            local += n
        offset += local
    real = offset
    if pad_to is not None:
        if real > pad_to:
            raise ValueError(f"{real} tokens do not fit the pack size {pad_to}")
        _append_padding(cols, pad_to - real, len(samples), span_counter, pad_id)
    vit_dim = vit_dim or (vit_feat[0].shape[1] if vit_feat else 1)
    return PackedBatch(
        input_ids=torch.cat(cols["input_ids"]).long(),
        is_gen=torch.cat(cols["is_gen"]).bool(),
        token_kind=torch.cat(cols["token_kind"]),
        position_ids=torch.cat(cols["position_ids"], dim=1).long(),
        sample_index=torch.cat(cols["sample_index"]).long(),
        span_index=torch.cat(cols["span_index"]).long(),
        span_bidirectional=torch.cat(cols["span_bidirectional"]).bool(),
        span_noise=torch.cat(cols["span_noise"]).bool(),
        ce_labels=torch.cat(cols["ce_labels"]).long(),
        mse_mask=torch.cat(cols["mse_mask"]),
        target_index=torch.cat(cols["target_index"]),
        task_index=torch.cat(cols["task_index"]).long(),
        vae_positions=torch.cat(vae_pos) if vae_pos else torch.zeros(0, dtype=torch.long),
        vae_latents=torch.cat(vae_lat) if vae_lat else torch.zeros(0, latent_channels),
        vae_grid=torch.cat(vae_grid) if vae_grid else torch.zeros(0, 3, dtype=torch.long),
        vit_positions=torch.cat(vit_pos) if vit_pos else torch.zeros(0, dtype=torch.long),
        vit_features=torch.cat(vit_feat) if vit_feat else torch.zeros(0, vit_dim),
        num_targets=target_counter,
        num_samples=len(samples),
        num_real_tokens=real,
        sample_tasks=[s.task for s in samples],
    )


def _append_padding(cols: dict[str, list[torch.Tensor]], n: int, sample_no: int, span_no: int, pad_id: int) -> None:
    if n <= 0:
        return
    cols["input_ids"].append(torch.full((n,), pad_id))
    cols["position_ids"].append(torch.arange(n).expand(3, -1))
    cols["ce_labels"].append(torch.full((n,), IGNORE_INDEX))
    cols["task_index"].append(torch.full((n,), -1))
    cols["sample_index"].append(torch.full((n,), sample_no))
    cols["is_gen"].append(torch.zeros(n, dtype=torch.bool))
    cols["token_kind"].append(torch.full((n,), TEXT, dtype=torch.int8))
    cols["mse_mask"].append(torch.zeros(n, dtype=torch.bool))
    cols["target_index"].append(torch.full((n,), -1, dtype=torch.long))
    cols["span_index"].append(torch.full((n,), span_no))
    cols["span_bidirectional"].append(torch.ones(n, dtype=torch.bool))
    cols["span_noise"].append(torch.zeros(n, dtype=torch.bool))


class TokenBudgetPacker:
    """Greedy packing under a token budget with a small carry-over buffer.

    Samples that do not fit the current pack wait in the buffer and are tried first for the next one;
    samples longer than the budget can never fit and are counted in ``skipped``.
    """

    def __init__(self, token_budget: int, buffer_size: int = 16) -> None:
        self.token_budget = token_budget
        self.buffer_size = buffer_size
        self.buffer: list[Sample] = []
        self.skipped = 0

    def packs(self, samples: Iterable[Sample]) -> Iterator[list[Sample]]:
        current: list[Sample] = []
        used = 0
        for sample in samples:
            if sample.num_tokens > self.token_budget:
                self.skipped += 1
                continue
            if used + sample.num_tokens <= self.token_budget:
                current.append(sample)
                used += sample.num_tokens
                continue
            self.buffer.append(sample)
            if len(self.buffer) >= self.buffer_size:
                yield current
                current, used = self._refill()
        while current or self.buffer:
            if current:
                yield current
            current, used = self._refill()

    def _refill(self) -> tuple[list[Sample], int]:
        current, used, waiting = [], 0, []
        for sample in self.buffer:
            if used + sample.num_tokens <= self.token_budget:
                current.append(sample)
                used += sample.num_tokens
            else:
                waiting.append(sample)
        self.buffer = waiting
        return current, used
