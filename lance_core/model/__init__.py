from .attention import AttentionLayout, mask_rule, packed_attention
from .lance import LanceModel, TokenInputs, build_model
from .layer import LayerCache, Routing

__all__ = ["AttentionLayout", "LanceModel", "LayerCache", "Routing", "TokenInputs", "build_model", "mask_rule",
           "packed_attention"]
