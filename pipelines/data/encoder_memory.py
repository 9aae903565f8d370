"""Peak activation memory of the precompute encoders on one batch of a bucket, estimated from the configs:
for sizing ``encoders.batch_size`` / ``video_batch_size`` and ``num_gpus_per_actor``. All figures are
estimates.

What is held at once (read off diffusers' ``AutoencoderKLWan._encode`` and transformers' Qwen2.5-VL vision
tower):

- VAE: the uint8 clip on the device, the clip in the compute dtype (``WanVAE.model_input``; the float32 pass
  that makes it is transient), its 2x2-patchified copy (12 channels: the same element count), and the
  activations of one temporal chunk: the encoder runs the first frame, then 4 frames at a time, carrying a
  feature cache (the last 2 frames of every causal convolution's input) from chunk to chunk. The chunk's peak
  is set by its first stage (``base_dim`` channels at half resolution), so it scales with base_dim x chunk
  frames x H/2 x W/2 and not with the clip's length; only the clip terms grow with T.
- ViT: the uint8 frames, the flattened patches (N x 3·2·14·14) in the compute dtype, and one vision block's
  activations, linear in the patch count N (attention runs within windows and, in the full-attention blocks,
  within a frame: SDPA keeps no N² matrix). The block's float32 upcasts (RMSNorm, rotary) are why bf16 needs
  more than half of fp32's bytes.

Calibration (``python -m pipelines.data.encoder_memory`` prints the table): the tensors the real code
allocates are counted with :class:`LiveTensorBytes` while it runs — on the CPU at reduced sizes with real
arithmetic, and for the VAE also on the meta device (same allocations, no arithmetic) up to the full
69 x 480 x 848 clip; the two agree byte for byte where both run. The coefficients below are the measured peaks
per unit, rounded up. Not counted: the weights (:func:`weight_bytes`), the CUDA context (≈ 0.5 GiB), cuDNN /
SDPA workspaces and the caching allocator's fragmentation; :data:`HEADROOM` covers those when a batch size is
picked. On the CPU the allocator's own peak is far higher than the tensors' (slow_conv3d's im2col buffers,
27 x a convolution's input): the CPU is no model of a GPU's workspaces, so none is fitted to it.

Estimated / measured: Wan2.2 VAE (meta) 1.00-1.09 from 64x96 to 768x768 and 480x848, images and 69-frame
clips, batches of 1-2, bf16 and fp32 (1.15-1.22 on a 5-frame clip, whose feature cache is not yet full);
ViT at the 3B widths (2 blocks, CPU) 1.00-1.08.

Figures for the lance-3b encoders (estimates; ``tests/test_encoder_memory.py`` prints them), bf16 / fp32:
a 69-frame 480x848 clip: VAE 1.91 / 3.74 GiB, ViT on its 69 x 448x812 frames (64,960 patches) 2.89 /
3.81 GiB; a 768² image: VAE 0.56 / 1.11 GiB, ViT at 672² (2,304 patches) 0.10 / 0.13 GiB. Weights: VAE
encoder (150M parameters; the stage drops the decoder) 0.28 / 0.56 GiB, ViT (669M) 1.25 / 2.49 GiB. At 0.5
of an 80 GB GPU (37 GiB) and :data:`HEADROOM`, that is at most 15 clips per VAE call and 9 per ViT call in
bf16.
"""

from __future__ import annotations

import math
import weakref
from functools import lru_cache
from typing import Self

from lance_core.config import VAEConfig, ViTConfig

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

VAE_CHUNK_BYTES = {2: 25.0, 4: 50.0}
"""Peak bytes of one encoder chunk per element of its first-stage activation (base_dim x chunk frames x
H/2 x W/2), by compute-dtype size, feature cache included. Measured on the Wan2.2 sizes (base_dim 160, 2 res
blocks): bf16 24.2 for a 480x848 image and 23.5 for a 69-frame clip, fp32 48.5 and 45.0, a little more on
small frames (64x96: 24.9 and 49.8). The tiny preset (1 res block) differs: bf16 up to 29 on a 1-frame
chunk."""

VIT_BLOCK_BYTES = {2: 34.6, 4: 44.6}
"""Peak bytes of the vision tower per patch per hidden unit, by compute-dtype size: measured 34.51 (bf16) and
44.58 (fp32) at the 3B widths (hidden 1280, MLP 3420, 16 heads), the same from 256 to 14,848 patches."""

HEADROOM = 1.25
"""Factor on the estimated peak for what it does not count (workspaces, fragmentation) when picking a
batch."""

CUDA_CONTEXT_BYTES = 2**29
"""What a CUDA context takes outside PyTorch's allocator (≈ 0.5 GiB; it depends on the driver and the
kernels)."""


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def vae_base_dim(cfg: VAEConfig) -> int:
    """Channels of the encoder's first stage (160 for the Wan2.2 preset, as ``diffusers_config``)."""
    return 160 if cfg.preset == "wan2.2" else cfg.base_dim


def vae_encode_peak_bytes(cfg: VAEConfig, frames: int, height: int, width: int, dtype: str = "bf16",
                          batch: int = 1) -> int:
    """Estimated peak activation bytes of ``WanVAE.encode`` on ``batch`` uint8 clips of (frames, height,
    width)."""
    size = dtype_bytes(dtype)
    pixels = 3 * frames * height * width
    clip = pixels * (1 + 2 * size)  # uint8 on the device, in the compute dtype, and patchified
    conversion = pixels * (1 + 4 + size)  # uint8 -> float32 -> compute dtype, before the encoder runs
    chunk_frames = cfg.temporal_ratio if frames > 1 else 1
    stage0 = vae_base_dim(cfg) * chunk_frames * (height // 2) * (width // 2)
    chunk = VAE_CHUNK_BYTES[size] * stage0
    return math.ceil(batch * max(clip + chunk, conversion))


def vit_patches(cfg: ViTConfig, frames: int, height: int, width: int) -> int:
    """Patches of one clip or image: ceil(T / temporal patch) x H/14 x W/14 (an odd T repeats its last
    frame)."""
    return (-(-frames // cfg.temporal_patch_size)) * (height // cfg.patch_size) * (width // cfg.patch_size)


def vit_encode_peak_bytes(cfg: ViTConfig, frames: int, height: int, width: int, dtype: str = "bf16",
                          batch: int = 1) -> int:
    """Estimated peak activation bytes of ``QwenViT.encode_many`` on ``batch`` uint8 clips of (frames, height,
    width)."""
    size = dtype_bytes(dtype)
    patches = vit_patches(cfg, frames, height, width)
    patch_values = patches * 3 * cfg.temporal_patch_size * cfg.patch_size**2
    frames_u8 = 3 * frames * height * width
    # preprocessing: float32 frames, normalised (float32), in the compute dtype, then the patch copy
    preprocess = frames_u8 + patch_values * (4 + 4 + size)
    tower = frames_u8 + patch_values * size + VIT_BLOCK_BYTES[size] * patches * cfg.hidden_size
    stacked = batch * patch_values * size if batch > 1 else 0  # torch.cat of the clips' patches
    return math.ceil(batch * max(preprocess, tower) + stacked)


@lru_cache(maxsize=8)
def _parameters(cfg: VAEConfig | ViTConfig) -> int:
    import torch

    from lance_core.encoders import QwenViT, WanVAE

    with torch.device("meta"):
        if isinstance(cfg, VAEConfig):
            ae = WanVAE.from_config(cfg.model_copy(update={"path": None})).autoencoder
            return sum(p.numel() for m in (ae.encoder, ae.quant_conv) for p in m.parameters())
        return sum(p.numel() for p in QwenViT.from_config(cfg.model_copy(update={"path": None})).parameters())


def weight_bytes(cfg: VAEConfig | ViTConfig, dtype: str = "bf16") -> int:
    """Bytes of an encoder actor's weights on its device (the VAE actor keeps the encoder only)."""
    return _parameters(cfg) * dtype_bytes(dtype)


def max_batch(per_row_bytes: int, fixed_bytes: int, budget_bytes: float, headroom: float = HEADROOM) -> int:
    """Most rows whose estimated peak, times ``headroom``, fits ``budget_bytes`` beside ``fixed_bytes``
    (weights, CUDA context); 0 when not even one does."""
    if per_row_bytes <= 0:
        raise ValueError(f"per_row_bytes must be positive, got {per_row_bytes}")
    return max(0, int((budget_bytes - fixed_bytes) // (per_row_bytes * headroom)))


# ------------------------------------------------------------------------------------------- measurement
class LiveTensorBytes:
    """Counts the bytes of the tensors that the code run inside it allocates, as they are made and freed
    (storages the ops return; tensors that existed before are not counted), and keeps the peak. Works on
    any device, the meta device included; op-internal scratch (im2col buffers, workspaces) is not seen."""

    def __enter__(self) -> Self:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return counter._record(func, args, kwargs or {})

        self.current = self.peak = 0
        self._live: dict[int, int] = {}
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)

    def _record(self, func, args, kwargs):
        import torch
        from torch.utils._pytree import tree_flatten

        flat_inputs = tree_flatten((args, kwargs))[0]
        inputs = {id(t.untyped_storage()) for t in flat_inputs if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._live or key in inputs:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def measured_vae_peak(cfg: VAEConfig, frames: int, height: int, width: int, dtype: str = "bf16",
                      batch: int = 1, device: str = "meta") -> int:
    """Bytes of tensors held at the peak of ``WanVAE.encode`` on uint8 clips (random weights; the meta device
    runs the same allocations without arithmetic)."""
    import torch

    from lance_core.encoders import WanVAE

    with torch.device(device):
        vae = WanVAE.from_config(cfg.model_copy(update={"path": None}))
    del vae.autoencoder.decoder
    vae.to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]))
    with LiveTensorBytes() as counter:  # the uint8 clips on the device count, as in the VAE stage
        pixels = torch.zeros(batch, 3, frames, height, width, dtype=torch.uint8, device=device)
        vae.encode(pixels)
    return counter.peak


def measured_vit_peak(cfg: ViTConfig, frames: int, height: int, width: int, dtype: str = "bf16",
                      batch: int = 1) -> int:
    """Bytes of tensors held at the peak of ``QwenViT.encode_many`` on uint8 clips, on the CPU (random
    weights; the tower's sequence bookkeeping needs real numbers, so no meta device here)."""
    import torch

    from lance_core.encoders import QwenViT

    vit = QwenViT.from_config(cfg.model_copy(update={"path": None}))
    vit.to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]))
    with LiveTensorBytes() as counter:
        clips = [torch.randint(0, 256, (frames, 3, height, width), dtype=torch.uint8) for _ in range(batch)]
        vit.encode_many(clips)
    return counter.peak


def _calibration_rows() -> list[tuple]:
    from lance_core.config import TINY_VAE

    full_vae, tiny_vae = VAEConfig(preset="wan2.2"), VAEConfig(**TINY_VAE)
    # the 3B widths with 2 blocks (one window, one full attention): the peak is one block's
    vit = ViTConfig(preset="tiny", depth=2, fullatt_block_indexes=(1,))
    rows = []
    sizes = [((1, 480, 848), 1, "meta"), ((69, 480, 848), 1, "meta"), ((69, 480, 848), 2, "meta"),
             ((1, 768, 768), 1, "meta")]
    tiny_sizes = [((9, 64, 96), 1, "cpu"), *sizes]
    for cfg, name, shapes in ((full_vae, "vae wan2.2", sizes), (tiny_vae, "vae tiny", tiny_sizes)):
        for shape, batch, device in shapes:
            for dtype in ("bf16", "fp32"):
                estimate = vae_encode_peak_bytes(cfg, *shape, dtype, batch)
                measured = measured_vae_peak(cfg, *shape, dtype, batch, device)
                rows.append((name, shape, batch, dtype, device, estimate, measured))
    for shape, batch in (((2, 224, 224), 1), ((4, 224, 448), 1), ((1, 224, 224), 3)):
        for dtype in ("bf16", "fp32"):
            estimate = vit_encode_peak_bytes(vit, *shape, dtype, batch)
            measured = measured_vit_peak(vit, *shape, dtype, batch)
            rows.append(("vit 3b widths", shape, batch, dtype, "cpu", estimate, measured))
    return rows


def main() -> None:
    """Print the estimate beside the measured peak for a few sizes (a minute or two on a CPU)."""
    print(f"{'encoder':<14} {'T x H x W':<14} {'batch':>5} {'dtype':<5} {'device':<6} "
          f"{'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6}")
    for name, shape, batch, dtype, device, estimate, measured in _calibration_rows():
        print(f"{name:<14} {'x'.join(map(str, shape)):<14} {batch:>5} {dtype:<5} {device:<6} "
              f"{estimate / 2**20:>12.1f} {measured / 2**20:>12.1f} {estimate / measured:>6.2f}")


if __name__ == "__main__":
    main()
