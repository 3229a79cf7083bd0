from .transformer import PRESETS, TransformerConfig, TransformerLM
