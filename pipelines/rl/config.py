"""Typed config of a GRPO run (``jobs/configs/grpo_*.yaml``); validated at load, errors name the field."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from lance_core.config import InputPath, StrictModel, load_config
from lance_core.model_section import ModelSection
from lance_core.rewards import RewardSpec
from lance_core.rl import SDESamplerConfig
from pipelines.runtime.deepspeed_config import CommunicationDtype


class ActorResources(StrictModel):
    """How many actors of a kind, and what each one reserves in the placement group."""

    count: int = Field(1, gt=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    """GPU rewards and GPU policies must declare it, or they silently run on CPU."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor (e.g. a node label) used to steer placement."""
    torch_threads: int = Field(1, gt=0)
    """Intra-op threads of torch inside the actor."""


class PromptsConfig(StrictModel):
    """Training prompts come from the OCR prompt generator or a file; evaluation prompts are held out from
    them or read from ``eval_path``. A prompt whose text or target is an evaluation prompt's is never trained
    on."""

    source: Literal["generated", "file"] = "generated"
    """generated: ``lance_core.prompt_generator`` (templates x phrases, seeded by the run's seed); file:
    ``path``. Giving ``path`` without ``source`` means file."""
    path: InputPath | None = None
    """A text file (one prompt per line, target text in double quotes) or JSONL (``source: file``)."""
    generated_count: int = Field(10_000, gt=0)
    """Distinct generated prompts (``source: generated``); epochs cycle through them."""
    eval_path: InputPath | None = None
    """Evaluation prompts from a file of the same formats (e.g. Flow-GRPO's OCR test split); None = held out
    from the training prompts."""
    text_field: str = "prompt"
    """JSONL: the field holding the prompt."""
    target_field: str = "target"
    """JSONL: the field holding the OCR target (optional per line; else the quoted text of the prompt)."""
    require_target: bool = False
    """Reject prompts without a target when loading; False keeps them (OCR reward 0, reason counted)."""
    limit: int | None = Field(None, gt=0)
    """At most this many training prompts are read (before the evaluation ones are held out)."""
    eval_count: int = Field(2, ge=0)
    """Evaluation prompts: the first ones of ``eval_path``, else held out from the end of the training ones."""
    disjoint_targets: bool = True
    """Also leave out of training the prompts whose target is an evaluation prompt's (OCR: the target is the
    text to render, so sharing it leaks the evaluation). False where targets are class labels that every prompt
    shares (a classifier reward), and only the prompt texts must differ."""

    @model_validator(mode="before")
    @classmethod
    def _file_when_only_path_given(cls, data):
        if isinstance(data, dict) and data.get("path") and "source" not in data:
            return {**data, "source": "file"}
        return data

    @model_validator(mode="after")
    def _check_source(self) -> PromptsConfig:
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs path (a prompts file)")
        if self.source == "generated" and self.path:
            raise ValueError(f"path {self.path!r} is only read with source 'file' (source is 'generated')")
        return self


class RolloutConfig(StrictModel):
    sampler: SDESamplerConfig = SDESamplerConfig()
    group_size: int = Field(8, gt=1)
    """G: samples per prompt."""
    prompts_per_epoch: int = Field(4, gt=0)
    image_size: int = Field(64, gt=0)
    """Side of generated images in pixels (a multiple of the VAE's 16)."""
    groups_per_micro_batch: int = Field(1, gt=0)
    """Groups decoded together and streamed to the reward pool as one batch."""
    actors: ActorResources = ActorResources()
    async_mode: bool = Field(False, alias="async")
    """YAML ``async``: the rollouts of epoch k+1 run with the weights of epoch k while the learner trains on
    epoch k (one step off-policy: the clipped ratio corrects for it); False waits for the update first."""
    weight_sync: Literal["collective", "object_store"] = "collective"
    """How new weights reach the rollout actors: a broadcast in a process group of the learner and the rollout
    actors (gloo, NCCL on GPUs), falling back to the object store for a sync that fails; or the object store."""

    model_config = ConfigDict(**StrictModel.model_config, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)


class RewardPoolConfig(StrictModel):
    terms: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="ocr", kind="ocr")])
    """The reward is the weighted sum of these terms."""
    actors: ActorResources = ActorResources()
    streaming: bool = True
    """Score each micro-batch as soon as it is decoded (overlapping the next rollout); False waits for the
    whole rollout first."""
    max_restarts: int = Field(3, ge=0)
    """Replacements per actor slot after it dies or hangs; its batches are sent again to a live actor."""
    call_timeout_s: float = Field(120.0, gt=0)
    """An actor still scoring one batch after this long is taken as hung: it is killed and replaced."""
    start_timeout_s: float = Field(600.0, gt=0)
    """An actor still loading its reward models after this long fails the run's start, or, replacing another,
    is replaced in turn."""
    max_failed_epochs: int = Field(3, ge=1)
    """The run stops, saying why, after this many epochs in a row in which every reward term failed on every
    image (raised, or scored NaN / ±inf): advantages would all be 0 and nothing would be learnt."""


class OptimConfig(StrictModel):
    """AdamW of the learner (the names of the training job's ``optim`` section)."""

    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)


class DeepSpeedConfig(StrictModel):
    """The learner's engine (the names of the training job's ``deepspeed`` section)."""

    zero_stage: int = Field(0, ge=0, le=2)
    precision: Literal["fp32", "bf16"] = "fp32"
    """Model weights and activations; the SDE maths and log-probs stay in float32."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """EMA of the trained weights (None = off), in fp32, sharded over the learner ranks like the optimizer's
    master weights; evaluation and the exported EMA file use it."""
    communication_dtype: CommunicationDtype = "fp32"
    """The dtype gradients are reduced in across the learner ranks."""


class LearnerConfig(StrictModel):
    mode: Literal["full", "lora"] = "full"
    """full: every generation-expert weight trains; lora: low-rank adapters on its linear layers."""
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    clip_range: float = Field(1e-4, gt=0)
    """ε of the clipped ratio."""
    kl_weight: float = Field(0.04, ge=0)
    """β of the KL to the frozen reference (0 skips the reference forward)."""
    adv_clip: float = Field(5.0, gt=0)
    std_scope: Literal["group", "batch"] = "group"
    minibatches: int = Field(1, gt=0)
    """Optimizer updates per epoch; the epoch's groups are split evenly between them."""
    ranks: int = Field(1, gt=0)
    """Data-parallel learner ranks (one actor and placement bundle each, one torch.distributed group: NCCL on
    GPUs, else gloo): each update's groups are split evenly between them and ZeRO (``deepspeed.zero_stage``)
    partitions over them. Rank 0 alone sends the weights and writes the model files; every rank writes its
    partition of the checkpoint, so the run folder must be shared by their nodes. A resumed run keeps it."""
    actor: ActorResources = ActorResources()
    """Resources of each learner rank."""


class CheckpointConfig(StrictModel):
    every_epochs: int = Field(0, ge=0)
    """Save a resumable checkpoint every N epochs (0 = only at the end)."""
    keep_last: int = Field(2, ge=1)


class EvalConfig(StrictModel):
    every: int = Field(0, ge=0)
    """Evaluate every N epochs and after the last one (0 = never)."""
    steps: int = Field(20, gt=0)
    """ODE steps of evaluation (more than the rollout's)."""
    samples_per_prompt: int = Field(2, gt=0)
    use_ema: bool = True


class PlacementConfig(StrictModel):
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "SPREAD"
    """How the bundles (learner, rollout actors, reward actors) are placed over the nodes."""
    timeout_s: float = Field(120.0, gt=0)


class GRPOConfig(StrictModel):
    model: ModelSection = ModelSection()
    """The policy: preset, overrides and weights (``model.weights.lance``: the initial Lance weights, a
    safetensors file or folder; None = random init, for tests and the demo)."""
    prompts: PromptsConfig = PromptsConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardPoolConfig = RewardPoolConfig()
    learner: LearnerConfig = LearnerConfig()
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    placement: PlacementConfig = PlacementConfig()
    epochs: int = Field(10, gt=0)
    seed: int = 0
    gallery_size: int = Field(8, ge=0)
    """Rollouts kept (PNGs, gallery.json, a captioned grid.png) at the first and the last epoch."""
    tensorboard: bool = True
    """TensorBoard events under ``<run>/tb``: rewards per component, KL, clip fraction, ..., gallery grids."""
    ray_address: str | None = None
    """None = RAY_ADDRESS or a new local Ray."""
    ray_num_cpus: int | None = Field(None, gt=0)
    """CPUs of a new local Ray (None = all of the machine)."""

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        learner, prompts = self.learner, self.rollout.prompts_per_epoch
        if prompts % (learner.ranks * learner.minibatches):
            raise ValueError(f"rollout.prompts_per_epoch ({prompts}) must be a multiple of learner.ranks x "
                             f"learner.minibatches ({learner.ranks} x {learner.minibatches}): every rank trains "
                             "the same number of groups in every update")
        if self.rollout.sampler.noise_level <= 0:
            raise ValueError("rollout.sampler.noise_level must be > 0: GRPO needs stochastic SDE steps")
        if self.rollout.image_size % 16:
            raise ValueError(f"rollout.image_size ({self.rollout.image_size}) must be a multiple of 16")
        return self


def load_grpo_config(data: dict | None, flags: dict[str, str] | None = None) -> GRPOConfig:
    """``flags``: dotted field -> the command-line flag that set it, named in the errors."""
    return load_config(GRPOConfig, data, prefix="grpo", flags=flags)
