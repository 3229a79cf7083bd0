"""GGUF files (llama.cpp's format) read into what lab loads from the Hub: a config.json-style dict and float32
tensors under Hugging Face's names and layouts, or the packed quantized blocks as they are in the file.

A GGUF is not trusted: every tensor's type, shape and extent is checked against the file's size before any of it
is read, so a damaged or hostile file is one CheckpointError naming it, never a huge allocation.
"""
import math
import re
from pathlib import Path

import numpy as np

from .io import CheckpointError, LazyTensor, _expect_file

# What lab reads, in one place: the types dequantized to float32, and those whose packed blocks a kernel can use as
# they are (a Q4_0/Q4_1 block: a float16 scale (and min) and 32 4-bit values; Q8_0: a float16 scale and 32 int8)
DEQUANTIZED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
# general.architecture -> the HF architecture; llama.cpp also writes Mistral as "llama"
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

# llama.cpp's tensor names -> HF's (suffix .weight or .bias kept)
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _reader_class():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        """gguf's reader, with each tensor's type, dims and extent checked against the file's size before it
        makes the tensor's view (its own check is a failed reshape, after the slice)."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                name = bytes(name).decode("utf-8", errors="replace")
                try:
                    kind = GGMLQuantizationType(int(raw_type[0])).name
                except ValueError:
                    raise _Damaged(f"tensor {name} has unknown quantization type number {int(raw_type[0])}; "
                                   f"supported: {', '.join(DEQUANTIZED_TYPES)}") from None
                if kind not in DEQUANTIZED_TYPES:
                    raise _Damaged(f"tensor {name} is of quantization type {kind}, which lab does not read; "
                                   f"supported: {', '.join(DEQUANTIZED_TYPES)}")
                dims = [int(d) for d in dims]   # python ints: numpy's product of uint64 wraps silently
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
                if not dims or min(dims) < 1 or dims[0] % block:
                    raise _Damaged(f"tensor {name} of type {kind} has dims {dims}: each must be positive and the "
                                   f"first a multiple of its block of {block} values")
                nbytes = math.prod(dims) // block * block_bytes
                start = start_offs + int(offset[0])
                if start + nbytes > size:
                    raise _Damaged(f"tensor {name} ({kind}, dims {dims}: {nbytes} bytes at offset {start}) runs "
                                   f"past the end of the file ({size} bytes; truncated?)")
            super()._build_tensors(start_offs, fields)
    return CheckedReader


class _Damaged(Exception):
    pass


def _open(path):
    """gguf's reader of `path`, every tensor checked to lie inside the file. Every failure names the file."""
    path = Path(path)
    _expect_file(path, "GGUF file")
    size = path.stat().st_size
    if size < 24:   # magic, version, tensor and key counts
        raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF file (truncated?)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:   # the reader maps the file; what it finds past the end surfaces as one of these
        reader = _reader_class()(path)
    except _Damaged as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"{path}: damaged GGUF file ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":   # the quantized blocks' float16 scales would be read byte-swapped
        raise CheckpointError(f"{path}: a big-endian GGUF file; lab reads little-endian GGUF files only")
    return reader


def _field(reader, key, path, kind=None, default=None):
    """A metadata value; `kind` (int, float, str) checks it; absent: `default` or, without one, an error."""
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise CheckpointError(f"{path}: GGUF metadata {key} is missing")
        return default
    try:
        value = f.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: GGUF metadata {key} is damaged ({e})") from None
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
          str: lambda v: isinstance(v, str), None: lambda v: True}[kind]
    if not ok(value):
        what = {int: "a positive integer", float: "a positive finite number", str: "a string"}[kind]
        raise CheckpointError(f"{path}: GGUF metadata {key} = {str(value)[:80]!r}: expected {what}")
    if kind is float:   # stored as float32: 1e-05 comes back as 9.99999974e-06; the shortest float32 spelling is
        value = float(str(np.float32(value)))   # the number the converter was given
    return value


def read_config(path):
    """The HF config.json dict a GGUF file's metadata describes (architecture llama or qwen2)."""
    path = Path(path)
    return _config(_open(path), path)


def _config(reader, path):
    arch = _field(reader, "general.architecture", path, str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; lab reads "
                              f"{', '.join(sorted(ARCHITECTURES))}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:   # llama3 rope scaling as per-frequency factors: no HF rope_scaling to give
        raise CheckpointError(f"{path}: rope_freqs.weight (llama3 rope scaling stored as frequency factors) is not "
                              f"supported yet: load the model's Hugging Face checkpoint instead")
    architecture, model_type = ARCHITECTURES[arch]
    key = lambda k: f"{arch}.{k}"   # noqa: E731
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else _field(reader, key("vocab_size"), path, int)
    hidden = _field(reader, key("embedding_length"), path, int)
    heads = _field(reader, key("attention.head_count"), path, int)
    cfg = {
        "architectures": [architecture], "model_type": model_type, "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _field(reader, key("feed_forward_length"), path, int),
        "num_hidden_layers": _field(reader, key("block_count"), path, int),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, key("attention.head_count_kv"), path, int, default=heads),
        "max_position_embeddings": _field(reader, key("context_length"), path, int),
        "rms_norm_eps": _field(reader, key("attention.layer_norm_rms_epsilon"), path, float),
        "rope_theta": _field(reader, key("rope.freq_base"), path, float, default=10000.0),
        "rope_scaling": _rope_scaling(reader, key, path),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if arch == "llama":   # qwen2's rotary dims may be partial; its head_dim is always hidden / heads
        cfg["head_dim"] = _field(reader, key("attention.key_length"), path, int,
                                 default=_field(reader, key("rope.dimension_count"), path, int,
                                                default=hidden // heads))
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    for name, k in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        f = reader.fields.get(f"tokenizer.ggml.{k}")
        if f is not None:
            cfg[name] = int(f.contents())
    return cfg


def _rope_scaling(reader, key, path):
    kind = _field(reader, key("rope.scaling.type"), path, str, default="none")
    if kind == "none":
        return None
    if kind != "linear":
        raise CheckpointError(f"{path}: GGUF rope scaling type {kind!r} is not supported; lab reads 'linear' "
                              f"(and llama3 from Hugging Face checkpoints)")
    return {"rope_type": "linear", "factor": _field(reader, key("rope.scaling.factor"), path, float)}


def _hf_name(name, path):
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise CheckpointError(f"{path}: tensor {name!r} is not part of a Llama-family model")


def _unpermute(rows, heads, name, path):
    """llama.cpp's converter reorders each head's rows of q_proj and k_proj (weight and bias) from HF's rotate-half
    rotary layout to interleaved pairs; this puts them back (transformers' GGUF loader does the same). The rows
    move whole, so it applies to packed quantized rows as well as to floats."""
    if rows.shape[0] % (2 * heads):
        raise CheckpointError(f"{path}: tensor {name} has {rows.shape[0]} rows, not a multiple of 2 x {heads} heads")
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _tensors(reader, cfg, path, convert, shape, dtype):
    """{HF name: LazyTensor of convert(tensor), shape(tensor), dtype} with llama's q/k rows put back in HF order."""
    out = {}
    for t in reader.tensors:
        heads = None
        if cfg["architectures"] == ["LlamaForCausalLM"] and ".attn_q." in t.name:
            heads = cfg["num_attention_heads"]
        elif cfg["architectures"] == ["LlamaForCausalLM"] and ".attn_k." in t.name:
            heads = cfg["num_key_value_heads"]

        def read(t=t, heads=heads):
            data = convert(t)
            return data if heads is None else _unpermute(data, heads, t.name, path)
        out[_hf_name(t.name, path)] = LazyTensor(shape(t), dtype, read)
    return out


def _stored(t, path):
    """t's data (the reader's view of it: its shape and dtype) read from the file: reading it through the reader's
    memory map would keep those pages of the file resident beside the floats made from them."""
    raw = np.fromfile(path, dtype=t.data.dtype, count=t.data.size, offset=t.data_offset)
    if raw.size != t.data.size:   # (checked against the file's size when opened: it changed since)
        raise CheckpointError(f"{path}: tensor {t.name} runs past the end of the file (changed while read?)")
    return raw.reshape(t.data.shape)


# values dequantized per call: gguf's dequantize holds its whole output twice (a list of parts, then their
# concatenation) and widens each part further, so a large tensor goes through it a slab of rows at a time
_SLAB = 1 << 20


def read_tensors(path):
    """(config dict as in HF's config.json, {HF tensor name: LazyTensor, float32 in HF's layout}) of a llama or
    qwen2 GGUF file: each tensor is read and dequantized when asked for (np.asarray), refused by name if it holds
    NaN or Inf. GGUF lists dims fastest-moving first: numpy's shape is their reverse, which is HF's (out, in) for a
    linear layer."""
    from gguf.quants import dequantize
    path = Path(path)
    reader = _open(path)
    cfg = _config(reader, path)
    hf_shape = lambda t: [int(d) for d in reversed(t.shape)]   # noqa: E731

    def floats(t):
        raw = _stored(t, path)
        out = np.empty(hf_shape(t), dtype=np.float32)
        if raw.ndim < 2:   # a 1-D tensor's blocks are not rows: one slab
            raw = raw[None]
        rows = out.reshape(raw.shape[0], -1)
        step = max(1, _SLAB // rows.shape[1])
        for i in range(0, rows.shape[0], step):
            with np.errstate(all="ignore"):   # a damaged scale gives Inf or NaN: refused below, by name
                w = dequantize(raw[i:i + step], t.tensor_type)
            if not np.isfinite(w).all():
                raise CheckpointError(f"{path}: tensor {t.name} holds NaN or Inf")
            rows[i:i + step] = w.reshape(-1, rows.shape[1])
        return out
    return cfg, _tensors(reader, cfg, path, floats, hf_shape, np.float32)


def read_gguf(path):
    """read_tensors with every tensor read: (config dict, {HF tensor name: float32 numpy array in HF's layout})."""
    cfg, tensors = read_tensors(path)
    return cfg, {name: np.asarray(t) for name, t in tensors.items()}


def read_packed(path):
    """{HF name: (packed bytes (rows, bytes per row) uint8, type name, HF shape)} for the tensors stored in one of
    PACKED_TYPES: the blocks as the file holds them (q/k rows in HF order), for kernels that compute on them."""
    path = Path(path)
    reader = _open(path)
    cfg = _config(reader, path)
    packed = [t for t in reader.tensors if t.tensor_type.name in PACKED_TYPES]
    kinds = {_hf_name(t.name, path): (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape))) for t in packed}
    reader.tensors = packed
    blocks = _tensors(reader, cfg, path, lambda t: _stored(t, path), lambda t: t.data.shape, np.uint8)
    return {name: (np.asarray(data), *kinds[name]) for name, data in blocks.items()}
