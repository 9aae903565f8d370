"""Typed config of the precompute job (``lance precompute --config jobs/configs/<name>.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lance_core.config import InputPath, OutputPath, StrictModel
from lance_core.model_section import ModelSection
from pipelines.runtime.storage import StorageConfig

InputFormat = Literal["auto", "webdataset", "parquet", "jsonl", "csv", "media"]


class FilterConfig(StrictModel):
    min_side: int = Field(32, ge=1)
    """Drop media whose shorter side (pixels) is below this."""
    max_aspect: float = Field(3.0, ge=1.0)
    """Drop media whose long/short side ratio is above this."""
    min_caption_chars: int = Field(3, ge=0)
    max_caption_chars: int = Field(4000, ge=1)
    min_duration_seconds: float = Field(0.3, ge=0)
    dedup: bool = True
    """Drop exact duplicates (same content hash): the first occurrence in plan order is kept, across
    partitions and reruns."""
    dedup_wait_seconds: float = Field(600.0, gt=0)
    """How long a writer waits for earlier partitions of the run to register their hashes (they are read
    before it, so this only runs out when a read is retried while every task slot holds a waiting writer);
    past it the writer claims with what is registered and logs that plan order is not guaranteed."""
    dedup_actors: int = Field(1, ge=1)
    """Actors of the duplicate index (exact and near): content hashes and near-duplicate band values are
    spread over them by prefix, so each holds about 1/dedup_actors of the index (pipelines/data/dedup.py)."""
    near_dedup: bool = False
    """Drop near duplicates: media whose 64-bit perceptual hash (an image; 3 frames of a video's first
    clip, all of which must match) is within ``near_dedup_distance`` bits of an earlier record's in plan
    order (re-encodes, small resizes, small overlays). Reason ``dedup:near_duplicate``."""
    near_dedup_distance: int = Field(6, ge=0, le=16)
    """Hamming distance up to which two perceptual hashes are near duplicates (JPEG re-encodes, 10 %
    resizes and small watermarks land at 0-4 bits; other crops of the same scene at 20 or more)."""
    semantic_dedup: bool = False
    """Store the normalised CLIP image embedding of each sample (``clip_embedding``) for the semantic
    dedup pass (``lance precompute --semantic-dedup``, pipelines/data/semdedup.py), which writes
    ``semantic_drop.parquet`` beside the shards; training leaves those rows out."""
    semantic_dedup_threshold: float = Field(0.95, gt=0.0, le=1.0)
    """Cosine similarity of CLIP image embeddings from which a later sample of the same cluster is dropped."""
    semantic_dedup_clusters: int | None = Field(None, ge=1)
    """k of the k-means over the embeddings (None: one cluster per 1,000 samples)."""
    clip_score: bool = False
    """Compute the open_clip image-text score and store it in the shard (implied by ``clip_score_min``)."""
    clip_score_min: float | None = Field(None, ge=-1.0, le=1.0)
    """Drop image-text pairs whose open_clip cosine score is below this (None: no threshold)."""
    clip_model: str = "tiny"
    """open_clip model name, or 'tiny' for a small random model (tests); weights from clip_weights."""
    clip_weights: InputPath | None = None
    """Local open_clip checkpoint file (required for any model but 'tiny'; nothing is downloaded)."""
    text_area_max: float | None = Field(None, ge=0.0, le=1.0)
    """Drop media whose detected text covers more than this fraction of the frame (PP-OCR detector)."""
    score_actors: int = Field(1, ge=1)
    """Actors of the scoring pool (CLIP score, text area); used only when a score is enabled."""
    motion_min: float | None = None
    """Drop videos whose mean frame difference is below this (None: not computed)."""

    @property
    def scoring(self) -> bool:
        """Whether the scoring stage runs (CLIP score or embedding, text area)."""
        return (self.clip_score or self.clip_score_min is not None or self.text_area_max is not None
                or self.semantic_dedup)

    @property
    def any_dedup(self) -> bool:
        """Whether the duplicate index runs (exact or near duplicates)."""
        return self.dedup or self.near_dedup


class VideoConfig(StrictModel):
    """Frame selection as in the Lance release: a clip of d seconds gives round(min(d, max_seconds) x fps)
    frames snapped down to 4k + 1, spread evenly over the whole clip (6 s -> 69 frames, 18 latent frames;
    7-8 s -> the same 69 frames over the longer clip)."""

    fps: float = Field(12.0, gt=0)
    """Sampling rate the frame count is based on (the effective rate is a little lower: 6 s -> 69 frames)."""
    max_seconds: float = Field(6.0, gt=0)
    """Seconds that set the most frames a clip takes, and the length of the clips a long video is cut into."""
    max_clip_seconds: float = Field(8.0, gt=0)
    """Longest stretch one clip spans: a video (or the rest of one) up to this long is one clip, its frames
    spread over all of it; a longer one is cut into ``max_seconds`` clips."""
    stride_seconds: float | None = Field(None, gt=0)
    """Start-to-start distance of clips (default: max_seconds, back to back)."""
    max_clips_per_video: int = Field(64, ge=1)
    min_frames: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _check_clip_seconds(self) -> VideoConfig:
        if self.max_clip_seconds < self.max_seconds:
            raise ValueError(f"max_clip_seconds ({self.max_clip_seconds:g}) must be at least max_seconds "
                             f"({self.max_seconds:g})")
        return self


class BucketConfig(StrictModel):
    image_area: int = Field(768 * 768, gt=0)
    """Target pixel area of image buckets (released SFT: 768 x 768)."""
    video_area: int = Field(640 * 640, gt=0)
    """Target pixel area of video buckets (released SFT: 640², so 854x480 -> 848x480)."""
    vit_edit_area: int = Field(672 * 672, gt=0)
    """Target pixel area of the ViT input of an edit source image (i2i; the release: 672²)."""
    vit_understanding_area: int = Field(616 * 616, gt=0)
    """Target pixel area of the ViT input of understanding images (i2t) and of video frames (v2t, v2v
    sources; the release: 616², so a square image gives 588² and 441 tokens, 854x480 gives 812x448)."""
    vit_area: int | None = Field(None, gt=0)
    """One ViT area for every input, in place of the two above (small test presets)."""

    def vit_area_for(self, edit_source: bool) -> int:
        """The ViT target area of an edit source image, or of any other ViT input (understanding images,
        video frames)."""
        return self.vit_area or (self.vit_edit_area if edit_source else self.vit_understanding_area)


class EncoderConfig(StrictModel):
    """How the encoders run; which VAE and ViT (sizes and weights) is the ``model`` section's."""

    vae_actors: int = Field(1, ge=1)
    vit_actors: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    """Image rows per encoder call (rows of one bucket are encoded together; the scoring stage takes this many
    rows of any kind)."""
    video_batch_size: int = Field(4, ge=1)
    """Clips per encoder call for video buckets. A 69-frame 480x848 clip needs ≈ 1.9 GiB of VAE and ≈ 2.9 GiB
    of ViT activations in bf16 (estimates, ``pipelines/data/encoder_memory.py``): 4 clips take ≈ 7.6 and
    ≈ 11.6 GiB, well inside half of an 80 GB GPU (``num_gpus_per_actor: 0.5``)."""
    num_gpus_per_actor: float = Field(0.0, ge=0)
    """GPU fraction per encoder actor (0 = CPU). Ray does not share GPU memory out by this fraction: each
    actor must fit its weights and its largest batch's activations in that share (``encoder_memory.py``)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype of the VAE and ViT: ``auto`` is bf16 on a GPU and fp32 on the CPU (bf16 on the CPU runs
    only when asked for: it is slower there). The VAE's latent normalisation and posterior arithmetic, and the
    values handed to storage, stay float32 in every case; the shards' encoder description records the dtype
    (it is not part of the encoder identity that training checks)."""
    cpus_per_actor: float = Field(0.5, gt=0)
    """CPUs reserved per encoder actor; leave room for the decode tasks on small machines."""
    threads_per_actor: int | None = Field(None, ge=1)
    """Torch threads of an encoder actor on CPU (None: the CPUs it reserves, at least 1)."""
    cpus_per_task: float = Field(0.5, gt=0)
    """CPUs reserved per read/decode and writer task."""
    memory_per_task_gb: float = Field(1.0, gt=0)
    """Memory reserved per read/decode task: about two blocks of decoded pixels (``block_mb``) and one
    video's bytes and decoder state."""
    block_mb: float = Field(256.0, gt=0)
    """Size of the blocks a read task hands on: a partition's rows leave in blocks of about this many MiB of
    pixels (a long video's clips in several), so a task's memory does not grow with the partition."""
    max_decode_tasks: int | None = Field(None, ge=1)
    """Cap on concurrent read/decode tasks (None: as many as CPUs and memory allow)."""
    store_posterior_std: bool = False
    """Also store the VAE posterior's std (normalised like the latents) as ``<slot>_vae_std``, so training can
    draw a fresh latent each step (``data.sample_posterior``); False stores the posterior mean alone."""
    vit_tasks: tuple[str, ...] = ("i2t", "v2t", "i2i", "v2v")
    """Tasks whose media also get ViT features (they are large; understanding and edit sources need them)."""


class ManifestConfig(StrictModel):
    """Column names of JSONL / CSV / Parquet manifests (rows of media URIs and captions). Each field takes one
    name or a list tried in order: a row's value is the first present and non-empty one, so manifests with
    different columns can share a run."""

    uri_column: tuple[str, ...] = ("uri", "image", "video", "media_uri", "path", "url")
    """Media URI: a path relative to the manifest, an absolute path, s3://, https://... (``url`` is
    img2dataset's default input column). A CSV or Parquet manifest holding none of these is refused."""
    caption_column: tuple[str, ...] = ("caption", "text", "TEXT", "txt")
    """Caption (also of the Parquet release layouts t2i, t2v, i2i, v2v). A CSV or Parquet file holding none of
    these (nor an ``answer_column``, the text of QA rows) is refused."""
    task_column: tuple[str, ...] = ("task",)
    """A row's task; rows without one take ``task`` of the config (or t2i / t2v by the media's kind)."""
    source_column: tuple[str, ...] = ("source",)
    """Source media URI of edit tasks (i2i, v2v)."""
    reference_columns: tuple[str, ...] = ("ref_0", "ref_1", "ref_2")
    """Reference media of subject-driven rows (a URI, the bytes, or a Hugging Face image struct each), one
    column per reference: the non-empty ones fill ``ref_0``, ``ref_1``, ``ref_2`` of the shard in this order.
    A row that names any makes a ``subject`` row unless it names its task."""
    system_column: tuple[str, ...] = ("system",)
    question_column: tuple[str, ...] = ("question",)
    answer_column: tuple[str, ...] = ("answer",)

    @field_validator("*", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return (value,) if isinstance(value, str) else value

    @field_validator("*")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(value):
            raise ValueError("give a column name or a list of them (none empty)")
        return value


class PrecomputeConfig(StrictModel):
    input: InputPath = ""
    """Input URI: a file or folder, local or s3://."""
    input_format: InputFormat = "auto"
    """``auto``: by extension (``.tar``..., ``.parquet``, ``.jsonl``/``.json``, ``.csv``; an image or video
    file is an input when a same-name ``.txt`` caption lies beside it, or when the input holds no other
    inputs); ``media``: every image and video file of the input is one sample, its caption the same-name
    ``.txt``."""
    max_tar_member_mb: float = Field(256.0, gt=0)
    """Largest WebDataset tar member read (MiB; a member is read whole into memory): a larger one is
    quarantined with its size, and its bytes are skipped, not read."""
    task: str | None = None
    """Task of rows that do not name one (webdataset, manifests); default t2i for images, t2v for videos."""
    output: OutputPath = Field("runs/latents", validate_default=True)
    partition_size: int = Field(64, ge=1)
    """Input records per partition; one partition becomes one shard."""
    plan_files_per_task: int = Field(64, ge=1)
    """Input files whose records one planning task counts (the plan is made once per output, in Ray tasks)."""
    manifest_every: int = Field(64, ge=1)
    """Commits per manifest segment: the manifest and stats.json are brought up to date with every this many
    new commit records (each commit record is durable by itself)."""
    latent_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Precision of the stored latents and ViT features: bf16 (rounded to bfloat16, stored as float16 in the same
    2 bytes, which numpy reads), fp16, or fp32 (twice the size); see ``lance_core/shards.py``."""
    filters: FilterConfig = FilterConfig()
    video: VideoConfig = VideoConfig()
    buckets: BucketConfig = BucketConfig()
    model: ModelSection = ModelSection()
    """The model the latents are for: its preset's VAE and ViT, with ``model.weights.vae`` / ``model.weights.vit``
    (random weights when not given: tests and the demo)."""
    encoders: EncoderConfig = EncoderConfig()
    storage: StorageConfig = StorageConfig()
    manifest: ManifestConfig = ManifestConfig()

    @model_validator(mode="after")
    def _check_task(self) -> "PrecomputeConfig":
        from lance_core.packing import TASKS

        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is unknown; allowed: {', '.join(TASKS)}")
        return self
