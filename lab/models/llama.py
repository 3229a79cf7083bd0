"""LlamaLM: the Llama family (Llama, Qwen2, Mistral without sliding window), readable in one sitting.

Token embedding, num_hidden_layers pre-RMSNorm blocks of grouped-query causal self-attention with rotary position
embeddings and a SwiGLU MLP, a final RMSNorm and an output head (tied to the embedding or its own). Module names
mirror transformers' LlamaForCausalLM, so its checkpoints map name for name. Shapes: B batch, T time, C hidden,
H query heads, Hkv key-value heads, G = H / Hkv query heads per key-value head, D head_dim.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import nn
from ..checks import InputError, integer, real, show
from ..engine import ops as F
from ..engine.backend import contiguous_strides, get_backend
from ..engine.tensor import Tensor, tensor
from .transformer import (attend, check_cache, check_pad, check_return_logits, empty_cache, lm_outputs, padding_mask,
                          row_positions, sublayers)
from ..interp.hooks import HookedModel
from ..io import (GENERATION_FILE, CheckpointError, LazyTensor, atomic_files, check_floats, read_json, read_weights, reading,
                  weights_file, with_generation_config)
from ..lora import Adapters, apply_config, checkpoint_config

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
ARCHITECTURE_OF = {t: a for a, t in MODEL_TYPES.items()}
ROPE_TYPES = ("default", "linear", "llama3")
MAX_POSITIONS = {"LlamaForCausalLM": 2048, "Qwen2ForCausalLM": 32768, "MistralForCausalLM": 131072}   # HF's defaults


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = None       # default: num_attention_heads (plain multi-head attention)
    head_dim: int = None                  # default: hidden_size // num_attention_heads
    max_position_embeddings: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None             # None, {"rope_type": "linear", "factor"} or llama3's, as in config.json
    attention_bias: bool = False          # Llama's bias on q, k, v and o (Qwen2 has q/k/v biases by architecture)
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int = None
    eos_token_id: object = None           # an int, a list of ints (any of them ends generation) or None
    dropout: float = 0.0                  # on the attention weights while training (HF's attention_dropout)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            setattr(self, name, integer(name, getattr(self, name), low=1))   # (4.0 is 4; a shape needs an int)
        if self.hidden_size % self.num_attention_heads:   # (transformers refuses it even with head_dim given)
            raise InputError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.head_dim = integer("head_dim", self.head_dim, low=2)
        if self.head_dim % 2:  # rotary embeddings rotate pairs of dimensions
            raise InputError(f"head_dim must be even (rotary embeddings rotate halves), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")
        self.rms_norm_eps = real("rms_norm_eps", self.rms_norm_eps, low=0, low_open=True)
        self.rope_theta = real("rope_theta", self.rope_theta, low=0, low_open=True)
        self.dropout = real("dropout", self.dropout, low=0, high=1)
        if self.dropout == 1:
            raise InputError("dropout must be a number in [0, 1), got 1")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {show(getattr(self, name))}")
        if self.architecture not in MODEL_TYPES:
            raise InputError(f"architecture must be one of {list(MODEL_TYPES)}, got {show(self.architecture)}")
        if self.architecture != "LlamaForCausalLM" and (self.attention_bias or self.mlp_bias):
            # transformers' Qwen2/Mistral have fixed biases: a saved model would not load with these
            raise InputError(f"{self.architecture} has no attention_bias/mlp_bias option (got "
                             f"attention_bias={self.attention_bias}, mlp_bias={self.mlp_bias}); use LlamaForCausalLM")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) and name == "eos_token_id" else [value]
            for v in ids:
                if v is not None:
                    integer(name, v, low=0, high=self.vocab_size - 1)
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def block_size(self):
        """The longest sequence the model takes (generate and the Trainer read it)."""
        return self.max_position_embeddings

    @property
    def qkv_bias(self):
        return self.attention_bias or self.architecture == "Qwen2ForCausalLM"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_hf(cls, data, source=None):
        """From a transformers config.json dict; `source` (its path) is named in every error."""
        where = f"{source}: " if source is not None else "config.json: "
        try:
            if not isinstance(data, dict):
                raise CheckpointError(f"{where}expected a JSON object, got {show(data)}")
            archs = data.get("architectures") or []
            # a config naming no class (hand-written) is its model_type's, as transformers' Auto classes read it
            arch = archs[0] if isinstance(archs, list) and archs else ARCHITECTURE_OF.get(data.get("model_type"))
            if arch not in MODEL_TYPES:
                raise CheckpointError(f"{where}architectures {show(data.get('architectures'))} is not supported by "
                                      f"LlamaLM (supported: {', '.join(MODEL_TYPES)})")
            act = data.get("hidden_act", "silu")
            if act != "silu":
                raise CheckpointError(f"{where}hidden_act {show(act)} is not supported (the Llama family uses silu)")
            # a field the file leaves out takes transformers' default for the architecture
            mistral = arch == "MistralForCausalLM"
            max_positions = data.get("max_position_embeddings", MAX_POSITIONS[arch])
            window = data.get("sliding_window", 4096 if mistral else None)
            uses_window = mistral or data.get("use_sliding_window", False)   # (Mistral has no such switch)
            if uses_window and not mistral:   # Qwen2 slides only the layers its layer_types name, by default those
                types = data.get("layer_types")   # from max_window_layers on: none when that is every layer
                uses_window = "sliding_attention" in types if isinstance(types, list) else \
                    data.get("max_window_layers", 28) < data["num_hidden_layers"]
            if uses_window and window is not None and window < max_positions:
                raise CheckpointError(f"{where}sliding_window={window} is smaller than max_position_embeddings="
                                      f"{max_positions}: sliding-window attention is not supported")
            # transformers 5 writes rope_parameters {"rope_type", "rope_theta", ...}; older files rope_theta and
            # rope_scaling
            rope = dict(data.get("rope_parameters") or {})
            theta = rope.pop("rope_theta", data.get("rope_theta", 10000.0))
            scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
            if scaling is None and data.get("rope_scaling"):
                scaling = data["rope_scaling"]
            fields = dict(
                vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
                intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
                num_attention_heads=data["num_attention_heads"],
                num_key_value_heads=data.get("num_key_value_heads"), head_dim=data.get("head_dim"),
                max_position_embeddings=max_positions,
                rms_norm_eps=data.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                attention_bias=data.get("attention_bias", False) if arch == "LlamaForCausalLM" else False,
                mlp_bias=data.get("mlp_bias", False) if arch == "LlamaForCausalLM" else False,
                tie_word_embeddings=data.get("tie_word_embeddings", False),
                architecture=arch, bos_token_id=data.get("bos_token_id"), eos_token_id=data.get("eos_token_id"),
                dropout=data.get("attention_dropout", 0.0))
            return cls(**fields)
        except CheckpointError:
            raise
        except KeyError as e:
            raise CheckpointError(f"{where}the config is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}invalid {data.get('architectures')} config ({e})") from None

    def to_hf(self):
        """The config.json dict transformers loads for this architecture."""
        out = {"architectures": [self.architecture], "model_type": MODEL_TYPES[self.architecture],
               "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
               "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
               "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
               "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
               "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu", "initializer_range": 0.02,
               "attention_dropout": self.dropout, "bos_token_id": self.bos_token_id,
               "eos_token_id": self.eos_token_id, "torch_dtype": "float32", "use_cache": True}
        if self.architecture == "LlamaForCausalLM":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        else:
            out.update(sliding_window=None, use_sliding_window=False)
        return out


def _check_rope_scaling(scaling):
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise InputError(f"rope_scaling must be None or a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, "
                         f"got {show(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise InputError(f"rope_scaling: unknown rope_type {show(kind)} (supported: {', '.join(ROPE_TYPES)})")
    need = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    for key in need:
        if key not in scaling:
            raise InputError(f"rope_scaling of type {kind!r} needs {key!r}, got {show(scaling)}")
        real(f"rope_scaling[{key!r}]", scaling[key], low=0, low_open=True)
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise InputError(f"rope_scaling: high_freq_factor ({scaling['high_freq_factor']}) must be above "
                         f"low_freq_factor ({scaling['low_freq_factor']})")
    return {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": kind}


def rope_tables(cfg, n=None):
    """cos and sin (n, head_dim) of positions 0..n-1 (n: max_position_embeddings) as transformers'
    ROPE_INIT_FUNCTIONS and LlamaRotaryEmbedding compute them, in float32 as it does (so positions far out round
    the same way)."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif scaling["rope_type"] == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (beyond the original context) slowed by factor, short ones kept, smooth between
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    freqs = np.arange(cfg.max_position_embeddings if n is None else n, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)                              # (T, D)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        self.weight = nn.parameter(np.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)

    def residual_forward(self, x, r):
        """(x + r, this norm of x + r) in one pass over the rows (F.add_rms_norm): a layer's residual add and the
        RMSNorm after it."""
        if type(self).forward is not RMSNorm.forward or "forward" in vars(self):
            # a forward of its own (a subclass's, a patched one) must not be bypassed by the fused kernel
            return super().residual_forward(x, r)
        return F.add_rms_norm(x, r, self.weight, self.eps)


class LlamaAttention(nn.Module):
    _hooks = None   # lab.interp's points on q, k, v, scores, pattern or z (they take the composed path)

    def __init__(self, cfg):
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(C, self.n_head * D, cfg.qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * D, cfg.qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * D, cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * D, C, cfg.attention_bias)
        self.attn_dropout = cfg.dropout

    def forward(self, x, cos, sin, cache=None, pos=0, return_weights=False, pad=None):
        """x (B, T, C) at positions pos..pos+T-1; cos, sin (P, D) of positions 0..P-1, P >= pos + T. With a cache
        (keys and values (B, Hkv, block, D)) the new keys and values are written into it and attention reads all
        pos+T."""
        Bsz, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if T == 1 and cache is not None and not (return_weights or self._hooks or self.training and self.attn_dropout):
            layers = (self.q_proj, self.k_proj, self.v_proj)
            # one product for the three where the backend takes them (the packed projection; decode_attention
            # then applies: no gradient is wanted of it)
            qkv = nn.fused_linears(x, layers) if x.backend.decode_attention_fits(D) else None
            qkv = tuple(layer(x) for layer in layers) if qkv is None else qkv
            if F.decode_attention_applies(qkv, D):   # rotary, cache write, GQA and the head merge in one pass
                return self.o_proj(F.decode_attention(qkv, cache, pos, H, pad, rope=(cos, sin)))
            return self._attend(x, cos, sin, cache, pos, return_weights, pad, qkv)
        return self._attend(x, cos, sin, cache, pos, return_weights, pad)

    def _attend(self, x, cos, sin, cache, pos, return_weights, pad, qkv=None):
        """forward by the composed ops (qkv: the three projections of x where made already)."""
        Bsz, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        G = H // Hkv
        if not (qkv or self._hooks or return_weights or cache is not None or pad is not None or pos) and \
                x.backend.flash_attention_fits((Bsz, T, (H + 2 * Hkv) * D), H, Hkv, rotary=True):
            # the fused kernels rotate q and k themselves and read kv head h // G: the three projections side by
            # side (B, T, (H + 2 Hkv) D) are all they need, one product of the weights side by side where the
            # layers are plain (F.linears), not three outputs copied together
            layers = (self.q_proj, self.k_proj, self.v_proj)
            packed = (F.linears(x, [t.weight for t in layers], [t.bias for t in layers])
                      if all(isinstance(t, nn.Linear) and t.plain for t in layers)
                      else F.concat([t(x) for t in layers], axis=2))
            y = F.causal_self_attention(packed, H, self.attn_dropout, self.training, n_kv_head=Hkv, rope=(cos, sin))
            return self.o_proj(y)
        q_in, k_in, v_in = qkv or (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        # query heads grouped under the key-value head they share (transformers' repeat_kv: head h reads kv head
        # h // G), so one batched product per kv head serves its G query heads: keys and values are never repeated
        # (rotary splits the heads off the projections in its pass: heads h = kv * G + g in q's columns)
        if pad is None:
            q = F.rotary(q_in, cos, sin, pos, heads=H).reshape(Bsz, Hkv, G, T, D)   # (B, Hkv, G, T, D)
            k = F.rotary(k_in, cos, sin, pos, heads=Hkv)                             # (B, Hkv, T, D)
        else:   # left-padded rows: each row's positions (the fused rotary takes one pos for all rows)
            positions = row_positions(pad, pos, T)
            q = _rotary_rows(q_in, cos, sin, positions, H).reshape(Bsz, Hkv, G, T, D)
            k = _rotary_rows(k_in, cos, sin, positions, Hkv)
        v = v_in.reshape(Bsz, T, Hkv, D).permute(0, 2, 1, 3)                     # (B, Hkv, T, D)
        hook = self._hooks
        if hook:   # lab.interp's points, each (B, T, heads, D), then an attention whose insides are tensors
            q, k, v = (hook(name, t.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
                       for name, t in (("hook_q", q.reshape(Bsz, H, T, D)), ("hook_k", k), ("hook_v", v)))
            if cache is not None:
                k, v = _extend_cache(cache, k, v, pos)
            y, att = attend(hook, q, k, v, pos, pad, self.attn_dropout, self.training)
            y = self.o_proj(y)
            return (y, att) if return_weights else y
        if cache is not None:
            k, v = _extend_cache(cache, k, v, pos)                                # (B, Hkv, S, D), S = pos + T
        S = k.shape[2]
        scores = F.matmul(q.reshape(Bsz, Hkv, G * T, D), k, transpose_b=True)    # (B, Hkv, G*T, S)
        scores = scores.reshape(Bsz, Hkv, G, T, S)
        if T > 1 and S > T:   # new tokens after cached ones: token i sees positions up to pos + i
            scores = scores + _offset_mask(T, S)
        if pad is not None:
            scores = scores + padding_mask(pad, S, scores.ndim)
        att = F.softmax(scores, scale=1.0 / math.sqrt(D), causal=T == S and T > 1,
                        length=pos + T if S > pos + T else None)   # (a FixedCache window's slots past pos + T)
        y = F.matmul(F.dropout(att, self.attn_dropout, self.training).reshape(Bsz, Hkv, G * T, S), v)
        y = y.reshape(Bsz, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(Bsz, T, H * D)   # heads merged
        y = self.o_proj(y)
        return (y, att.reshape(Bsz, H, T, S)) if return_weights else y


def _rotary_rows(proj, cos, sin, positions, heads):
    """F.rotary of the packed projection (B, T, heads * D) -> (B, heads, T, D) with positions (B, T) per row."""
    Bsz, T = positions.shape
    D = cos.shape[1]
    x = proj.reshape(Bsz, T, heads, D).permute(0, 2, 1, 3)
    c, s = (F.embedding(positions, t).reshape(Bsz, 1, T, D) for t in (cos, sin))
    x1, x2 = F.split(x, D // 2, axis=-1)
    return x * c + F.concat([-x2, x1], axis=-1) * s


def _offset_mask(T, S):
    """Additive mask (T, S) for T new tokens after S - T cached ones: a large negative above the shifted diagonal
    (finite, as GPU kernels may not take infinities)."""
    return np.triu(np.full((T, S), -1e30, dtype=np.float32), S - T + 1)


def _extend_cache(cache, k, v, pos):
    """Write k, v (B, Hkv, T, D) into the layer's cache at pos.. in place; the cached keys and values 0..pos+T."""
    cache_k, cache_v = cache
    D, T = k.shape[-1], k.shape[2]
    strides = contiguous_strides(cache_k.shape)
    for buf, new in ((cache_k, k), (cache_v, v)):                              # cache[:, :, pos:pos+T] = new
        buf.backend.write_view(buf.data, pos * D, strides, new.data)
    # a one-token step on lab.decode's FixedCache reads its window, the unfilled slots masked by the softmax
    S = (getattr(cache, "window", None) if T == 1 else None) or pos + T
    return (cache_k, cache_v) if S == cache_k.shape[2] else (cache_k[:, :, :S], cache_v[:, :, :S])


class LlamaMLP(nn.Module):
    _hooks = None   # lab.interp's hook_pre (the gate's pre-activation) / hook_post

    def __init__(self, cfg):
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, I, cfg.mlp_bias)
        self.up_proj = nn.Linear(C, I, cfg.mlp_bias)
        self.down_proj = nn.Linear(I, C, cfg.mlp_bias)

    def forward(self, x, residual=None):
        """The MLP of x, plus residual (added by down_proj as it stores)."""
        hook = self._hooks
        h = None if hook else nn.fused_linears(x, (self.gate_proj, self.up_proj), "swiglu")   # one pass for both
        if h is None:
            gate = self.gate_proj(x)
            h = F.swiglu(hook("hook_pre", gate) if hook else gate, self.up_proj(x))   # SwiGLU
        return self.down_proj(hook("hook_post", h) if hook else h, residual=residual)


class LlamaDecoderLayer(nn.Module):
    _hooks = None   # lab.interp's points on the residual stream and the norms (sublayers)

    def __init__(self, cfg):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, rope, cache=None, pos=0, return_weights=False, pad=None):
        def attention(h):
            a = self.self_attn(h, *rope, cache, pos, return_weights, pad)
            return a if return_weights else (a, None)
        if cache is not None and not self._hooks and not return_weights:
            # a cached step: the MLP's residual add rides on down_proj's store (forward's blocks keep the MLP's own
            # output for their hooks)
            x, h = self.post_attention_layernorm.residual_forward(x, attention(self.input_layernorm(x))[0])
            return self.mlp(h, residual=x)
        x, att = sublayers(self, x, self.input_layernorm, attention, self.post_attention_layernorm, self.mlp)
        return (x, att) if return_weights else x


class LlamaModel(nn.Module):
    """The decoder without its head: transformers' LlamaModel (named `model` inside LlamaForCausalLM)."""

    def __init__(self, cfg):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaLM(nn.Module, HookedModel, nn.Blocks, Adapters):
    # (PEFT names transformers' weights under base_model.model.: model.layers.0.self_attn.q_proj, as lab does)

    def __init__(self, cfg):
        if not isinstance(cfg, LlamaConfig):
            raise InputError(f"LlamaLM takes a LlamaConfig, got {show(cfg)}")
        _check_fits(cfg, get_backend())   # before any weight is allocated
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_tables = None   # (cos, sin): constants of the computation, made as positions are used

    def _hook_layers(self):
        return [(layer, layer.self_attn, layer.mlp) for layer in self.model.layers]

    def _final_norm(self):
        return self.model.norm

    def _head(self, x):
        if self.config.tie_word_embeddings:
            return F.matmul(x, self.model.embed_tokens.weight, transpose_b=True)   # (B, T, vocab)
        return self.lm_head(x)

    def _head_loss(self, x, targets):   # cross_entropy(_head(x), targets)
        if self.config.tie_word_embeddings:
            return F.linear_cross_entropy(x, self.model.embed_tokens.weight, targets)
        return self.lm_head.cross_entropy(x, targets)

    def _run(self, idx, caches, pos, return_attention=False, pad=None):
        shape = getattr(idx, "shape", np.shape(idx))
        if len(shape) != 2:
            raise InputError(f"LlamaLM expects token ids of shape (B, T), got {tuple(shape)}")
        end = pos + shape[1]
        if end > self.config.block_size:
            raise InputError(f"sequence length {end} exceeds max_position_embeddings {self.config.block_size}")
        rope = self._rope(end)                                                     # (P, D) each, P >= end
        x = self.model.embed_tokens(idx)                                           # (B, T, C)
        x = self._hooks("hook_embed", x) if self._hooks else x
        attentions, hidden = [], [x]
        for i, (layer, cache) in enumerate(zip(self.model.layers, caches)):
            if return_attention:
                x, att = layer(x, rope, cache, pos, return_weights=True, pad=pad)
                attentions.append(att)
            elif cache is None:   # (a cached step writes its cache: it never runs twice; hooked, run_block runs
                x = self.run_block(i, layer, x, rope, pad=pad)   # it plainly, so a hook sees each activation once)
            else:
                x = layer(x, rope, cache, pos, pad=pad)
            hidden.append(x)
        return self._normalized(x), attentions, hidden

    def blocks(self):
        return self.model.layers

    def _rope(self, end):
        """cos, sin of positions 0..P-1, P >= end (F.rotary reads the rows of its tokens' positions). The tables
        cover the positions used so far, doubling as needed: a 131072-position model's full tables would hold
        64 MiB that short sequences never read."""
        tables = self._rope_tables   # (one read: another thread may replace the pair meanwhile)
        if tables is None or tables[0].shape[0] < end:
            n = min(self.config.max_position_embeddings, max(256, 1 << (end - 1).bit_length()))
            backend = self.model.embed_tokens.weight.backend
            tables = self._rope_tables = tuple(tensor(t, backend=backend) for t in rope_tables(self.config, n))
        return tables

    def forward(self, idx, targets=None, return_attention=False, return_hidden=False, return_logits=True):
        """idx: (B, T) integer tokens. Returns logits (B, T, vocab); with targets also the mean cross-entropy;
        with return_attention the attention weights of every layer [(B, H, T, T)], every query head (a GQA
        model's heads sharing a key-value head side by side); with return_hidden the residual stream after the
        embedding and after every layer [(B, T, C)]. Extras come in that order, as TransformerLM's.
        return_logits=False (with targets): None in the logits' place, the loss taken without them (training)."""
        check_return_logits(targets, return_logits)
        h, attentions, hidden = self._run(idx, [None] * self.config.num_hidden_layers, 0, return_attention)
        return lm_outputs(self, h, targets, attentions if return_attention else None,
                          hidden if return_hidden else None, return_logits)

    def new_cache(self, batch_size, length=None):
        """An empty KV cache on the device: per layer, keys and values (B, Hkv, length, D), the key-value heads
        held once (not once per query head). length: the slots a generation fills, by default block_size."""
        c = self.config
        return empty_cache(self.model.embed_tokens.weight.backend, len(self.model.layers), batch_size,
                           c.num_key_value_heads, c.head_dim, c.block_size, length)

    def forward_cached(self, idx, cache, pos, pad=None):
        """Logits (B, Tn, vocab) for tokens idx (B, Tn) at cache slots pos.., extending `cache` in place. pad (B,):
        row b's first pad[b] slots are left padding (masked as keys; its positions start after them)."""
        pos = integer("pos", pos, low=0)
        check_cache(cache, idx, pos, len(self.model.layers), self.config.block_size)
        return self._head(self._run(idx, cache, pos, pad=check_pad(pad, idx, pos))[0])

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12 * L * H * D * T."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * c.block_size

    # ------------------------------------------------------------------------------------ transformers' layout

    def hf_weights(self):
        """The weights under transformers' names and layout (float32): linear weights (out, in), lab's (in, out).
        LoRA adapters' lora_A (r, in) and lora_B (out, r) come under their own names, in PEFT's layout."""
        return {name: _to_hf(name, p.numpy().astype(np.float32, copy=False)) for name, p in self.named_parameters()}

    def load_hf_weights(self, tensors, source=None):
        """Load weights named and laid out as transformers' (a checkpoint's tensors), as float32. Every name and
        shape is checked before anything is copied; one CheckpointError names the file, the tensor and shapes."""
        where = source if source is not None else "weights"
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{where}: expected a dict of tensor name -> array, got {show(tensors)}")
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old files: a buffer
        check_floats(tensors, where)
        expected = {n: _to_hf(n, np.empty(p.shape, np.bool_)).shape for n, p in self.named_parameters()}
        if self.config.tie_word_embeddings and "lm_head.weight" in tensors:
            head, embed = tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")
            if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
                raise CheckpointError(f"{where}: lm_head.weight differs from model.embed_tokens.weight, but the config "
                                      "ties them (tie_word_embeddings: true)")
            tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{where}: " + ", ".join(f"{what} tensors {names}" for what, names in
                                                         (("missing", missing), ("unexpected", unexpected)) if names))
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the model "
                                      f"expects {tuple(shape)}")

        def finite(name, value):   # checked as load_state_dict reads it (a built model's: into its parameter)
            def read():
                a = np.asarray(value)
                if not np.isfinite(a).all():
                    raise CheckpointError(f"{where}: tensor {name!r} holds NaN or Inf")
                return a
            return LazyTensor(value.shape, value.dtype, read)
        state = {n: _from_hf(n, finite(n, tensors[n])) for n, _ in self.named_parameters()}
        self.load_state_dict(state, source=str(where), error=CheckpointError)
        return self

    def save_pretrained(self, directory, format="lab", tokenizer=None):
        """config.json + model.safetensors in transformers' layout (its LlamaForCausalLM & co. load them); for this
        family lab's layout ("lab") is transformers' ("hf"). With a tokenizer, its files go into the same save."""
        from ..data import write_tokenizer
        _check_format(format)   # before the directory is touched
        with nn.step_lock(self), atomic_files(directory) as files:   # between a training thread's steps
            self.write_files(files, format)
            if tokenizer is not None:
                write_tokenizer(files, tokenizer)
        return Path(directory)

    def write_files(self, files, format="lab"):
        """Into an atomic_files staging (a checkpoint's model). Lab's layout holds LoRA adapters too, their settings
        and mode in config.json's "lora" (a checkpoint resumes a LoRA run); transformers' holds the base only (with
        a merged adapter's update inside its weights; save_adapter writes the adapter in PEFT's format)."""
        _check_format(format)
        lora = checkpoint_config(self) if format == "lab" else None
        tensors = {k: v for k, v in self.hf_weights().items() if lora or ".lora_" not in k}
        files.write_tensors(MODEL_FILE, tensors, metadata={"format": "pt"})
        files.write_json(CONFIG_FILE, {**self.config.to_hf(), **({"lora": lora} if lora else {})})
        # always, as transformers' save does: an earlier model's generation_config.json left there would give this
        # one its eos_token_id on load (with_generation_config reads it over config.json's)
        ids = {k: getattr(self.config, k) for k in ("bos_token_id", "eos_token_id")}
        files.write_json(GENERATION_FILE, {**{k: v for k, v in ids.items() if v is not None}, "_from_model_config": True})

    @classmethod
    def from_pretrained(cls, directory):
        """A LlamaLM, in eval mode, from a directory in transformers' layout (config.json + model.safetensors or
        a sharded index, generation_config.json's token ids)."""
        return load_pretrained(directory)

    @classmethod
    def from_hf(cls, data, tensors, config_source=None, weights_source=None):
        """A LlamaLM, in eval mode, from a config.json dict and HF-named tensors (a directory's, or a GGUF's),
        checked before anything is allocated; each source (a path) is named in the errors about it."""
        cfg = LlamaConfig.from_hf(data, config_source)
        _check_size(cfg, tensors, config_source, weights_source)

        def load(model):
            if data.get("lora") is not None:   # lab's checkpoint of a LoRA run: its adapters are in the weights
                apply_config(model, data["lora"], config_source)
            model.load_hf_weights(tensors, weights_source)
        # no random init of weights about to be replaced; each tensor read straight into its parameter
        return nn.built_and_loaded(lambda: cls(cfg), load).eval()


def _check_format(format):
    if format not in ("lab", "hf"):
        raise InputError(f"unknown format {show(format)}: expected 'lab' or 'hf' (the same layout for LlamaLM)")


def _is_linear(name):
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def _to_hf(name, value):
    # lab's Linear stores (in, out) (GPT-2's Conv1D); torch.nn.Linear (out, in)
    return np.ascontiguousarray(value.T) if _is_linear(name) else value


def _from_hf(name, value):
    # the transposed view (of an array or a LazyTensor): the parameter's write is the one copy, made as it transposes
    return value.T if _is_linear(name) else value


def load_pretrained(directory):
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such model directory (one holding {CONFIG_FILE} and {MODEL_FILE})")
    with reading(d):   # config.json, generation_config.json and the weights of one save
        data = with_generation_config(read_json(d / CONFIG_FILE, "model config"), d)
        tensors = read_weights(d, lazy=True)   # model.safetensors or the shards of transformers' index
        return LlamaLM.from_hf(data, tensors, d / CONFIG_FILE, weights_file(d))   # (read as loaded: still held)


def num_params(cfg):
    """Parameters of a LlamaLM with this config, without building it."""
    from ..plan.estimator import llama_params
    return llama_params(cfg)


def _check_size(cfg, tensors, config_source, weights_source):
    """A config describing a much bigger model than the weights file holds is refused before allocating it."""
    stored = sum(int(np.prod(v.shape)) for v in tensors.values())
    if num_params(cfg) > 4 * stored + (1 << 20):
        raise CheckpointError(f"{config_source}: describes a model of {num_params(cfg):,} parameters, but "
                              f"{weights_source} holds {stored:,} values: the config does not belong to these weights")


def _check_fits(cfg, backend):
    """The weights alone must fit the device: their total and the largest one (the embedding, or an MLP matrix)."""
    from ..plan.estimator import DoesNotFitError
    from ..plan.profiles import limits_profile
    prof = limits_profile(backend)
    params, F32 = num_params(cfg), 4
    largest = max(cfg.vocab_size * cfg.hidden_size, cfg.hidden_size * cfg.intermediate_size,
                  cfg.max_position_embeddings * cfg.head_dim)
    limit = min(prof.max_binding_size, prof.max_buffer_size)
    reasons = []
    if params * F32 > prof.memory_bytes:
        reasons.append(f"its {params:,} weights need {params * F32 / 2 ** 30:.2f} GiB, the device has "
                       f"{prof.memory_bytes / 2 ** 30:.2f} GiB")
    if largest * F32 > limit:
        reasons.append(f"its largest weight needs {largest * F32 / 2 ** 20:,.0f} MiB, above the device's largest "
                       f"buffer binding of {limit / 2 ** 20:,.0f} MiB")
    if reasons:
        raise DoesNotFitError(f"this model does not fit {prof.name}: " + "; ".join(reasons) + ". A smaller "
                              "vocab_size, hidden_size, intermediate_size or num_hidden_layers would", None)


def training_bytes(cfg, batch_size, seq=None, host_temporaries=False, checkpoint_activations=0,
                   fused_attention=False):
    """Memory of a training step on batch_size sequences of seq tokens (default: block_size), as the planner
    estimates it (lab.plan.estimator.llama_activation_floats): weights, gradients, AdamW's two moments and what the
    step holds at its peak (host_temporaries: numpy's; checkpoint_activations: every k-th block checkpointed;
    fused_attention: attention by the fused kernels, no (B, H, T, T) weights: estimator.runs_fused_attention)."""
    from ..plan.estimator import llama_activation_floats, llama_params
    params = llama_params(cfg)
    parts = llama_activation_floats(cfg, batch_size, seq or cfg.block_size, host_temporaries,
                                    int(checkpoint_activations), fused_attention, gradients=params)[2]
    return 4 * (sum(parts.values()) + 4 * params)


def check_batch_fits(cfg, batch_size, backend, seq=None, checkpoint_activations=0):
    """Refuse, before a step allocates its activations, a training batch the device cannot hold."""
    from ..plan.estimator import DoesNotFitError, runs_fused_attention
    from ..plan.profiles import limits_profile
    prof, seq = limits_profile(backend), seq or cfg.block_size
    # (the step's attention path, as the plan asks it: fused by default on wgpu, where the weights are never held)
    fused = runs_fused_attention(prof, batch_size, cfg.num_attention_heads, seq, cfg.head_dim, rotary=True)
    need = training_bytes(cfg, batch_size, seq, prof.host_temporaries, checkpoint_activations, fused)
    if need > prof.memory_bytes:
        empty, one = (training_bytes(cfg, n, seq, prof.host_temporaries, checkpoint_activations, fused)
                      for n in (0, 1))
        fits = max(0, int((prof.memory_bytes - empty) // (one - empty)))
        checkpointed = training_bytes(cfg, batch_size, seq, prof.host_temporaries, 1, fused)
        raise DoesNotFitError(f"a training batch of {batch_size} x {seq} tokens needs about "
                              f"{need / 2 ** 30:.2f} GiB (weights, gradients, AdamW moments, activations), "
                              f"{prof.name} has {prof.memory_bytes / 2 ** 30:.2f} GiB: " +
                              (f"a batch_size of at most {fits} fits" if fits else "not even a batch of 1 fits; a "
                               "shorter block_size (TrainConfig.block_size) or a smaller model would") +
                              (f"; or checkpoint_activations=True (each block keeps only its input and runs again "
                               f"in the backward: about {checkpointed / 2 ** 30:.2f} GiB)"
                               if checkpoint_activations != 1 and checkpointed <= prof.memory_bytes else ""), None)


PRESETS = {
    # a few seconds per hundred steps on a 2-core CPU: grouped-query attention 4/2, a small vocabulary
    "llama-tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    # SmolLM2-135M's architecture (random init)
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                                rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192),
    # (no bos/eos ids: those belong to SmolLM2's tokenizer; a preset trains from scratch with lab's tokenizers,
    # where id 0 is an ordinary token that must not end generation)
}
