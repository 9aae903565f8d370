"""The Lance model and its mathematics, importable without Ray.

Configs and presets (``config``), the dual-stream transformer (``model``), positions (``positions``),
multi-task packing (``packing``), flow matching (``flow``), samplers (``sampling``), encoders
(``encoders``), tokenizers (``tokenizer``), checkpoint I/O (``checkpoint``) and FLOP counting (``flops``).
"""
