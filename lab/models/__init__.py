"""Model families, built from lab.nn layers: transformer.py (TransformerLM, GPT-2's architecture, its presets, its
config and the model directory's I/O in lab's and Hugging Face's GPT-2 layout) and proneural.py (ProNeuralLM, the
feed-forward baseline).
"""
from .proneural import ProNeuralConfig, ProNeuralLM
from .transformer import PRESETS, TransformerConfig, TransformerLM
