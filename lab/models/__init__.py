"""Model families, built from lab.nn layers: transformer.py (TransformerLM, GPT-2's architecture, its presets, its
config and the model directory's I/O in lab's and Hugging Face's GPT-2 layout) and proneural.py (ProNeuralLM, the
feed-forward baseline) and llama.py (LlamaLM: Llama, Qwen2 and Mistral, in transformers' layout).
"""
from pathlib import Path

from ..checks import show
from ..io import CheckpointError, read_json, reading
from .proneural import ProNeuralConfig, ProNeuralLM
from .llama import ARCHITECTURE_OF, PRESETS as _LLAMA_PRESETS, LlamaConfig, LlamaLM
from .transformer import CONFIG_FILE, PRESETS as _GPT2_PRESETS, TransformerConfig, TransformerLM

PRESETS = {**_GPT2_PRESETS, **_LLAMA_PRESETS}   # every family's, by name
MODELS = {TransformerConfig: TransformerLM, LlamaConfig: LlamaLM, ProNeuralConfig: ProNeuralLM}   # by config
# the model family of a transformers config.json's "architectures" (lab.from_pretrained picks with it)
ARCHITECTURES = {"LlamaForCausalLM": LlamaLM, "Qwen2ForCausalLM": LlamaLM, "MistralForCausalLM": LlamaLM,
                 "GPT2LMHeadModel": TransformerLM}


def load_pretrained(directory):
    """A model, in eval mode, from a directory that lab or transformers saved: config.json's "architectures" picks
    the family (lab's own GPT-2 layout names none: TransformerLM)."""
    d = Path(directory)
    if not d.is_dir():
        return TransformerLM.from_pretrained(d)   # (which says what is wrong with the path)
    with reading(d):   # config.json and the weights of one save
        return family(read_json(d / CONFIG_FILE, "model config"), d / CONFIG_FILE).from_pretrained(d)


def family(data, source):
    """The model class a config.json dict's "architectures" names; `source` (its file) is named in the error.
    Without "architectures": LlamaLM for a Llama-family model_type, else TransformerLM (lab's own layout, old GPT-2
    files), whose loader reads model_type."""
    names = data.get("architectures")
    if names is None:   # (the Llama family's model_type names it: transformers' Auto classes read that)
        return LlamaLM if data.get("model_type") in ARCHITECTURE_OF else TransformerLM
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{source}: \"architectures\" must be a list of model class names, got {show(names)} "
                              f"(lab loads {', '.join(ARCHITECTURES)})")
    if names[0] not in ARCHITECTURES:   # the first names the model class, as transformers reads it
        raise CheckpointError(f"{source}: architecture {names[0]} is not supported: lab loads "
                              f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[names[0]]
