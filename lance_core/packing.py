"""Interleaved multi-task samples and the packed batch: the contract between data and model.

A :class:`Sample` is a list of :class:`Span` objects laid out with Qwen's chat template (MODEL.md,
"Sequence layout"). :func:`pack_samples` concatenates samples into one flat :class:`PackedBatch`; every
per-token field is a tensor of length L (the packed length), so the model never loops over samples.
:class:`StepPacker` chooses the samples of each training step's pack under a token budget.

PackedBatch fields (L tokens, S spans, V VAE tokens, U ViT tokens):

===================  ==========  ====================================================================
field                shape       meaning
===================  ==========  ====================================================================
input_ids            (L,)        text id, or the image/video pad id at visual tokens
is_gen               (L,)        True = GEN expert (VAE tokens), False = UND expert (text, markers, ViT)
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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch

from .config import ModelConfig
from .positions import Role, SpanPosition, position_ids
from .prompts import description_system_prompt, generation_system_prompt
from .tokenizer import TextTokenizer, chat_turn

TASKS = ("t2i", "t2v", "i2v", "i2i", "v2v", "i2t", "v2t", "subject")
GENERATION_TASKS = ("t2i", "t2v", "i2v", "i2i", "v2v", "subject")
UNDERSTANDING_TASKS = ("i2t", "v2t")

TEXT, VIT, VAE_CLEAN, VAE_NOISY = 0, 1, 2, 3
IGNORE_INDEX = -100
MAX_CONSECUTIVE_SKIPS = 1000
"""Samples (or rows) in a row that may be unusable before packing gives up with a clear error."""
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
    bracketed: bool = False
    """Visual spans: the first and last tokens are ``<|vision_start|>`` / ``<|vision_end|>``. They belong
    to the span (its attention mode and MaPE shift) but stay UND text tokens; ``latents`` and
    ``vit_features`` cover the tokens between them."""

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    @property
    def markers(self) -> int:
        """Tokens before the visual tokens (one vision-start marker, or none)."""
        return 1 if self.bracketed else 0

    @property
    def visual_tokens(self) -> int:
        return len(self) - 2 * self.markers

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
        return [SpanPosition(len(s), s.role, s.grid, temporal_step, s.bracketed) for s in self.spans]


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

    def _visual(self, n: int, **span_fields) -> Span:
        special = self.tok.special
        # the release renders images and videos alike with <|video_pad|>
        ids = torch.tensor([special.vision_start] + [special.video_pad] * n + [special.vision_end])
        return Span(token_ids=ids, bracketed=True, **span_fields)

    def vit(self, features: torch.Tensor, grid: tuple[int, int, int]) -> "_SpanBuilder":
        self._flush()
        self.spans.append(self._visual(features.shape[0], mode="full", role="vit", grid=grid,
                                       vit_features=features))
        return self

    def vae(self, latents: torch.Tensor, role: Role, noisy: bool, clean_frames: int = 0) -> "_SpanBuilder":
        """``latents`` is (T', H', W', C); it becomes T'·H'·W' tokens in raster order."""
        frames, height, width, channels = latents.shape
        self._flush()
        self.spans.append(self._visual(
            frames * height * width, mode="noise" if noisy else "full", role=role, grid=(frames, height, width),
            latents=latents.reshape(-1, channels), clean_frames=clean_frames,
        ))
        return self

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


def _is_video_target(task: str, target: torch.Tensor) -> bool:
    return task in ("t2v", "i2v", "v2v") or (task == "subject" and target.shape[0] > 1)


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
    """t2i / t2v / i2v / i2i / v2v / subject:
    ``[system][user: conditions | caption][assistant: <vs> noisy target <ve>]<|im_end|>``.

    Every visual condition is a ViT span and/or a clean VAE span, each bracketed by its vision markers.
    The closing ``<|im_end|>`` after the target sees everything but the target (the noise mode), as in the
    release. An empty caption gives the unconditional sequence used for classifier-free guidance. The
    caption is stripped of leading and trailing whitespace, as precompute stores it; an older shard that
    holds it unstripped gives the same tokens.
    """
    if task not in GENERATION_TASKS:
        raise ValueError(f"task {task!r} is not a generation task; allowed: {', '.join(GENERATION_TASKS)}")
    b = _SpanBuilder(tokenizer)
    system = system or generation_system_prompt(task, _is_video_target(task, target))
    b.text(chat_turn("system", system) + "<|im_start|>user\n")
    for ref in references:
        if ref.vit_features is not None:
            b.vit(ref.vit_features, ref.vit_grid)
        if ref.latents is not None:
            b.vae(ref.latents, "reference", noisy=False)
    if source is not None:
        if source.vit_features is not None:
            b.vit(source.vit_features, source.vit_grid)
        if source.latents is not None:
            b.vae(source.latents, "source", noisy=False)
    b.text(caption.strip() + "<|im_end|>\n<|im_start|>assistant\n")
    b.vae(target, "target", noisy=True, clean_frames=1 if first_frame_clean else 0)
    b.text("<|im_end|>")
    return Sample(task, b.build(), key)


def build_understanding_sample(
    tokenizer: TextTokenizer,
    task: str,
    media: VisualInput | Sequence[VisualInput],
    question: str,
    answer: str | None,
    *,
    system: str | None = None,
    key: str = "",
) -> Sample:
    """i2t / v2t: ``[system][user: ViT(media)... | question][assistant: answer]``; CE on the answer and
    its closing ``<|im_end|>``. ``answer=None`` stops after the assistant header (inference prompt).
    Without a ``system`` instruction the sample gets a released description prompt (chosen by ``key``
    when the sample is a training one, i.e. has an answer). The question and the answer are stripped of
    leading and trailing whitespace, as the caption of a generation sample."""
    if task not in UNDERSTANDING_TASKS:
        raise ValueError(f"task {task!r} is not an understanding task; allowed: {', '.join(UNDERSTANDING_TASKS)}")
    items = [media] if isinstance(media, VisualInput) else list(media)
    if not items or any(item.vit_features is None or item.vit_grid is None for item in items):
        raise ValueError("understanding samples need ViT features and their grid")
    if system is None:
        video = task == "v2t" or any(item.is_video for item in items)
        system = description_system_prompt(video, key if answer is not None else None)
    b = _SpanBuilder(tokenizer)
    b.text(chat_turn("system", system) + "<|im_start|>user\n")
    for item in items:
        b.vit(item.vit_features, item.vit_grid)
    b.text(question.strip() + "<|im_end|>\n<|im_start|>assistant\n")
    if answer is not None:
        b.text(answer.strip() + "<|im_end|>", ce=True)
    return Sample(task, b.build(), key)


# ---------------------------------------------------------------------------------------------- packing


PER_VISUAL_TOKEN = ("vae_positions", "vae_latents", "vae_grid", "vit_positions", "vit_features")
"""The :class:`PackedBatch` tensors with a row per VAE or ViT token (not per token of the pack)."""


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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "PackedBatch":
        """``non_blocking``: the host-to-device copies overlap the host's work when the batch is pinned
        (:meth:`pin_memory`)."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                changes[f.name] = value.to(device=device, dtype=cast, non_blocking=non_blocking)
        return replace(self, **changes)

    def pin_memory(self) -> "PackedBatch":
        """The batch in page-locked host memory, so that a copy to the GPU can run asynchronously."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def token_slice(self, start: int, stop: int) -> "PackedBatch":
        """Tokens [start, stop) as a batch of their own (used to split a prefix from a noisy span)."""
        per_token = {
            f.name: getattr(self, f.name)[..., start:stop]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor) and f.name not in PER_VISUAL_TOKEN
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


PER_TOKEN_FIELDS = ("input_ids", "is_gen", "token_kind", "position_ids", "sample_index", "span_index",
                    "span_bidirectional", "span_noise", "ce_labels", "mse_mask", "target_index", "task_index")
VISUAL_FIELDS = ("vae_positions", "vae_latents", "vae_grid", "vit_positions", "vit_features")


def pack_samples(samples: list[Sample], cfg: ModelConfig, *, pad_to: int | None = None,
                 pad_id: int = 0) -> PackedBatch:
    """Concatenate samples into one :class:`PackedBatch`, padding with isolated tokens to ``pad_to``.

    ``cfg`` gives MaPE, the mRoPE temporal step and the widths of the latent and ViT features."""
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in PER_TOKEN_FIELDS + VISUAL_FIELDS}
    offset = span_counter = target_counter = 0
    for sample_no, sample in enumerate(samples):
        if sample.task not in TASKS:
            raise ValueError(f"unknown task {sample.task!r}; allowed: {', '.join(TASKS)}")
        _append_sample(cols, sample, sample_no, cfg)
        for span in sample.spans:
            target_counter = _append_span(cols, span, offset, span_counter, target_counter)
            span_counter += 1
            offset += len(span)
    if pad_to is not None:
        if offset > pad_to:
            raise ValueError(f"{offset} tokens do not fit the pack size {pad_to}")
        _append_padding(cols, pad_to - offset, len(samples), span_counter, pad_id)
    return PackedBatch(**_concat_columns(cols, cfg), num_targets=target_counter, num_samples=len(samples),
                       num_real_tokens=offset, sample_tasks=[s.task for s in samples])


def pad_batch(batch: PackedBatch, length: int, pad_id: int = 0) -> PackedBatch:
    """``batch`` with isolated padding tokens appended up to ``length`` (as ``pack_samples(pad_to=...)``)."""
    missing = length - len(batch)
    if missing < 0:
        raise ValueError(f"{len(batch)} tokens do not fit the pack size {length}")
    if missing == 0:
        return batch
    cols: dict[str, list[torch.Tensor]] = {name: [] for name in PER_TOKEN_FIELDS}
    _append_padding(cols, missing, int(batch.sample_index[-1]) + 1, int(batch.span_index[-1]) + 1, pad_id)
    padded = {}
    for name in PER_TOKEN_FIELDS:
        value = getattr(batch, name)
        padded[name] = torch.cat([value, cols[name][0].to(value.device, value.dtype)], dim=-1)
    return replace(batch, **padded)


def _append_sample(cols: dict[str, list[torch.Tensor]], sample: Sample, sample_no: int, cfg: ModelConfig) -> None:
    """The per-sample columns: mRoPE ids, token ids, next-token CE labels, task and sample index."""
    cols["position_ids"].append(position_ids(sample.span_positions(cfg.tokens_per_second), mape=cfg.mape))
    ids = torch.cat([s.token_ids for s in sample.spans])
    labels = torch.full_like(ids, IGNORE_INDEX)
    ce_flags = torch.cat([s.ce_targets if s.ce_targets is not None else torch.zeros(len(s), dtype=torch.bool)
                          for s in sample.spans])
    labels[:-1][ce_flags[1:]] = ids[1:][ce_flags[1:]]
    cols["input_ids"].append(ids)
    cols["ce_labels"].append(labels)
    cols["task_index"].append(torch.full_like(ids, TASKS.index(sample.task)))
    cols["sample_index"].append(torch.full_like(ids, sample_no))


def _append_span(cols: dict[str, list[torch.Tensor]], span: Span, first_token: int, span_no: int,
                 target_no: int) -> int:
    """The per-span columns of a span starting at token ``first_token``; returns the next target number."""
    n, lead, inner = len(span), span.markers, span.visual_tokens
    visual = slice(lead, lead + inner)
    is_gen = torch.zeros(n, dtype=torch.bool)
    is_gen[visual] = span.is_gen
    kind = torch.full((n,), TEXT, dtype=torch.int8)
    kind[visual] = span.kind
    mse = torch.zeros(n, dtype=torch.bool)
    target = torch.full((n,), -1, dtype=torch.long)
    if span.kind == VAE_NOISY:
        clean = span.clean_frames * span.grid[1] * span.grid[2]
        kind[lead:lead + clean] = VAE_CLEAN
        mse[lead + clean:lead + inner] = True
        target[lead + clean:lead + inner] = target_no
        target_no += 1
    cols["is_gen"].append(is_gen)
    cols["token_kind"].append(kind)
    cols["mse_mask"].append(mse)
    cols["target_index"].append(target)
    cols["span_index"].append(torch.full((n,), span_no))
    cols["span_bidirectional"].append(torch.full((n,), span.mode != "causal"))
    cols["span_noise"].append(torch.full((n,), span.mode == "noise"))
    _append_visual(cols, span, first_token + lead)
    return target_no


def _append_visual(cols: dict[str, list[torch.Tensor]], span: Span, first: int) -> None:
    """Token positions and features of the span's latent or ViT tokens, the first at token ``first``."""
    positions = torch.arange(first, first + span.visual_tokens)
    if span.latents is not None:
        cols["vae_positions"].append(positions)
        cols["vae_latents"].append(span.latents.float())
        cols["vae_grid"].append(_latent_grid_coords(span.grid))
    if span.vit_features is not None:
        cols["vit_positions"].append(positions)
        cols["vit_features"].append(span.vit_features.float())


def _concat_columns(cols: dict[str, list[torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The packed tensors; a visual field the pack has no token of is empty."""
    out = {name: torch.cat(cols[name], dim=-1) for name in PER_TOKEN_FIELDS}
    for name in ("input_ids", "position_ids", "sample_index", "span_index", "ce_labels", "task_index"):
        out[name] = out[name].long()
    for name in ("is_gen", "span_bidirectional", "span_noise"):
        out[name] = out[name].bool()
    empty = {"vae_positions": torch.zeros(0, dtype=torch.long), "vae_latents": torch.zeros(0, cfg.latent_channels),
             "vae_grid": torch.zeros(0, 3, dtype=torch.long), "vit_positions": torch.zeros(0, dtype=torch.long),
             "vit_features": torch.zeros(0, cfg.hidden_size)}
    out.update({name: torch.cat(cols[name]) if cols[name] else empty[name] for name in VISUAL_FIELDS})
    return out


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


class TokenBudgetError(ValueError):
    """:data:`MAX_CONSECUTIVE_SKIPS` samples in a row were longer than the token budget."""


class StepPacker:
    """One pack per call, greedy under a token budget, with a small carry-over buffer.

    Samples that do not fit the current pack wait in ``buffer`` and are tried first for the next one;
    samples longer than the budget can never fit and are counted in ``skipped``. A pack opens with a
    generation sample when ``need_generation`` (from the buffer if one waits), so that on every rank both
    experts and the latent modules run every step; then waiting samples that fit; then new samples until
    the pack is full or the buffer is full."""

    def __init__(self, token_budget: int, buffer_size: int = 16) -> None:
        self.token_budget = token_budget
        self.buffer_size = buffer_size
        self.buffer: list[Sample] = []
        self.skipped = 0

    def next_pack(self, draw: Callable[[bool], Sample], need_generation: bool) -> list[Sample]:
        """``draw(generation)`` gives the next sample (a generation sample when ``generation``)."""
        current: list[Sample] = []
        used = 0
        if need_generation:
            first = next((s for s in self.buffer if s.has_gen), None)
            if first is not None:
                self.buffer.remove(first)
            else:
                first = self._draw_fitting(draw, True)
            current, used = [first], first.num_tokens
        waiting = []
        for sample in self.buffer:
            if used + sample.num_tokens <= self.token_budget:
                current.append(sample)
                used += sample.num_tokens
            else:
                waiting.append(sample)
        self.buffer = waiting
        while used < self.token_budget and len(self.buffer) < self.buffer_size:
            sample = self._draw_fitting(draw, False)
            if used + sample.num_tokens <= self.token_budget:
                current.append(sample)
                used += sample.num_tokens
            else:
                self.buffer.append(sample)
        return current

    def _draw_fitting(self, draw: Callable[[bool], Sample], generation: bool) -> Sample:
        smallest = None
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            sample = draw(generation)
            if sample.num_tokens <= self.token_budget:
                return sample
            self.skipped += 1
            smallest = min(smallest or sample.num_tokens, sample.num_tokens)
        raise TokenBudgetError(f"{MAX_CONSECUTIVE_SKIPS} samples in a row exceed the token budget of "
                               f"{self.token_budget} (smallest {smallest} tokens)")
