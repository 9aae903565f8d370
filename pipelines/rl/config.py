"""Typed config of a GRPO run (``jobs/configs/grpo_*.yaml``); validated at load, errors name the field."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lance_core.config import InputPath, ModelOverrides, StrictModel, load_config
from lance_core.rewards import RewardSpec
from lance_core.rl import SDESamplerConfig
from lance_core.tokenizer import TokenizerRef


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
    path: InputPath | None = None
    """A text file (one prompt per line, target text in double quotes) or JSONL. None = built-in prompts."""
    text_field: str = "prompt"
    """JSONL: the field holding the prompt."""
    target_field: str = "target"
    """JSONL: the field holding the OCR target (optional per line; else the quoted text of the prompt)."""
    require_target: bool = False
    """Reject prompts without a target when loading; False keeps them (OCR reward 0, reason counted)."""
    limit: int | None = Field(None, gt=0)
    eval_count: int = Field(2, ge=0)
    """Prompts held out for evaluation (taken from the end of the file)."""


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


class RewardPoolConfig(StrictModel):
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="ocr", kind="ocr")])
    actors: ActorResources = ActorResources()
    streaming: bool = True
    """Score each micro-batch as soon as it is decoded (overlapping the next rollout); False waits for the
    whole rollout first."""
    max_restarts: int = Field(3, ge=0)
    """Replacements per actor slot after it dies; its batch is retried on the replacement."""


class LearnerConfig(StrictModel):
    mode: Literal["full", "lora"] = "full"
    """full: every generation-expert weight trains; lora: low-rank adapters on its linear layers."""
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    clip_range: float = Field(1e-4, gt=0)
    """ε of the clipped ratio."""
    kl_weight: float = Field(0.04, ge=0)
    """β of the KL to the frozen reference (0 skips the reference forward)."""
    adv_clip: float = Field(5.0, gt=0)
    std_scope: Literal["group", "batch"] = "group"
    minibatches: int = Field(1, gt=0)
    """Optimizer updates per epoch; the epoch's groups are split evenly between them."""
    ema_decay: float = Field(0.0, ge=0, lt=1)
    """EMA of the trained weights (0 = off); evaluation and the exported EMA file use it."""
    zero_stage: int = Field(0, ge=0, le=2)
    precision: Literal["fp32", "bf16"] = "fp32"
    """Model weights and activations; the SDE maths and log-probs stay in float32."""
    actor: ActorResources = ActorResources()


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
    model_preset: str = "tiny"
    model: ModelOverrides = Field(default_factory=dict)
    """Overrides of the preset's fields (e.g. vae.path for real weights)."""
    tokenizer: TokenizerRef | None = None
    """``qwen2.5`` (built in), ``byte`` or a Qwen2 tokenizer folder; None = ``qwen2.5`` where the model's
    logit rows hold its 151,665 ids, else ``byte`` (tiny presets)."""
    checkpoint: InputPath | None = None
    """Initial Lance weights (safetensors file or folder); None = random init (tests, demo)."""
    prompts: PromptsConfig = PromptsConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardPoolConfig = RewardPoolConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    placement: PlacementConfig = PlacementConfig()
    epochs: int = Field(10, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)
    """Save a resumable checkpoint every N epochs (0 = only at the end)."""
    keep_checkpoints: int = Field(2, gt=0)
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
        if self.rollout.prompts_per_epoch % self.learner.minibatches:
            raise ValueError(f"rollout.prompts_per_epoch ({self.rollout.prompts_per_epoch}) must be a multiple of "
                             f"learner.minibatches ({self.learner.minibatches})")
        if self.rollout.sampler.noise_level <= 0:
            raise ValueError("rollout.sampler.noise_level must be > 0: GRPO needs stochastic SDE steps")
        if self.rollout.image_size % 16:
            raise ValueError(f"rollout.image_size ({self.rollout.image_size}) must be a multiple of 16")
        return self


def load_grpo_config(data: dict | None, flags: dict[str, str] | None = None) -> GRPOConfig:
    """``flags``: dotted field -> the command-line flag that set it, named in the errors."""
    return load_config(GRPOConfig, data, prefix="grpo", flags=flags)
