"""TransformerLM: the GPT-2 architecture, readable in one sitting.

Token + position embeddings, n_layer pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP, a final
LayerNorm, and a head tied to the token embedding. Shapes: B batch, T time, C = n_embd, H heads, D = C / H.
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import nn
from ..checks import InputError, integer, show
from ..engine import ops as F
from ..engine.backend import contiguous_strides, get_backend
from ..engine.tensor import Tensor, tensor
from ..interp.hooks import HookedModel
from ..io import CheckpointError, atomic_files, check_floats, read_json, read_weights, reading, weights_file
from ..lora import DEFAULT_TARGETS, Adapters, apply_config, checkpoint_config
from ..plan.estimator import check_model_fits, count_params

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"


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
    _hooks = None   # lab.interp's points on q, k, v, scores, pattern or z (they take the composed path)

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
        hook = self._hooks
        if hook:   # lab.interp hooks on the attention's insides: heads split and merged by ops that hold them
            Bsz, T, C = x.shape
            q, k, v = (hook(name, t.reshape(Bsz, T, self.n_head, C // self.n_head)).permute(0, 2, 1, 3)
                       for name, t in zip(("hook_q", "hook_k", "hook_v"), F.split(self.c_attn(x), C, axis=2)))
            y, att = attend(hook, q, k, v, 0, None, self.attn_dropout, self.training)
        else:
            out = F.causal_self_attention(self.c_attn(x), self.n_head, self.attn_dropout, self.training,
                                          return_weights=return_weights)
            y, att = out if return_weights else (out, None)
        y = self.resid_dropout(self.c_proj(y))
        return (y, att) if return_weights else y

    def forward_cached(self, x, cache, pos, pad=None, residual=None):
        """Attention for new tokens x (B, Tn, C) at positions pos.. pos+Tn-1, reading and extending the layer's
        KV cache (two (B, H, block, D) tensors). Either a prefill (pos == 0) or one token at a time. pad: per row,
        the number of left-padding slots its keys must not attend to (padding_mask). residual: added to the
        output by the output projection as it stores (the block's x + attention)."""
        Bsz, Tn, C = x.shape
        H, D = self.n_head, C // self.n_head
        qkv = self.c_attn(x)
        hook = self._hooks
        if Tn == 1 and not hook and F.decode_attention_applies(qkv, D):   # one pass: no head split, cache write or merge copies
            return self.c_proj(F.decode_attention(qkv, cache, pos, H, pad), residual=residual)
        q, k, v = F.split(qkv, C, axis=2)
        q, k, v = ((hook(name, t.reshape(Bsz, Tn, H, D)) if hook else t.reshape(Bsz, Tn, H, D)).permute(0, 2, 1, 3)
                   for name, t in zip(("hook_q", "hook_k", "hook_v"), (q, k, v)))        # (B, H, Tn, D)
        cache_k, cache_v = cache
        strides = contiguous_strides(cache_k.shape)
        for buf, new in ((cache_k, k), (cache_v, v)):                           # in place: cache[:, :, pos:pos+Tn]
            buf.backend.write_view(buf.data, pos * D, strides, new.data)
        # a one-token step on lab.decode's FixedCache reads its window (slots >= pos+1 masked in the softmax): the
        # shapes then do not follow pos, so one captured step replays at every position of the window
        S = (getattr(cache, "window", None) if Tn == 1 else None) or pos + Tn
        keys, values = (cache_k, cache_v) if S == cache_k.shape[2] else (cache_k[:, :, :S], cache_v[:, :, :S])
        if hook:
            return self.c_proj(attend(hook, q, keys, values, pos, pad, 0.0, False)[0], residual=residual)
        # a single new token sees every cached position, so no mask; a prefill is the usual causal square
        scores = F.matmul(q, keys, transpose_b=True)
        if pad is not None:
            scores = scores + padding_mask(pad, S, scores.ndim)
        att = F.softmax(scores, scale=1.0 / math.sqrt(D), causal=Tn > 1, length=pos + Tn if S > pos + Tn else None)
        y = (att @ values).permute(0, 2, 1, 3).reshape(Bsz, Tn, C)
        return self.c_proj(y, residual=residual)


def attend(hook, q, k, v, pos, pad, dropout, training):
    """Attention through lab.interp's hook points (the composed path, for hooks on its insides): q (B, H, T, D) at
    positions pos.., keys and values k, v (B, Hkv, S, D) of slots 0..S-1, Hkv dividing H (query head h reads
    key-value head h // (H / Hkv)); slots past pos + T are not read (S = pos + T). The scores are scaled and masked
    before the softmax, as TransformerLens holds them. Returns y (B, T, H * D), heads merged, and the weights
    (B, H, T, S)."""
    Bsz, H, T, D = q.shape
    if k.shape[2] > pos + T:   # a decode window's unfilled slots: the hooks see the positions so far, on any backend
        k, v = k[:, :, :pos + T], v[:, :, :pos + T]
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scores = F.matmul(q.reshape(Bsz, Hkv, G * T, D), k, transpose_b=True).reshape(Bsz, H, T, S) * (1.0 / math.sqrt(D))
    # query i (position pos + i) sees slots 0..pos + i: the causal square of a forward, a step's filled cache
    mask = np.triu(np.full((T, S), -1e30, np.float32), pos + 1)
    if pad is not None:
        mask = mask + padding_mask(pad, S, 4)                                    # (B, 1, T, S)
    scores = hook("hook_attn_scores", scores + mask)                             # (B, H, T, S)
    att = hook("hook_pattern", F.softmax(scores))
    z = F.matmul(F.dropout(att, dropout, training).reshape(Bsz, Hkv, G * T, S), v)   # (B, Hkv, G*T, D)
    z = hook("hook_z", z.reshape(Bsz, H, T, D).permute(0, 2, 1, 3))                # (B, T, H, D)
    return z.reshape(Bsz, T, H * D), att


def sublayers(block, x, norm1, attention, norm2, mlp, fused=True):
    """A pre-norm block's residual sublayers, x + attention(norm1(x)) then + mlp(norm2(.)), through lab.interp's
    hook points; attention(h) returns (output, weights or None). fused: the residual add and norm2 in one kernel
    (residual_forward), unless hook_resid_mid is hooked (it needs the sum as a tensor of its own)."""
    hook = block._hooks   # None unless hooks are on: one test per point
    x = hook("hook_resid_pre", x) if hook else x
    h = norm1(x)
    a, att = attention(hook("ln1.hook_normalized", h) if hook else h)
    a = hook("hook_attn_out", a) if hook else a
    if fused and not (hook and "hook_resid_mid" in hook):
        x, h = norm2.residual_forward(x, a)                                      # x + a, and its norm
    else:
        x = x + a
        x = hook("hook_resid_mid", x) if hook else x
        h = norm2(x)
    m = mlp(hook("ln2.hook_normalized", h) if hook else h)
    x = x + (hook("hook_mlp_out", m) if hook else m)
    return (hook("hook_resid_post", x) if hook else x), att


def check_return_logits(targets, return_logits):
    """A forward's return_logits, checked before it runs: True or False ('no' was true and made the whole logits
    the flag is there to avoid), and False only with targets (the loss is what comes in the logits' place)."""
    if not isinstance(return_logits, (bool, np.bool_)):
        raise InputError(f"return_logits must be True or False, got {show(return_logits)}")
    if not return_logits and targets is None:
        raise InputError("return_logits=False needs targets: the loss is what the forward gives in the logits' place")


def lm_outputs(model, h, targets=None, attentions=None, hidden=None, return_logits=True):
    """A language model's forward result from its final norm's output h (B, T, C), as both families give it: the
    logits alone, or a tuple of the logits, the mean cross-entropy (with targets), the attention weights and the
    hidden states (each when asked for: not None), in that order. With targets and return_logits=False the
    logits are None and the loss comes from model._head_loss (F.linear_cross_entropy: the (B, T, vocab) logits,
    most of a large-vocabulary training step's memory, never whole). check_return_logits has checked the flag."""
    if return_logits:
        out = [model._head(h)]                                                  # (B, T, vocab)
        if targets is not None:
            out.append(F.cross_entropy(out[0], targets))
    else:
        out = [None, model._head_loss(h, targets)]
    out += [x for x in (attentions, hidden) if x is not None]
    return out[0] if len(out) == 1 else tuple(out)


def check_pad(pad, idx, pos=0):
    """pad as an int64 array (B,) of non-negative counts for tokens idx (B, T) at cache slots pos.., or None for
    none. Each row keeps its last slot (pos + T - 1) as its own token: a row of padding alone attends to nothing
    but masked slots, and its logits would be noise."""
    if pad is None:
        return None
    shape = tuple(getattr(idx, "shape", np.shape(idx)))
    arr = np.asarray(pad)
    if arr.dtype.kind not in "iu" or arr.shape != shape[:1] or (arr.size and arr.min() < 0):
        raise InputError(f"forward_cached: pad must be one non-negative integer per row of tokens {shape}, "
                         f"got {show(pad)}")
    end = pos + shape[1] if len(shape) == 2 else None   # (tokens of another shape: the forward's own error)
    if end is not None and arr.size and arr.max() >= end:
        b = int(arr.argmax())
        raise InputError(f"forward_cached: pad {show(pad)} leaves row {b} no token of its own: its {int(arr[b])} "
                         f"padding slots cover slots 0..{end - 1}; each row's padding must be fewer than "
                         f"pos + T = {end} slots")
    return arr.astype(np.int64)


def check_cache(cache, idx, pos, layers, block):
    """forward_cached's cache: model.new_cache(B, length)'s list of one (keys, values) pair (B, H, length, D) per
    layer, with a slot for each token of idx (B, T) from pos on. (A cache made shorter than block_size for a
    generation took tokens past its length: numpy's strided write went outside the array, corrupting the heap.)
    Tokens past `block` (block_size) are left to the model's own error, which says the sequence is too long."""
    shape = tuple(getattr(idx, "shape", np.shape(idx)))
    if not isinstance(cache, list) or len(cache) != layers or (len(shape) == 2 and cache[0][0].shape[0] != shape[0]):
        raise InputError(f"forward_cached: cache must be model.new_cache(batch_size) for tokens {shape} "
                         f"({layers} layers, batch {shape[0] if shape else '?'})")
    slots = cache[0][0].shape[2]
    if len(shape) == 2 and slots < pos + shape[1] <= block:
        raise InputError(f"forward_cached: tokens {shape} at slots {pos}..{pos + shape[1] - 1} do not fit the "
                         f"cache's {slots} slots (model.new_cache(batch_size, length) holds length slots, "
                         f"block_size by default)")


def empty_cache(backend, layers, batch_size, heads, head_dim, block, length=None):
    """new_cache's zeros: per layer, keys and values (batch_size, heads, length, head_dim), length slots (1 to
    block, by default block)."""
    length = block if length is None else integer("length", length, low=1, high=block)
    shape = (integer("batch_size", batch_size, low=1), heads, length, head_dim)
    return [(Tensor(backend.full(shape, 0.0), backend), Tensor(backend.full(shape, 0.0), backend))
            for _ in range(layers)]


def row_positions(pad, start, T):
    """(B, T) positions of cache slots start..start+T-1 for rows with pad[b] left-padding slots: slot - pad[b],
    0 for the padding itself (as transformers' position_ids from an attention mask)."""
    return np.maximum(np.arange(start, start + T)[None] - pad[:, None], 0)


def padding_mask(pad, S, ndim):
    """Additive mask over S key slots, -1e30 (finite, for GPU kernels) at each row's left padding, shaped
    (B, 1, ..., 1, S) to broadcast over attention scores of `ndim` dims."""
    mask = np.where(np.arange(S)[None] < pad[:, None], np.float32(-1e30), np.float32(0))
    return mask.reshape((len(pad),) + (1,) * (ndim - 2) + (S,))


class MLP(nn.Module):
    _hooks = None   # lab.interp's hook_pre / hook_post

    def __init__(self, cfg):
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, residual=None):
        """The MLP of x, plus residual: added by the second product as it stores (a decode step's residual add
        without a pass of its own), unless dropout acts on the MLP's own output."""
        hook = self._hooks
        if hook:   # the GELU's input and output as tensors of their own
            h = hook("hook_post", F.gelu(hook("hook_pre", self.c_fc(x))))
        else:
            h = self.c_fc(x, activation="gelu")
        if residual is not None and not (self.training and self.dropout.p):
            return self.c_proj(h, residual=residual)
        y = self.dropout(self.c_proj(h))
        return y if residual is None else residual + y


class Block(nn.Module):
    _hooks = None   # lab.interp's points on the residual stream and the norms (sublayers)

    def __init__(self, cfg):
        self.ln_1 = nn.LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, return_weights=False):
        attention = (lambda h: self.attn(h, return_weights=True)) if return_weights else (lambda h: (self.attn(h), None))
        x, att = sublayers(self, x, self.ln_1, attention, self.ln_2, self.mlp)
        return (x, att) if return_weights else x

    def forward_cached(self, x, cache, pos, pad=None):
        if not self._hooks:   # both residual adds ride on the output projections' stores (7 dispatches a decode layer)
            x = self.attn.forward_cached(self.ln_1(x), cache, pos, pad, residual=x)
            return self.mlp(self.ln_2(x), residual=x)
        return sublayers(self, x, self.ln_1, lambda h: (self.attn.forward_cached(h, cache, pos, pad), None), self.ln_2,
                         self.mlp, fused=False)[0]


class TransformerLM(nn.Module, HookedModel, nn.Blocks, Adapters):
    peft_prefix = "base_model.model.transformer."   # transformers' GPT2LMHeadModel nests the blocks there
    peft_fan_in_fan_out = True   # transformers' GPT-2 Conv1D stores (in, out), as lab's Linear does
    lora_default_targets = DEFAULT_TARGETS   # all its linear layers but the head, by name (as saved since the first)

    has_pos_embed = True

    def tied_embedding(self):
        return "wte"   # the head is always wte's weight

    def _hook_layers(self):
        return [(b, b.attn, b.mlp) for b in self.h]

    def _final_norm(self):
        return self.ln_f

    def _head(self, x):
        return F.matmul(x, self.wte.weight, transpose_b=True)                   # (B, T, vocab), tied head

    def _head_loss(self, x, targets):
        return F.linear_cross_entropy(x, self.wte.weight, targets)              # cross_entropy(_head(x), targets)

    def __init__(self, cfg):
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

    def _embed(self, idx, start=0, pad=None):
        shape = idx.shape
        if len(shape) != 2:
            raise InputError(f"TransformerLM expects token ids of shape (B, T), got {tuple(shape)}")
        end = start + shape[1]
        if end > self.config.block_size:
            raise InputError(f"sequence length {end} exceeds block_size {self.config.block_size}")
        tok = self.wte(idx)                                                    # (B, T, C)
        table = self.wpe.weight if self.config.positions == "learned" else self._positions
        hook = self._hooks
        if pad is not None or hook:   # left-padded rows: each row's positions count from its first real token
            rows = pad if pad is not None else np.zeros(shape[0], np.int64)   # (hook_pos_embed is (B, T, C))
            positions = F.embedding(row_positions(rows, start, shape[1]), table)   # (B, T, C)
        else:
            positions = table[start:end]                                       # (T, C)
        if hook:
            tok, positions = hook("hook_embed", tok), hook("hook_pos_embed", positions)
        return self.drop(tok + positions)

    def forward(self, idx, targets=None, return_attention=False, return_hidden=False, return_logits=True):
        """idx: (B, T) integer tokens. Returns logits (B, T, vocab); with targets also the mean cross-entropy;
        with return_attention the attention weights of every layer [(B, H, T, T)]; with return_hidden the
        residual stream after the embedding and after every block [(B, T, C)]. Extras come in that order.
        return_logits=False (with targets): None in the logits' place, the loss taken without them (training)."""
        check_return_logits(targets, return_logits)
        x = self._embed(idx)
        attentions, hidden = [], [x]
        for i, block in enumerate(self.h):
            if return_attention:
                x, att = block(x, return_weights=True)
                attentions.append(att)
            else:   # (hooked: run_block runs it plainly, so a hook sees each activation once)
                x = self.run_block(i, block, x)
            hidden.append(x)
        return lm_outputs(self, self._normalized(x), targets, attentions if return_attention else None,
                          hidden if return_hidden else None, return_logits)

    def blocks(self):
        return self.h

    def new_cache(self, batch_size, length=None):
        """An empty KV cache on the device: per layer, keys and values of shape (B, H, length, D); length: the
        slots a generation fills, by default block_size."""
        c = self.config
        return empty_cache(self.wte.weight.backend, len(self.h), batch_size, c.n_head, c.n_embd // c.n_head,
                           c.block_size, length)

    def forward_cached(self, idx, cache, pos, pad=None):
        """Logits (B, Tn, vocab) for tokens idx (B, Tn) at cache slots pos.., extending `cache` in place. pad (B,):
        row b's first pad[b] slots are left padding (as transformers' attention mask): masked as keys, and its
        positions start after them."""
        pos = integer("pos", pos, low=0)
        check_cache(cache, idx, pos, len(self.h), self.config.block_size)
        pad = check_pad(pad, idx, pos)
        x = self._embed(idx, start=pos, pad=pad)
        for block, layer_cache in zip(self.h, cache):
            x = block.forward_cached(x, layer_cache, pos, pad)
        return self._head(self._normalized(x))

    def save_pretrained(self, directory, format="lab", tokenizer=None):
        """model.safetensors + config.json; format="hf" writes the GPT-2 layout that transformers loads. With a
        tokenizer, its files go into the same save (lab.load_tokenizer(directory) gives it back)."""
        return save_pretrained(self, directory, format, tokenizer)

    @classmethod
    def from_pretrained(cls, directory):
        """Load a model saved by lab (either format) or by transformers' GPT2LMHeadModel.save_pretrained."""
        return load_pretrained(directory)

    def write_files(self, files, format="lab"):
        """config.json + model.safetensors into an atomic_files staging (a checkpoint's model)."""
        _write_model(self, files, format)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12 * L * C * T."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.n_layer * c.n_embd * c.block_size


# ------------------------------------------------------------------------------------------------ model directories
#
# lab's layout, or Hugging Face's GPT-2 layout that transformers' GPT2LMHeadModel loads

def _load_into(model, tensors, path):
    """Copy a file's tensors (finite, read_safetensors checked) into the model: they must be floats, then names
    and shapes must match (Module.load_state_dict); every error names the file and the tensor."""
    check_floats(tensors, path)
    model.load_state_dict(tensors, source=str(path), error=CheckpointError)


# ------------------------------------------------------------------------------------------------ GPT-2 layout

def hf_config(cfg):
    """config.json of the GPT-2 layout, as transformers' GPT2Config reads it."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": True,
        "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
    }


def _config_from_hf(data, path):
    try:
        n_embd = data["n_embd"]
        if data.get("n_inner") is not None and data["n_inner"] != 4 * n_embd:
            raise CheckpointError(f"{path}: n_inner={data['n_inner']} is not supported (lab's MLP is 4 x n_embd)")
        act = data.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{path}: activation_function {act!r} is not supported (lab uses gelu_new)")
        eps = data.get("layer_norm_epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
            raise CheckpointError(f"{path}: layer_norm_epsilon {eps} is not supported (lab uses 1e-5)")
        if data.get("tie_word_embeddings", True) is False:
            raise CheckpointError(f"{path}: untied output heads are not supported (lab ties the head to wte)")
        # lab's attention always scales scores by 1/sqrt(head_dim): other scalings would load with wrong logits
        for flag, lab_value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if data.get(flag, lab_value) is not lab_value:
                raise CheckpointError(f"{path}: {flag}={json.dumps(data[flag])} is not supported (lab's attention "
                                      f"computes {flag}={json.dumps(lab_value)}: scores scaled by 1/sqrt(head_dim))")
        return TransformerConfig(vocab_size=data["vocab_size"], block_size=data["n_positions"], n_layer=data["n_layer"],
                                 n_head=data["n_head"], n_embd=n_embd, dropout=data.get("resid_pdrop") or 0.0,
                                 bias=True, positions="learned")
    except CheckpointError:  # already names the file (it is a ValueError: keep it from being wrapped again)
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: GPT-2 config is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid GPT-2 config ({e})") from None


# ------------------------------------------------------------------------------------------------ models

def _check_size(cfg, tensors, d):
    """Refuse a config that describes a bigger model than the weights file holds, before allocating it: a damaged
    or hostile config.json (n_embd = 10^9) must not make lab allocate more than the file justifies."""
    params, _ = count_params(cfg)
    if cfg.positions == "sinusoidal":   # a fixed (block_size, n_embd) table, allocated but not stored
        params += cfg.block_size * cfg.n_embd
    stored = sum(int(np.prod(v.shape)) for v in tensors.values())
    if params > 4 * stored + (1 << 20):  # slack for small mismatches, which the per-tensor check names precisely
        raise CheckpointError(f"{d / CONFIG_FILE}: describes a model of {params:,} parameters, but {weights_file(d)} "
                              f"holds {stored:,} values: the config does not belong to these weights")


def save_pretrained(model, directory, format="lab", tokenizer=None):
    """Write model.safetensors + config.json (and the tokenizer's files, when given). format="hf" writes the GPT-2
    layout transformers loads."""
    from ..data import write_tokenizer
    if format not in ("lab", "hf"):
        raise InputError(f"unknown format {format!r}: expected 'lab' or 'hf'")
    with nn.step_lock(model), atomic_files(directory) as files:   # between a training thread's steps
        _write_model(model, files, format)
        if tokenizer is not None:
            write_tokenizer(files, tokenizer)
    return Path(directory)


def _write_model(model, files, format):
    """Lab's layout holds the whole model: LoRA adapters too, their settings and mode in config.json's "lora", so
    a checkpoint resumes a LoRA run. The GPT-2 layout holds the base only (transformers has no adapters; PEFT's
    format, lab.lora.save_adapter, does), with a merged adapter's update inside its weights."""
    cfg = model.config
    lora = checkpoint_config(model) if format == "lab" else None
    tensors = {k: v for k, v in model.state_dict().items() if lora or ".lora_" not in k}
    if format == "lab":
        files.write_tensors(MODEL_FILE, tensors, metadata={"format": "pt"})
        files.write_json(CONFIG_FILE, {"model_type": "lab-transformer", **cfg.to_dict(), **({"lora": lora} if lora
                                                                                              else {})})
        return
    out = {f"transformer.{k}": v for k, v in tensors.items()}
    if cfg.positions == "sinusoidal":  # GPT-2 has a learned table: export the fixed one's values
        out["transformer.wpe.weight"] = model._positions.numpy()
    if not cfg.bias:                    # GPT-2 always has biases: zeros are the same function
        for name, p in model.named_parameters():
            if name.endswith(".weight") and name.rsplit(".", 2)[-2] in ("ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc"):
                out[f"transformer.{name[:-len('weight')]}bias"] = np.zeros(p.shape[-1], dtype=np.float32)
    files.write_tensors(MODEL_FILE, out, metadata={"format": "pt"})
    files.write_json(CONFIG_FILE, hf_config(cfg))


def load_pretrained(directory):
    """A TransformerLM, in eval mode, from a directory in lab's layout or the GPT-2 layout (from config.json)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d}: is a file, not a checkpoint directory (one holding {CONFIG_FILE} and "
                              f"{MODEL_FILE})")
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    with reading(d):   # config.json and model.safetensors of one save
        return _load_pretrained(d)


def _load_pretrained(d):
    data = read_json(d / CONFIG_FILE, "model config")
    kind = data.get("model_type")
    tensors = read_weights(d)   # model.safetensors or the shards of transformers' index
    if kind == "gpt2":
        cfg = _config_from_hf(data, d / CONFIG_FILE)
        if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], tensors.get("transformer.wte.weight")):
            raise CheckpointError(f"{weights_file(d)}: lm_head.weight differs from transformer.wte.weight (untied head)")
        tensors = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in tensors.items()
                   if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    elif kind == "lab-transformer":
        fields = {k: v for k, v in data.items() if k in TransformerConfig.__dataclass_fields__}
        try:
            cfg = TransformerConfig(**fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{d / CONFIG_FILE}: invalid model config ({e})") from None
    else:
        raise CheckpointError(f"{d / CONFIG_FILE}: unknown model_type {kind!r} (expected 'lab-transformer' or 'gpt2')")
    _check_size(cfg, tensors, d)
    model = TransformerLM(cfg)
    if kind == "lab-transformer" and data.get("lora") is not None:   # a LoRA run: its adapters are in the file
        apply_config(model, data["lora"], d / CONFIG_FILE)
    _load_into(model, tensors, weights_file(d))
    return model.eval()  # as transformers does: dropout stays off until model.train()


PRESETS = {
    # a few seconds per hundred steps on a 2-core CPU
    "tiny": TransformerConfig(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
    # nanoGPT's shakespeare-char
    "shakespeare-char": TransformerConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # GPT-2 small (124M parameters with GPT-2's 50257-token vocabulary): a GPU benchmark size
    "gpt2-small": TransformerConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                                    dropout=0.0),
}
