from .attention import packed_attention
from .lance import LanceModel, TokenInputs, build_model
from .layer import LayerCache, Routing
from .layout import AttentionLayout, mask_rule

__all__ = ["AttentionLayout", "LanceModel", "LayerCache", "Routing", "TokenInputs", "build_model", "mask_rule",
           "packed_attention"]
