from .proneural import ProNeuralConfig, ProNeuralLM
from .transformer import PRESETS, TransformerConfig, TransformerLM
