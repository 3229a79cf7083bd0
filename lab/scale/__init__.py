"""Scale out: hand a run to PyTorch's distributed training when it outgrows one machine, and take it back.

    python -m lab export --checkpoint runs/quickstart --format hf --out runs/hf
    torchrun --nproc_per_node 2 -m lab.scale.ddp_train --model runs/hf --out runs/hf-ddp
    python -m lab import runs/hf-ddp --out runs/back

The exported directory is the Hugging Face GPT-2 layout (model.safetensors, config.json), a `tokenizer.json`
that transformers' PreTrainedTokenizerFast loads, lab's own tokenizer file
(lab_tokenizer.json; a pretrained tokenizer brings its own files instead), and, for LoRA runs, the PEFT adapter in adapter/. Importing gives back a lab model,
tokenizer and adapter, so generation, the attention heatmap and the diagnostics work on the result.
"""
import json
from pathlib import Path

import numpy as np

from ..checks import InputError
from ..checkpoint import CheckpointError, checkpoint_files, load_checkpoint, tokenizer_of
from ..data import LAB_TOKENIZER_FILE, TOKENIZER_SIDE_FILES, write_tokenizer
from ..io import atomic_files, directory_path, reading
from ..models import load_pretrained

HF_TOKENIZER_FILE = "tokenizer.json"           # the `tokenizers` library's format
ADAPTER_DIR = "adapter"


def hf_tokenizer_json(tokenizer):
    """A lab tokenizer as the `tokenizers` library's JSON. A BPE one is in that format already; a character one
    becomes a Split on any character (kept isolated), a WordLevel vocabulary, and a decoder that concatenates."""
    from ..data import CharTokenizer
    if not isinstance(tokenizer, CharTokenizer):
        return json.loads(tokenizer.to_json())
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": dict(tokenizer.stoi), "unk_token": tokenizer.chars[0]},
    }


def _find_adapter(checkpoint, adapter):
    if adapter is not None:
        return Path(adapter)
    for d in (Path(checkpoint), Path(checkpoint) / ADAPTER_DIR):
        if (d / "adapter_config.json").is_file():
            return d
    return None


def _same_adapter_beside(model, adapter_dir, checkpoint):
    """A LoRA checkpoint's adapters are the run's own: an adapter found in its directory (saved there at another
    step, or by another run) must hold their values, or the export would carry it in their place."""
    from .. import lora
    own = [(m, m.lora_A.numpy().copy(), m.lora_B.numpy().copy(), m.scale) for _, m in lora.adapters(model)]
    try:
        lora.load_adapter(model, adapter_dir)
        why = "" if all(np.array_equal(a, m.lora_A.numpy()) and np.array_equal(b, m.lora_B.numpy()) and s == m.scale
                        for m, a, b, s in own) else "other values"
    except CheckpointError as e:
        why = str(e)
    if why:
        raise CheckpointError(f"{checkpoint}: holds LoRA adapters of its own (in its weights), and {adapter_dir} "
                              f"another adapter ({why}): pass adapter= (--adapter {adapter_dir}) to export that "
                              f"one, or move it out of the checkpoint to export the checkpoint's own")


def _apart(source, out):
    """The two layouts share file names (model.safetensors, config.json, tokenizer.json in another format):
    converting a directory onto itself would overwrite the files it is read from."""
    if directory_path(out, "save").resolve() == directory_path(source, "load").resolve():
        raise InputError(f"out {out} is the directory being converted ({source}): its files would be overwritten "
                         f"in the other layout; choose another directory")


def export_checkpoint(checkpoint, out, format="hf", adapter=None):
    """Write a lab checkpoint (and its LoRA adapter, if any) in the Hugging Face layout of its family (GPT-2's, or
    LlamaForCausalLM's and its kin's). Returns `out`."""
    if format != "hf":
        raise InputError(f"unknown export format {format!r}: the supported format is 'hf' (Hugging Face's layout "
                         f"of the model's family)")
    _apart(checkpoint, out)
    from .. import lora
    with reading(checkpoint):   # the model, tokenizer and adapter of one save
        model, tokenizer, _ = load_checkpoint(checkpoint)
        adapter_dir = _find_adapter(checkpoint, adapter)
        if adapter_dir is not None and adapter is None and lora.adapters(model):
            _same_adapter_beside(model, adapter_dir, checkpoint)
        elif adapter_dir is not None:
            lora.load_adapter(model, adapter_dir)   # checks that the adapter fits this base before anything is written
    has_adapter = bool(lora.adapters(model))    # the one given, or a LoRA run's own (its checkpoint holds it)
    if has_adapter:
        lora.unmerge(model)   # the base goes out without the update: adapter/ carries it
    out = Path(out)
    # one save: the base with its adapter, or with an earlier export's adapter removed (it belongs to other weights:
    # import would put it on this base), so that no interruption pairs one base with another's adapter
    with atomic_files(out, remove=(*TOKENIZER_SIDE_FILES, *(() if has_adapter else _adapter_names()))) as files:
        model.write_files(files, "hf")
        if callable(getattr(tokenizer, "to_json", None)):   # lab's own: its file, and the same for transformers
            files.write_text(LAB_TOKENIZER_FILE, tokenizer.to_json())
            files.write_json(HF_TOKENIZER_FILE, hf_tokenizer_json(tokenizer))
            files.write_json("tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                       "model_max_length": model.config.block_size,
                                                       "lab_tokenizer": type(tokenizer).__name__})
        else:   # a pretrained tokenizer: its own files
            write_tokenizer(files, tokenizer)
        if has_adapter:
            # The adapter names the exported directory as its base, as PEFT expects.
            lora.write_adapter(model, files, base_model_name_or_path=str(out.resolve()), subdir=ADAPTER_DIR)
    return out


def _adapter_names():
    """adapter/'s two files, as names in the directory above it (one save writes or removes them with the base)."""
    from .. import lora
    return tuple(f"{ADAPTER_DIR}/{name}" for name in (lora.ADAPTER_FILE, lora.ADAPTER_CONFIG))


def import_model(directory, out=None):
    """(model, tokenizer) from a directory in the Hugging Face layout of a family lab knows (exported by lab, or
    trained by PyTorch / transformers from one: GPT-2, Llama, Qwen2, Mistral), with its adapter/ loaded when present. With `out`, also saves a lab checkpoint there that
    `python -m lab generate --checkpoint` and the widgets use."""
    from .. import lora
    d = directory_path(directory, "load")
    if out is not None:
        _apart(d, out)
    with reading(d):   # the model, tokenizer and adapter of one export
        model = load_pretrained(d)
        tokenizer = tokenizer_of(d, model)
        adapter_dir = d / ADAPTER_DIR
        adapter_files = {}
        if (adapter_dir / "adapter_config.json").is_file():
            with reading(adapter_dir):   # the bytes copied to `out` are those loaded
                lora.load_adapter(model, adapter_dir)
                adapter_files = {name: (adapter_dir / name).read_bytes() for name in (lora.ADAPTER_FILE,
                                                                                       lora.ADAPTER_CONFIG)}
    if out is not None:   # the checkpoint and the adapter's two files as they were loaded, in one save
        with checkpoint_files(out, model, tokenizer, remove=() if adapter_files else _adapter_names()) as files:
            for name, content in adapter_files.items():
                files.path(f"{ADAPTER_DIR}/{name}").write_bytes(content)
    return model, tokenizer
