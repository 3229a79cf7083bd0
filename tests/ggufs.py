"""Small GGUF files written as llama.cpp's converter writes them (q/k rows permuted, dims fastest-first), from
random HF-named tensors, for the GGUF reader's tests and the fuzz suite."""
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

# GPT-2's byte alphabet: the token strings of a byte-level vocabulary's 256 single bytes
_KEEP = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
BYTE_TOKENS = [chr(b) if b in _KEEP else chr(256 + [c for c in range(256) if c not in _KEEP].index(b))
               for b in range(256)]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # ids 258, 259, 260
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def permute(w, heads):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: HF's rotate-half rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(layers=2, hidden=64, heads=4, kv_heads=2, inter=96, vocab=264, tied=True, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    t = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        t["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                  p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
                  p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
                  p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                  p + "mlp.down_proj.weight": (hidden, inter)})
        if bias:
            t.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv_heads * hd,),
                      p + "self_attn.v_proj.bias": (kv_heads * hd,)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf):
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}.{suffix}"
    return f"{GGUF_NAMES[stem]}.{suffix}"


def write_gguf(path, tensors, arch="llama", heads=4, kv_heads=2, qtype="F32", context=128, eps=1e-5, theta=1e4,
               tokenizer=True, extra=None, raw_tensors=None):
    """`tensors` (HF names, HF layout) into a GGUF at `path`: 2-D weights stored as `qtype`, norms and biases as
    F32 (as llama.cpp stores them); llama's q/k rows permuted as its converter does."""
    w = GGUFWriter(str(path), arch)
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    layers = len({k.split(".")[2] for k in tensors if k.startswith("model.layers.")})
    w.add_uint32(f"{arch}.context_length", context)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", tensors["model.layers.0.mlp.up_proj.weight"].shape[0])
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", eps)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    if tokenizer:
        tokens = (BYTE_TOKENS + ["hi", "\u0120hi"] + SPECIALS + [f"<extra_{i}>" for i in range(vocab)])[:vocab]
        w.add_tokenizer_model("gpt2")
        w.add_string("tokenizer.ggml.pre", "gpt-2")
        w.add_token_list(tokens)
        w.add_token_merges(["h i", "\u0120 hi"])
        w.add_array("tokenizer.ggml.token_type", [1] * 258 + [3] * (vocab - 258))
        w.add_uint32("tokenizer.ggml.bos_token_id", 258)
        w.add_uint32("tokenizer.ggml.eos_token_id", 260)
        w.add_chat_template(TEMPLATE)
    for key, value in (extra or {}).items():   # after the defaults: gguf's writer keeps a repeated key's last value
        (w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    q = getattr(GGMLQuantizationType, qtype)
    for name, x in tensors.items():
        if arch == "llama" and ".q_proj." in name:
            x = permute(x, heads)
        elif arch == "llama" and ".k_proj." in name:
            x = permute(x, kv_heads)
        if x.ndim == 2 and q != GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), quantize(x, q), raw_dtype=q)
        else:
            w.add_tensor(gguf_name(name), x)
    for name, x in (raw_tensors or {}).items():   # under their GGUF names, as they are
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
