"""Typed config of the precompute job (``lance precompute --config jobs/configs/<name>.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lance_core.config import StrictModel

InputFormat = Literal["auto", "webdataset", "parquet", "jsonl", "csv"]


class FilterConfig(StrictModel):
    min_side: int = Field(32, ge=1)
    """Drop media whose shorter side (pixels) is below this."""
    max_aspect: float = Field(3.0, ge=1.0)
    """Drop media whose long/short side ratio is above this."""
    min_caption_chars: int = Field(3, ge=0)
    max_caption_chars: int = Field(4000, ge=1)
    min_duration_seconds: float = Field(0.3, ge=0)
    dedup: bool = True
    """Drop exact duplicates (same content hash) within the run."""
    clip_score: bool = False
    """Compute the open_clip image-text score and store it in the shard (implied by ``clip_score_min``)."""
    clip_score_min: float | None = Field(None, ge=-1.0, le=1.0)
    """Drop image-text pairs whose open_clip cosine score is below this (None: no threshold)."""
    clip_model: str = "tiny"
    """open_clip model name, or 'tiny' for a small random model (tests); weights from clip_weights."""
    clip_weights: str | None = None
    """Local open_clip checkpoint file (required for any model but 'tiny'; nothing is downloaded)."""
    text_area_max: float | None = Field(None, ge=0.0, le=1.0)
    """Drop media whose detected text covers more than this fraction of the frame (PP-OCR detector)."""
    score_actors: int = Field(1, ge=1)
    """Actors of the scoring pool (CLIP score, text area); used only when a score is enabled."""
    motion_min: float | None = None
    """Drop videos whose mean frame difference is below this (None: not computed)."""

    @property
    def scoring(self) -> bool:
        """Whether the scoring stage runs (CLIP score or text area)."""
        return self.clip_score or self.clip_score_min is not None or self.text_area_max is not None


class VideoConfig(StrictModel):
    fps: float = Field(12.0, gt=0)
    max_seconds: float = Field(6.0, gt=0)
    """Clip length; longer videos are cut into several clips."""
    stride_seconds: float | None = None
    """Start-to-start distance of clips (default: max_seconds, back to back)."""
    max_clips_per_video: int = Field(64, ge=1)
    min_frames: int = Field(5, ge=1)


class BucketConfig(StrictModel):
    image_area: int = Field(768 * 768, gt=0)
    """Target pixel area of image buckets (released SFT: 768 x 768)."""
    video_area: int = Field(480 * 848, gt=0)
    """Target pixel area of video buckets (released SFT: 480 x 848)."""
    vit_area: int = Field(448 * 448, gt=0)
    """Target pixel area of the ViT input (sides multiples of 28)."""


class EncoderConfig(StrictModel):
    model_preset: Literal["tiny", "lance-3b"] = "tiny"
    """Sizes of the VAE and ViT (tiny: random weights for tests and the demo)."""
    vae_path: str | None = None
    vit_path: str | None = None
    vae_actors: int = Field(1, ge=1)
    vit_actors: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    """GPU fraction per encoder actor (0 = CPU)."""
    cpus_per_actor: float = Field(0.5, gt=0)
    """CPUs reserved per encoder actor; leave room for the decode tasks on small machines."""
    threads_per_actor: int | None = Field(None, ge=1)
    """Torch threads of an encoder actor on CPU (None: the CPUs it reserves, at least 1)."""
    cpus_per_task: float = Field(0.5, gt=0)
    """CPUs reserved per read/decode and writer task."""
    memory_per_task_gb: float = Field(1.0, gt=0)
    """Memory reserved per read/decode task (one partition's decoded pixels are held at once)."""
    max_decode_tasks: int | None = Field(None, ge=1)
    """Cap on concurrent read/decode tasks (None: as many as CPUs and memory allow)."""
    vit_tasks: tuple[str, ...] = ("i2t", "v2t", "i2i", "v2v")
    """Tasks whose media also get ViT features (they are large; understanding and edit sources need them)."""


class StorageConfig(StrictModel):
    endpoint_url: str | None = None
    """S3-compatible endpoint; credentials come from the environment (never from this file)."""
    region: str | None = None
    retries: int = Field(4, ge=0)
    backoff_seconds: float = Field(0.5, ge=0)


class PrecomputeConfig(StrictModel):
    input: str = ""
    """Input URI: a file or folder, local or s3://."""
    input_format: InputFormat = "auto"
    task: str | None = None
    """Task of rows that do not name one (webdataset, manifests); default t2i for images, t2v for videos."""
    output: str = "runs/latents"
    partition_size: int = Field(64, ge=1)
    """Input records per partition; one partition becomes one shard."""
    manifest_every: int = Field(64, ge=1)
    """Commits between rewrites of manifest.json and stats.json (each commit record is durable by itself)."""
    latent_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    filters: FilterConfig = FilterConfig()
    video: VideoConfig = VideoConfig()
    buckets: BucketConfig = BucketConfig()
    encoders: EncoderConfig = EncoderConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _check_task(self) -> "PrecomputeConfig":
        from lance_core.packing import TASKS

        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is unknown; allowed: {', '.join(TASKS)}")
        return self
