"""The Lance model: shared embedding and heads around a stack of dual-stream layers.

Module names follow the released checkpoint (``language_model.model.layers.{i}.self_attn.q_proj...``,
``..._moe_gen`` for the GEN expert, ``time_embedder``, ``vae2llm``, ``llm2vae``, ``latent_pos_embed``),
so ``state_dict()`` already carries the Lance key names.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .attention import prepare_attention, resolve_backend
from .embeddings import LatentPositionTable, TimestepEmbedder
from .layer import DualStreamLayer, LayerCache, Routing, routed
from .layout import AttentionLayout
from .norms import RMSNorm
from .recompute import RecomputePolicy, run_layer
from .rotary import mrope_cos_sin
from .sequence_parallel import SequenceParallel


class _TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DualStreamLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = _TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


@dataclass
class TokenInputs:
    """What the backbone reads for a run of tokens (a packed batch or a slice of one)."""

    input_ids: torch.Tensor
    is_gen: torch.Tensor
    position_ids: torch.Tensor
    layout: AttentionLayout
    vae_positions: torch.Tensor
    vae_values: torch.Tensor
    vae_timesteps: torch.Tensor
    vae_grid: torch.Tensor
    vit_positions: torch.Tensor
    vit_features: torch.Tensor
    sequence_parallel: SequenceParallel | None = None
    """With sequence parallelism the per-token fields are this rank's chunk and ``layout`` is the whole
    (padded) pack's."""

    @classmethod
    def from_batch(cls, batch, vae_values=None, vae_timesteps=None) -> TokenInputs:
        """``vae_values``/``vae_timesteps`` default to the clean latents at t = 0."""
        values = batch.vae_latents if vae_values is None else vae_values
        times = torch.zeros(values.shape[0], device=values.device) if vae_timesteps is None else vae_timesteps
        return cls(batch.input_ids, batch.is_gen, batch.position_ids, AttentionLayout.from_batch(batch),
                   batch.vae_positions, values, times, batch.vae_grid, batch.vit_positions, batch.vit_features)


class LanceModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.language_model = _LanguageModel(cfg)
        self.time_embedder = TimestepEmbedder(cfg.hidden_size, cfg.timestep_freq_dim)
        self.vae2llm = nn.Linear(cfg.latent_channels, cfg.hidden_size)
        self.llm2vae = nn.Linear(cfg.hidden_size, cfg.latent_channels)
        self.latent_pos_embed = LatentPositionTable(cfg.hidden_size, cfg.latent_grid, cfg.max_latent_frames)
        self.activation_checkpointing: RecomputePolicy = "none"
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ setup
    def reset_parameters(self, gather: Callable[[nn.Module], ContextManager] | None = None) -> None:
        """The Lance initialisation, module by module. Parameters partitioned as they were created
        (DeepSpeed ZeRO-3 ``zero.Init``) hold no data here: the caller initialises them afterwards with a
        ``gather`` context that makes one module's parameters whole (same seed, same values)."""
        parameters = list(self.parameters())
        if any(p.device.type == "meta" for p in parameters):
            return
        if gather is None and any(hasattr(p, "ds_id") for p in parameters):
            return
        std = self.cfg.initializer_range
        for module in self.modules():
            with gather(module) if gather is not None else nullcontext():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, std=std)
                elif isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)
                elif isinstance(module, LatentPositionTable):
                    module.rebuild()

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def gen_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """GEN expert and the latent-token modules (what GRPO trains)."""
        return [(n, p) for n, p in self.named_parameters()
                if "_moe_gen" in n or n.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae")]

    # ------------------------------------------------------------------------------------------ forward
    def embed(self, inputs: TokenInputs) -> torch.Tensor:
        h = self.language_model.model.embed_tokens(inputs.input_ids)
        if inputs.vit_positions.numel():
            h = h.index_copy(0, inputs.vit_positions, inputs.vit_features.to(h.dtype))
        if inputs.vae_positions.numel() or inputs.sequence_parallel is not None:  # every rank calls every module
            vae = (self.vae2llm(inputs.vae_values.to(h.dtype))
                   + self.time_embedder(inputs.vae_timesteps)
                   + self.latent_pos_embed(inputs.vae_grid).to(h.dtype))
            h = h.index_copy(0, inputs.vae_positions, vae)
        return h

    def backbone(
        self, inputs: TokenInputs, cache: list[LayerCache] | None = None, keep_cache: bool = False,
    ) -> tuple[torch.Tensor, list[LayerCache] | None]:
        """Embeddings -> layers -> per-expert final norm. With ``cache`` the tokens continue a prefix."""
        cfg = self.cfg
        sp = inputs.sequence_parallel
        if sp is not None and (cache is not None or keep_cache):
            raise ValueError("sequence parallelism runs training forwards only, not the KV cache")
        h = self.embed(inputs)
        routing = Routing.from_mask(inputs.is_gen, every_expert=sp is not None)
        cos, sin = mrope_cos_sin(inputs.position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, h.dtype)
        backend = resolve_backend(cfg.attention_backend, h.device, h.dtype)
        prepared = None
        if cache is None:
            backend, prepared = prepare_attention(inputs.layout, backend, cfg.flex_block_size)
        new_caches = [] if keep_cache else None
        for index, layer in enumerate(self.layers):
            layer_cache = cache[index] if cache is not None else None
            args = (routing, cos, sin, inputs.layout, backend, prepared, layer_cache, keep_cache, sp)
            h, new = run_layer(layer, self.activation_checkpointing, self.training, h, *args)
            if keep_cache:
                new_caches.append(new)
        model = self.language_model.model
        return routed(h, model.norm, model.norm_moe_gen, routing), new_caches

    def text_logits(self, hidden: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
        """lm_head logits cut to the tokenizer's length: ``vocab_limit``, else ``cfg.text_vocab`` (the
        release's ``vocab_size_efficient``), else all rows."""
        logits = self.language_model.lm_head(hidden)
        rows = min(vocab_limit or self.cfg.logit_rows, logits.shape[-1])
        return logits if rows == logits.shape[-1] else logits[..., :rows]

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden)

    def forward(self, inputs: TokenInputs) -> torch.Tensor:
        return self.backbone(inputs)[0]


def build_model(cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Build :class:`LanceModel`; ``device="meta"`` allocates nothing (parameter counting, sharded init)."""
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            model = LanceModel(cfg)
    else:
        model = LanceModel(cfg)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
    return model
