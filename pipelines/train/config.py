"""Typed config of the training job (``lance train --config jobs/configs/train_<stage>.yaml``).

Every section is a :class:`StrictModel` (unknown fields are errors); :func:`load_train_config` turns a
validation failure into a :class:`ConfigError` that names the field (``train.mixture.weights``...).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lance_core.config import ConfigError, InputPath, OutputPath, StrictModel, load_config
from lance_core.flow import LossConfig
from lance_core.model.recompute import RecomputePolicy
from lance_core.model.sequence_parallel import check_sequence_parallel
from lance_core.model_section import ModelSection
from lance_core.packing import TASKS
from pipelines.runtime.deepspeed_config import CommunicationDtype
from pipelines.runtime.storage import StorageConfig

Stage = Literal["pretrain", "continual", "sft", "custom"]
FREEZABLE = ("embed_tokens", "lm_head", "und", "gen", "vae_io")
"""Module groups that can be frozen: token embedding, lm_head, the UND expert's layers, the GEN expert's
layers, the latent-token modules (vae2llm, llm2vae, time_embedder). ViT and VAE are not part of the model
(their outputs are precomputed), so they are always frozen."""


def _check_tasks(names, where: str) -> None:
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"{where}: unknown task(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(TASKS)}")


class ResolutionFilter(StrictModel):
    max_image_tokens: int | None = Field(None, gt=0)
    """Skip image targets with more latent tokens than this (768² buckets: 2,304 at 1:1, 2,352 at 4:3, 3:4)."""
    max_video_tokens: int | None = Field(None, gt=0)
    """Skip video targets with more latent tokens than this (a 6 s clip: 18 latent frames x 1,590 at 848x480,
    x 1,645 in the 4:3 and 3:4 buckets of 752x560 = 29,610)."""
    max_video_latent_frames: int | None = Field(None, gt=0)


class DataSection(StrictModel):
    uris: tuple[InputPath, ...] = ()
    """Latent shard roots (each holding ``manifest.json``), local or s3://."""
    token_budget: int = Field(4096, gt=0)
    """Real tokens of one pack, the pack of one data-parallel rank per step (released SFT: 65,536 per GPU);
    with ``scaling.sequence_parallel`` S, the S ranks of a group share one pack (budget / S tokens each)."""
    buffer_size: int = Field(16, gt=0)
    """Samples that did not fit a pack wait here and are tried first for the next one."""
    pad_to_budget: bool = False
    """Pad every pack to ``token_budget`` (static shapes for compiled attention on GPU)."""
    read_batch_rows: int = Field(32, gt=0)
    """Rows per pyarrow record batch when streaming a shard."""
    prefetch: int = Field(2, ge=1)
    """Packs built ahead of the training step by the loader thread."""
    shuffle_buffer: int = Field(64, gt=0)
    """Rows of a task each pack slot holds, read from ``shuffle_shards`` shards side by side; every draw takes a
    random one of them (a sample-level shuffle that mixes sources and buckets). 1: shard order."""
    shuffle_shards: int = Field(4, gt=0)
    """Shards a pack slot reads side by side into its shuffle buffer, per task."""
    prefetch_shards: int = Field(2, ge=0)
    """Shards of each pack slot fetched ahead of their turn by background threads (remote ones into a local
    cache folder, local ones into the page cache); 0: none."""
    global_packs: int | None = Field(None, gt=0)
    """Packs per optimizer step over all data-parallel ranks: the global batch (up to ``global_packs x
    token_budget`` tokens), whatever the worker count; each rank accumulates ``global_packs / data-parallel
    ranks`` packs (a multiple is required). The data position is kept per pack slot, so a run resumes on any
    worker count that divides it. None: one pack per rank (the global batch grows with the workers)."""
    holdout_per_task: int = Field(2, ge=0)
    """Rows per task kept out of training for the held-out loss (capability-oriented scheduling)."""
    caption_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of an empty caption (classifier-free guidance)."""
    condition_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of dropping the whole visual condition of an edit / subject sample."""
    sample_posterior: bool = False
    """Draw each VAE latent afresh every time a row is read, mean + std * eps from the posterior the shards
    store (precompute with ``encoders.store_posterior_std``), as the release samples per step; False trains
    on the posterior mean. The held-out loss always uses the mean."""
    resolution: ResolutionFilter = ResolutionFilter()
    storage: StorageConfig = StorageConfig()


class ProgressiveSchedule(StrictModel):
    """Raise the share of harder tasks over training: their weight is multiplied by a factor that grows
    linearly from 1 at ``start_step`` to ``final_multiplier`` at ``end_step``."""

    enabled: bool = False
    tasks: tuple[str, ...] = ("i2i", "v2v", "subject")
    start_step: int = Field(0, ge=0)
    end_step: int = Field(1000, gt=0)
    final_multiplier: float = Field(3.0, gt=0)


class CapabilitySchedule(StrictModel):
    """Raise the weight of tasks whose held-out loss improves least: every ``every_steps`` the held-out
    loss ratio r = L / L₀ per task moves its multiplier by exp(strength · (r − mean r))."""

    enabled: bool = False
    every_steps: int = Field(50, gt=0)
    strength: float = Field(2.0, ge=0)
    max_multiplier: float = Field(4.0, ge=1)
    """Multipliers stay within [1 / max_multiplier, max_multiplier]."""


class MixtureSection(StrictModel):
    weights: dict[str, float] = {"t2i": 1.0}
    """Task group -> weight (normalised over the tasks that have data)."""
    progressive: ProgressiveSchedule = ProgressiveSchedule()
    capability: CapabilitySchedule = CapabilitySchedule()

    @model_validator(mode="after")
    def _check(self) -> MixtureSection:
        _check_tasks(self.weights, "weights")
        _check_tasks(self.progressive.tasks, "progressive.tasks")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ValueError("weights must be >= 0 with at least one > 0")
        return self


class OptimSection(StrictModel):
    """Released SFT: AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-15, no weight decay, 500 warm-up steps then
    constant, gradient clipping 1.0."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-15, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(500, ge=0)
    decay: Literal["constant", "linear", "wsd"] = "constant"
    """After the warm-up: ``constant`` (released SFT), ``linear`` to 0 at the last step, or ``wsd`` (warm-up,
    stable, decay): the peak lr, then linear to 0 over the last ``decay_fraction`` of the steps. A wsd run
    resumed with more ``steps`` goes on at the peak lr if its decay had not begun."""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """``wsd``: the share of ``steps`` in the final decay."""
    grad_clip: float = Field(1.0, ge=0)
    fused: bool = True
    """torch's fused AdamW kernel (CPU and GPU): one pass over each tensor, no full-size temporaries."""


class DeepSpeedSection(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: RecomputePolicy = "none"
    """What the backward pass recomputes (``lance_core/model/recompute.py``): ``none``; ``layer`` (every decoder
    layer, least memory); ``selective`` (the element-wise work between the matmuls, which keeps their
    outputs). ``true`` / ``false`` read as ``layer`` / ``none``."""

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _policy_of_bool(cls, value):
        return {True: "layer", False: "none"}.get(value, value) if isinstance(value, bool) else value
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the trained weights (released: 0.9999), in fp32, sharded over the
    ranks like the optimizer's fp32 master weights (4 bytes per trained parameter / ranks); the export holds
    it."""
    communication_dtype: CommunicationDtype = "fp32"
    """The dtype gradients are reduced in across the ranks (fp32; bf16 halves the traffic and rounds)."""
    reduce_bucket_size: int = Field(50_000_000, gt=0)
    zero_init: bool = True
    """ZeRO-3: create the parameters already partitioned (``deepspeed.zero.Init``), so no rank holds the
    whole model; initial weights (model.weights.qwen / lance) are read on rank 0 and scattered module by module."""


class ScalingSection(StrictModel):
    workers: int = Field(2, ge=1)
    sequence_parallel: int = Field(1, ge=1)
    """Ulysses sequence parallelism: groups of this many consecutive workers share one pack, each holding a
    contiguous chunk of its tokens; attention heads are exchanged for sequence chunks around the joint
    attention. Data-parallel ranks = workers / sequence_parallel. Needs num_heads divisible by it (key/value
    heads are repeated when there are fewer than ranks)."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, gt=0)
    """torch intra-op threads per worker (default: cpus_per_worker)."""
    retain_freed_memory: bool = True
    """Workers keep freed memory for reuse instead of returning it to the OS (glibc malloc: one arena,
    mmap and trim thresholds of 1 GiB). On CPU, DeepSpeed allocates full-size flat gradient buffers every
    step; returned to the OS, each is mapped again page by page, page faults that cost ZeRO-2 a few
    percent of the step. A worker's resident memory then stays at its peak."""
    worker_start_timeout_s: float = Field(600.0, gt=0)
    """How long Ray Train waits for the worker group to start (its default, 60 s, is short on a busy host)."""


class CheckpointSection(StrictModel):
    every_steps: int = Field(100, gt=0)
    keep_last: int = Field(2, ge=1)
    export_safetensors: bool = True
    """Write ``model.safetensors`` (released Lance names) with the final checkpoint and into the run folder."""
    export_every: bool = False
    """Also export every checkpoint, as ``exports/model_step<N>.safetensors`` in the run folder (a learning
    curve to evaluate afterwards)."""
    async_save: bool = True
    """Ranks go on training while a checkpoint's files are written: its state is copied to host memory at the
    step, written by a background thread, and reported (under Ray Train: uploaded in the background) once every
    rank has written its share; a crash before that leaves a checkpoint no resume trusts. The last checkpoint
    is written before the run ends. False: written and reported before the next step."""


class EvalSection(StrictModel):
    every_steps: int = Field(0, ge=0)
    """Write generated samples every N steps (0: at the end only)."""
    sampling_steps: int = Field(10, gt=0)
    cfg_scale: float = Field(4.0, ge=1)
    max_caption_tokens: int = Field(32, gt=0)
    samples: bool = True
    """Generate an image, a video strip and a caption into ``<run>/samples``."""
    heldout_every: int = Field(0, ge=0)
    """Compute the held-out loss every N steps (0: only when the capability rule needs it); reported to
    Ray Train / Tune as ``heldout_total`` = mean generation MSE + 0.25 · mean understanding CE."""


class MetricsSection(StrictModel):
    report_every: int = Field(10, gt=0)
    """Report metrics to Ray Train (and Tune) every N steps; files get every step."""
    peak_tflops_per_worker: float | None = Field(None, gt=0)
    """Peak of one worker for MFU; default: the GPU's dense bf16 peak from a table looked up by device name
    (``metrics.GPU_BF16_DENSE_TFLOPS``; a bf16 matmul probe for a GPU not in it), a matmul probe on CPU."""
    expert_grad_check: bool = True
    """Record per rank and step whether the UND and the GEN expert received gradient."""
    tensorboard: bool = True


class DebugSection(StrictModel):
    """Fault injection for the tests of fault tolerance and of the non-finite-loss guard."""

    kill_rank: int | None = None
    kill_at_step: int | None = Field(None, gt=0)
    """The rank kills its own process (SIGKILL) when it reaches this step, once per run folder."""
    nan_rank: int | None = None
    nan_at_step: int | None = Field(None, gt=0)
    """The rank's loss becomes NaN at this step."""


class SearchDimension(StrictModel):
    """One searched field: exactly one of a log-uniform range, a uniform range or a list of choices."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    choice: tuple[Any, ...] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        given = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, choice (got {given or 'none'})")
        for kind in ("loguniform", "uniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not (bounds[0] < bounds[1] and (kind == "uniform" or bounds[0] > 0)):
                raise ValueError(f"{kind} needs low < high{' and low > 0' if kind == 'loguniform' else ''}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self

    def example(self) -> Any:
        """A value inside the dimension (its lower end or first choice), to check the field accepts it."""
        return self.choice[0] if self.choice is not None else (self.loguniform or self.uniform)[0]


UNDERSTANDING_SHARE = "mixture.understanding_share"
"""A search key that is not a field: the mixture weight of i2t + v2t against the generation tasks."""


class TuneScheduler(StrictModel):
    kind: Literal["asha", "fifo"] = "asha"
    """``asha`` stops trials that trail at each rung; ``fifo`` runs every trial to the end."""
    grace_period: int = Field(4, ge=1)
    """Steps every trial runs before ASHA may stop it."""
    reduction_factor: int = Field(2, ge=2)


def _default_search_space() -> dict[str, SearchDimension]:
    return {
        "optim.lr": SearchDimension(loguniform=(3e-4, 5e-3)),
        "loss.ce_weight": SearchDimension(uniform=(0.1, 1.0)),
        UNDERSTANDING_SHARE: SearchDimension(uniform=(0.1, 0.5)),
    }


class TuneSection(StrictModel):
    """What ``lance tune`` sweeps; ``lance train`` ignores this section."""

    num_samples: int = Field(4, ge=1)
    """Trials."""
    max_concurrent: int = Field(1, ge=1)
    """Trials at a time (each one reserves its own training workers)."""
    seed: int = 0
    search_space: dict[str, SearchDimension] = Field(default_factory=_default_search_space)
    """Dotted config fields (``optim.lr``, ``loss.ce_weight``, ``optim.warmup_steps``...) and
    ``mixture.understanding_share``, each with its distribution."""
    scheduler: TuneScheduler = TuneScheduler()


class TrainConfig(StrictModel):
    stage: Stage = "custom"
    name: str = "lance-train"
    """Run name: the run folder is ``<output>/<name>``; rerunning the same name resumes."""
    output: OutputPath = Field("runs/train", validate_default=True)
    """Storage of the run (checkpoints): a local folder or a URI Ray Train can write to (s3://...)."""
    log_dir: OutputPath | None = None
    """Folder rank 0 writes metrics, TensorBoard events, samples and the export into: local, or a shared
    filesystem on a cluster. Default ``<output>/<name>``; required when ``output`` is a URI."""
    steps: int = Field(1000, gt=0)
    seed: int = 0
    max_failures: int = Field(0, ge=0)
    """Worker-group restarts from the last checkpoint before the run fails."""
    freeze: tuple[str, ...] = ()
    model: ModelSection = ModelSection()
    loss: LossConfig = LossConfig()
    data: DataSection = DataSection()
    mixture: MixtureSection = MixtureSection()
    optim: OptimSection = OptimSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    metrics: MetricsSection = MetricsSection()
    debug: DebugSection = DebugSection()
    tune: TuneSection = TuneSection()

    @field_validator("freeze")
    @classmethod
    def _known_groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in FREEZABLE]
        if unknown:
            raise ValueError(f"unknown module group(s) {unknown}; allowed: {', '.join(FREEZABLE)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        model = self.model.build()
        video = [t for t in ("t2v", "i2v", "v2v") if self.mixture.weights.get(t, 0) > 0]
        if video and model.max_latent_frames == 1:
            raise ValueError(f"mixture.weights: {', '.join(video)} need video latents but the {self.model.preset} "
                             "model's position table holds 1 latent frame; use model.preset lance-3b-video")
        self.check_search_space()
        sp = self.scaling.sequence_parallel
        if self.scaling.workers % sp:
            raise ValueError(f"scaling.sequence_parallel ({sp}) must divide scaling.workers ({self.scaling.workers})")
        check_global_packs(self.data.global_packs, self.scaling.workers // sp)
        try:
            check_sequence_parallel(model, sp)
        except ValueError as err:
            raise ValueError(f"scaling.sequence_parallel: {err}") from None
        if "://" in self.output and self.log_dir is None:
            raise ValueError(f"log_dir is required when output is a URI ({self.output}): metrics and samples "
                             "are files on a local or shared filesystem")
        return self

    def check_search_space(self) -> None:
        fields = self.model_dump()
        for key, dimension in self.tune.search_space.items():
            if key == UNDERSTANDING_SHARE:
                continue
            *sections, name = key.split(".")
            node = fields
            for section in sections:
                node = node.get(section) if isinstance(node, dict) else None
            if not isinstance(node, dict) or name not in node or isinstance(node[name], (dict, list)):
                raise ValueError(f"tune.search_space: {key!r} is not a field of the training config")
            if sections:  # the field's section must accept a value of the dimension
                section_cls = type(self)
                for section in sections:
                    section_cls = section_cls.model_fields[section].annotation
                try:
                    section_cls.model_validate({**node, name: dimension.example()})
                except ValueError as err:
                    raise ValueError(f"tune.search_space: {key!r} does not accept {dimension.example()!r}: "
                                     f"{err}") from None


def check_global_packs(global_packs: int | None, data_parallel: int) -> int:
    """Packs each data-parallel rank accumulates per step; ValueError when they do not divide evenly."""
    if global_packs is None:
        return 1
    if global_packs % data_parallel:
        raise ValueError(f"data.global_packs ({global_packs}) must be a multiple of the data-parallel ranks "
                         f"({data_parallel}: scaling.workers / scaling.sequence_parallel)")
    return global_packs // data_parallel


def load_train_config(data: dict[str, Any] | None, flags: dict[str, str] | None = None) -> TrainConfig:
    """``flags``: dotted field -> the command-line flag that set it, named in the errors."""
    try:
        return load_config(TrainConfig, data, prefix="train", flags=flags)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"invalid config:\n  train: {err}") from None
