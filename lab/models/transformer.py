"""TransformerLM: the GPT-2 architecture, readable in one sitting.

Token + position embeddings, n_layer pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP, a final
LayerNorm, and a head tied to the token embedding. Shapes: B batch, T time, C = n_embd, H heads, D = C / H.
"""
import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import nn
from ..checks import InputError
from ..engine import ops as F
from ..engine.backend import contiguous_strides
from ..engine.tensor import Tensor, tensor


@dataclass
class TransformerConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    positions: str = "learned"   # or "sinusoidal"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise InputError(f"bias must be true or false, got {self.bias!r}")
        if self.n_embd % self.n_head:
            raise InputError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.positions not in ("learned", "sinusoidal"):
            raise InputError(f"positions must be 'learned' or 'sinusoidal', got {self.positions!r}")

    def to_dict(self):
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias)
        # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 n_layer)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, return_weights=False):
        # heads split from the packed q|k|v projection and merged back inside one op (F.causal_self_attention);
        # the weights (B, H, T, T) only when asked for: without them the backend may use fused kernels that
        # never hold them in memory
        out = F.causal_self_attention(self.c_attn(x), self.n_head, self.attn_dropout, self.training,
                                      return_weights=return_weights)
        y, att = out if return_weights else (out, None)
        y = self.resid_dropout(self.c_proj(y))
        return (y, att) if return_weights else y

    def forward_cached(self, x, cache, pos):
        """Attention for new tokens x (B, Tn, C) at positions pos.. pos+Tn-1, reading and extending the layer's
        KV cache (two (B, H, block, D) tensors). Either a prefill (pos == 0) or one token at a time."""
        Bsz, Tn, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = F.split(self.c_attn(x), C, axis=2)
        q, k, v = (t.reshape(Bsz, Tn, H, D).permute(0, 2, 1, 3) for t in (q, k, v))  # (B, H, Tn, D)
        cache_k, cache_v = cache
        strides = contiguous_strides(cache_k.shape)
        for buf, new in ((cache_k, k), (cache_v, v)):                           # in place: cache[:, :, pos:pos+Tn]
            buf.backend.write_view(buf.data, pos * D, strides, new.data)
        keys = cache_k[:, :, :pos + Tn]                                         # (B, H, pos+Tn, D)
        values = cache_v[:, :, :pos + Tn]
        # a single new token sees every cached position, so no mask; a prefill is the usual causal square
        att = F.softmax(F.matmul(q, keys, transpose_b=True), scale=1.0 / math.sqrt(D), causal=Tn > 1)
        y = (att @ values).permute(0, 2, 1, 3).reshape(Bsz, Tn, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        fc = self.c_fc
        if type(fc) is nn.Linear and "forward" not in vars(fc):
            # the plain layer: GELU applied by the matmul as it stores the product (F.linear's epilogue)
            h = F.linear(x, fc.weight, fc.bias, activation="gelu")
        else:  # a wrapped or patched layer (a LoRA adapter) computes its own output first
            h = fc(x).gelu()
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg):
        self.ln_1 = nn.LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, return_weights=False):
        a, att = self.attn(self.ln_1(x), return_weights=True) if return_weights else (self.attn(self.ln_1(x)), None)
        ln_2 = self.ln_2
        if type(ln_2) is nn.LayerNorm and "forward" not in vars(ln_2):
            # the plain layer: the residual add and ln_2 in one pass (F.add_layer_norm)
            x, h = F.add_layer_norm(x, a, ln_2.weight, ln_2.bias, ln_2.eps)
        else:  # a wrapped or patched LayerNorm computes its own output
            x = x + a
            h = ln_2(x)
        x = x + self.mlp(h)
        return (x, att) if return_weights else x

    def forward_cached(self, x, cache, pos):
        x = x + self.attn.forward_cached(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class TransformerLM(nn.Module):
    def __init__(self, cfg):
        from ..engine.backend import get_backend
        from ..plan.estimator import check_model_fits
        check_model_fits(cfg, get_backend())   # before any weight is allocated
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            self._positions = tensor(nn.sinusoidal_positions(cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.h = [Block(cfg) for _ in range(cfg.n_layer)]
        self.ln_f = nn.LayerNorm(cfg.n_embd, cfg.bias)

    def _embed(self, idx, start=0):
        shape = idx.shape
        if len(shape) != 2:
            raise InputError(f"TransformerLM expects token ids of shape (B, T), got {tuple(shape)}")
        end = start + shape[1]
        if end > self.config.block_size:
            raise InputError(f"sequence length {end} exceeds block_size {self.config.block_size}")
        tok = self.wte(idx)                                                    # (B, T, C)
        table = self.wpe.weight if self.config.positions == "learned" else self._positions
        return self.drop(tok + table[start:end])                               # + (T, C)

    def forward(self, idx, targets=None, return_attention=False, return_hidden=False):
        """idx: (B, T) integer tokens. Returns logits (B, T, vocab); with targets also the mean cross-entropy;
        with return_attention the attention weights of every layer [(B, H, T, T)]; with return_hidden the
        residual stream after the embedding and after every block [(B, T, C)]. Extras come in that order."""
        x = self._embed(idx)
        attentions, hidden = [], [x]
        for block in self.h:
            if return_attention:
                x, att = block(x, return_weights=True)
                attentions.append(att)
            else:
                x = block(x)
            hidden.append(x)
        logits = F.matmul(self.ln_f(x), self.wte.weight, transpose_b=True)    # (B, T, vocab), tied head
        out = [logits]
        if targets is not None:
            out.append(F.cross_entropy(logits, targets))
        if return_attention:
            out.append(attentions)
        if return_hidden:
            out.append(hidden)
        return out[0] if len(out) == 1 else tuple(out)

    def new_cache(self, batch_size):
        """An empty KV cache on the device: per layer, keys and values of shape (B, H, block_size, D)."""
        c = self.config
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        backend = self.wte.weight.backend
        return [(Tensor(backend.full(shape, 0.0), backend), Tensor(backend.full(shape, 0.0), backend))
                for _ in self.h]

    def forward_cached(self, idx, cache, pos):
        """Logits (B, Tn, vocab) for tokens idx (B, Tn) at positions pos.., extending `cache` in place."""
        x = self._embed(idx, start=pos)
        for block, layer_cache in zip(self.h, cache):
            x = block.forward_cached(x, layer_cache, pos)
        return F.matmul(self.ln_f(x), self.wte.weight, transpose_b=True)

    def save_pretrained(self, directory, format="lab"):
        """model.safetensors + config.json; format="hf" writes the GPT-2 layout that transformers loads."""
        from ..checkpoint import save_pretrained
        return save_pretrained(self, directory, format)

    @classmethod
    def from_pretrained(cls, directory):
        """Load a model saved by lab (either format) or by transformers' GPT2LMHeadModel.save_pretrained."""
        from ..checkpoint import load_pretrained
        return load_pretrained(directory)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12 * L * C * T."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.n_layer * c.n_embd * c.block_size


PRESETS = {
    # a few seconds per hundred steps on a 2-core CPU
    "tiny": TransformerConfig(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
    # nanoGPT's shakespeare-char
    "shakespeare-char": TransformerConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # GPT-2 small (124M parameters with GPT-2's 50257-token vocabulary): a GPU benchmark size
    "gpt2-small": TransformerConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                                    dropout=0.0),
}
