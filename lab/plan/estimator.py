"""The hardware plan estimator: will a training plan fit, and how long will it take?

Memory follows what lab's engine really holds during a training step: parameters, gradients and optimizer state,
and every intermediate of the forward pass (the autograd graph keeps each op's output alive until backward
reaches it), plus the logits and the backward's working set. Time is the matmul work at the profile's matmul
rate, the activation floats at the profile's elementwise cost per float, the optimizer's traffic, and a fixed
cost per op (31 + 80 ops per layer per step, counted on the engine). tests/test_plan.py checks both against
the engine's measured peak bytes and step times.
"""
import math
import re
from dataclasses import dataclass, field, replace

from ..checks import InputError, choice, integer, real, show
from ..engine import quant
from ..engine.ops.linalg import logits_chunk_rows
from .profiles import limits_profile, named_profile

F32 = 4
MAX_SIZE = 2 ** 40      # the largest batch, sequence, step count or model dimension a plan takes
MAX_TOKENS = 1e18


@dataclass
class Plan:
    config: dict
    batch: int
    seq: int
    tokens: float
    steps: int
    precision: str
    optimizer: str
    lora_rank: int
    device: object
    params: int = 0
    trainable_params: int = 0
    memory: dict = field(default_factory=dict)
    largest_buffer: tuple = ("", 0)
    flops_per_token: float = 0.0
    total_flops: float = 0.0
    step_time_s: float = 0.0
    total_time_s: float = 0.0
    fits: bool = True
    reasons: list = field(default_factory=list)
    suggestions: list = field(default_factory=list)
    multi_device: str = ""
    devices_needed: int = 1
    multi_device_time_s: float = 0.0
    lora_base_dtype: str = "float32"   # a LoRA plan's frozen base: float32, float16, int8 or q4
    lora_targets: object = None        # a LoRA plan's targets, as lora.apply takes them
    checkpoint_activations: int = 0    # every k-th block checkpointed (TrainConfig's; 0: none)

    def __repr__(self):
        gib = 2 ** 30
        targets = self.lora_targets if isinstance(self.lora_targets, str) else ", ".join(self.lora_targets or ())
        mode = (f"LoRA r={self.lora_rank} on {targets}, {self.lora_base_dtype} base" if self.lora_rank
                else "full training")
        k = self.checkpoint_activations
        mode += ("" if not k else ", every block checkpointed" if k == 1 else f", one block in {k} checkpointed")
        c = self.config
        model = (f"{c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} dims" if "n_layer" in c else
                 f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} heads ({c['num_key_value_heads']} "
                 f"key-value, head_dim {c['head_dim']}), {c['hidden_size']} dims, SwiGLU {c['intermediate_size']}, "
                 f"{'tied' if c['tie_word_embeddings'] else 'untied'} head")
        rows = [
            ("model", f"{model}, vocab {c['vocab_size']}"),
            ("plan", f"{mode}, batch {self.batch} x seq {self.seq}, {self.tokens:,.0f} tokens = {self.steps:,} steps, "
                     f"{self.precision}, {self.optimizer}"),
            ("device", f"{self.device.name} ({self.device.source.split(':')[0]})"),
            ("parameters", f"{self.params:,} total, {self.trainable_params:,} trainable"),
        ]
        rows += [(f"memory: {k}", f"{v / 2 ** 20:,.1f} MiB") for k, v in self.memory.items()]
        rows += [
            ("largest buffer", f"{self.largest_buffer[0]}: {self.largest_buffer[1] / 2 ** 20:,.1f} MiB"),
            ("device memory", f"{self.device.memory_bytes / gib:,.1f} GiB"),
            ("FLOPs", f"{self.flops_per_token:,.0f} per token, {self.total_flops:.3g} in total"),
            ("step time", f"{self.step_time_s * 1e3:,.1f} ms"),
            ("total time", _duration(self.total_time_s)),
            ("fits", "yes" if self.fits else "NO"),
        ]
        rows += [("reason", r) for r in self.reasons] + [("suggestion", s) for s in self.suggestions]
        if self.multi_device:
            rows.append(("more devices", self.multi_device))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def to_dict(self):
        d = {k: v for k, v in self.__dict__.items() if k != "device"}
        d["device"] = self.device.to_dict()
        return d


def _duration(s):
    if s < 120:
        return f"{s:,.1f} s"
    if s < 7200:
        return f"{s / 60:,.1f} min"
    return f"{s / 3600:,.1f} h"


def count_params(c, lora_rank=None, lora_targets=("c_attn", "c_proj", "c_fc")):
    C, L, V, T = c.n_embd, c.n_layer, c.vocab_size, c.block_size
    bias = 1 if c.bias else 0
    per_layer = 2 * (C + bias * C) + (3 * C * C + bias * 3 * C) + (C * C + bias * C) + (4 * C * C + bias * 4 * C) \
        + (4 * C * C + bias * C)
    total = V * C + (T * C if c.positions == "learned" else 0) + L * per_layer + C + bias * C
    trainable = total
    if lora_rank:
        lora = L * sum(lora_rank * (i + o) for t in lora_targets for i, o in _gpt2_shapes(C)[t])
        total, trainable = total + lora, lora
    return total, trainable


def _gpt2_shapes(C):
    """(in, out) of each GPT-2 block's linear layers by lora.apply's target name (c_proj: attention's and the MLP's)."""
    return {"c_attn": [(C, 3 * C)], "c_proj": [(C, C), (4 * C, C)], "c_fc": [(C, 4 * C)]}


def is_llama(c):
    """A config of the Llama family (LlamaConfig's fields; the planner imports nothing from the models)."""
    return all(hasattr(c, f) for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"))


def llama_params(c):
    """Parameters of a LlamaLM with config c: its layers', the final RMSNorm, the embedding and an untied head."""
    C, V = c.hidden_size, c.vocab_size
    return V * C * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * llama_layer_params(c) + C


def llama_layer_params(c):
    """Parameters of one Llama layer: q/k/v/o with key-value heads (and their optional biases), SwiGLU's three
    matrices, two RMSNorms."""
    C, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    qkv_bias = c.attention_bias or c.architecture == "Qwen2ForCausalLM"
    attn = C * (H + 2 * Hkv) * D + H * D * C + (H + 2 * Hkv) * D * qkv_bias + C * c.attention_bias
    mlp = 3 * C * I + (2 * I + C) * c.mlp_bias
    return attn + mlp + 2 * C


# a Llama block's linear layers under model.layers.N, as transformers (and so PEFT's targets) name them
LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
ALL_LINEAR = "all-linear"       # PEFT's (and lora.apply's) name for every linear layer but the output head
MAX_MATCHED_LAYERS = 10_000     # a pattern is matched path by path: at most this many layers


def llama_linears(c):
    """{path: (in, out)} of one block's linear layers (LLAMA_LINEARS; k and v of the key-value heads only), and
    "lm_head" (hidden, vocab) when the head is untied (a tied head is the embedding, no linear layer)."""
    C, I, D, H, Hkv = c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    shapes = dict(zip(LLAMA_LINEARS, ((C, H * D), (C, Hkv * D), (C, Hkv * D), (H * D, C), (C, I), (C, I), (I, C))))
    return {**shapes, **({} if c.tie_word_embeddings else {"lm_head": (C, c.vocab_size)})}


def llama_lora_layers(c, targets, r, by_name=False):
    """The linear layers lora.apply(model, r, targets=targets) wraps in a LlamaLM of config c, chosen as it (and
    PEFT) chooses them: "all-linear" every one but the head; a name each layer whose path is it or ends in "." + it
    (q_proj, self_attn.q_proj, model.layers.0.self_attn.q_proj); a string that names none, a pattern the whole path
    matches. Returns [((in, out), layers)], counted per block layer without listing the blocks (a pattern is matched
    block by block). Refuses, as apply does, targets naming nothing, the tied head and a rank above a layer's size.
    by_name: {path (self_attn.q_proj, lm_head): layers} instead."""
    L, shapes = c.num_hidden_layers, llama_linears(c)
    names = sorted({p.rsplit(".", 1)[-1] for p in shapes})
    if isinstance(targets, (set, frozenset)):
        targets = sorted(targets, key=str)
    if isinstance(targets, (list, tuple)) and ALL_LINEAR in targets and len(targets) > 1:
        raise InputError(f"lora_targets: {ALL_LINEAR!r} stands alone (every linear layer but the output head), got "
                         f"{show(targets)}")
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == ALL_LINEAR:
        targets = ALL_LINEAR
    if not (isinstance(targets, str) or isinstance(targets, (list, tuple)) and targets
            and all(isinstance(t, str) for t in targets)):
        raise InputError(f"lora_targets must be a layer name, a list of them or {ALL_LINEAR!r} (this model's linear "
                         f"layers are {names}), got {show(targets)}")

    def layers_of(t, sub):   # the blocks whose path model.layers.i.<sub> is t or ends in "." + t: "all" or {i}
        if ("." + sub).endswith("." + t):
            return "all"
        m = re.fullmatch(r"(?:(?:model\.)?layers\.)?(0|[1-9][0-9]*)\." + re.escape(sub), t)
        return {int(m[1])} if m and int(m[1]) < L else set()
    if targets == ALL_LINEAR:
        counts = {sub: L for sub in LLAMA_LINEARS}
    else:
        listed = [targets] if isinstance(targets, str) else list(targets)
        chosen = {sub: set() for sub in LLAMA_LINEARS}
        for t in listed:
            for sub in LLAMA_LINEARS:
                found = layers_of(t, sub)
                chosen[sub] = "all" if "all" in (found, chosen[sub]) else chosen[sub] | found
        head = "lm_head" in listed
        if head and c.tie_word_embeddings:
            raise InputError(f"target 'lm_head': this model's output head is its embedding 'model.embed_tokens' "
                             f"(one tensor, tie_word_embeddings), not a linear layer of its own; an adapter there "
                             f"would untie them. Target the linear layers ({', '.join(names)}) or {ALL_LINEAR!r}")
        unknown = [t for t in listed if t != "lm_head" and not any(layers_of(t, sub) for sub in LLAMA_LINEARS)]
        if isinstance(targets, str) and unknown:   # no layer's name: a pattern of whole paths, as PEFT reads it
            if L > MAX_MATCHED_LAYERS:
                raise InputError(f"lora_targets {targets!r} is a pattern, matched path by path: at most "
                                 f"{MAX_MATCHED_LAYERS:,} layers, this config has {L:,}; name the layers ({names})")
            try:
                pattern = re.compile(targets)
            except re.error:
                pattern = None
            chosen = {sub: {i for i in range(L) if pattern and pattern.fullmatch(f"model.layers.{i}.{sub}")}
                      for sub in LLAMA_LINEARS}
            head = "lm_head" in shapes and bool(pattern and pattern.fullmatch("lm_head"))
            unknown = [] if head or any(chosen.values()) else unknown
        if unknown:   # no targets would freeze the whole model and train nothing
            raise InputError(f"unknown target module(s) {unknown}: this model's linear layers are {names}; a target "
                             f"is one of them, a dotted path ending in one, or {ALL_LINEAR!r}")
        counts = {sub: L if v == "all" else len(v) for sub, v in chosen.items() if v}
        if head:
            counts["lm_head"] = 1
    for sub, (n_in, n_out) in shapes.items():
        if counts.get(sub) and r > min(n_in, n_out):
            raise InputError(f"LoRA rank r={r} exceeds min(in, out) = {min(n_in, n_out)} of {sub} ({n_in} -> "
                             f"{n_out}): r must be at most {min(n_in, n_out)}")
    return dict(counts) if by_name else [(shapes[sub], n) for sub, n in counts.items()]


def head_loss_floats(N, V, C, chunk=2, weight_grad=True):
    """Floats a training step's output layer holds at its peak for N rows, vocabulary V, width C: its loss comes from
    F.linear_cross_entropy, so `chunk` times one chunk's logits (them and their gradient) and the input's and
    the weight's gradients, summed in the forward (N C + V C), never the whole (N, V) logits."""
    return chunk * min(N, logits_chunk_rows(V)) * V + N * C + (V * C if weight_grad else 0)   # (a frozen head: none)


def head_loss_ops(rows, V, weight_grad=True):
    """Dispatches F.linear_cross_entropy adds to a wgpu training step over the composed head's for `rows` rows
    (counted on the engine): its constants, the count's floor and the backward's scalings (5, or 6 with the weight's
    gradient), and where the rows take k > 1 chunks, 5 + 13 (11 without the weight's gradient) per chunk past
    the first (the chunk's copies, its partial sums, the weight gradient's running sum)."""
    k = max(1, -(-rows // logits_chunk_rows(V)))
    return 5 + weight_grad + ((5 + (11 + 2 * weight_grad) * (k - 1)) if k > 1 else 0)


def checkpointed_layer_floats(L, per_layer, saved, every, freed=0):
    """Floats L layers hold at a step's peak when every `every`-th block (0, k, 2k, ...) is checkpointed (0: none):
    a checkpointed block keeps only its input (`saved` floats, one (B, T, C)) and, while its backward runs, its
    recomputed activations (one block's, per_layer) come on top, less what the step held before and has freed
    by then (`freed`: a Llama step's logits, softmax rows and their gradient, counted in its other part). The
    backward frees each block's activations once it has walked them, and the head's before any block's: the layers
    peak after `freed` went, and the last checkpointed block recomputes beside the plain blocks below it only
    (every=2 of 2 layers holds one block's activations, not two)."""
    n = len(range(0, L, every)) if every else 0
    below = (n - 1) * (every - 1) if n else 0   # plain blocks under the last checkpointed one
    return max(0, max(L - n, below + 1 if n else 0) * per_layer - freed) + n * saved


def _adapter_floats(L, outs, r, N, every):
    """Floats the LoRA adapters of a training step on N tokens keep for its backward: each its down projection
    (N, r) and its sum with the frozen layer's output (N, out). outs: {target: [(out, blocks adapted)]}; an "lm_head"
    is outside the blocks. Inside a checkpointed block they are kept only while it runs again, as its other
    activations (checkpointed_layer_floats; they were counted whole: plans 1.5x numpy's peaks at every block)."""
    head = sum((r + o) * n for o, n in outs.get("lm_head", ()))
    blocks = sum((r + o) * n for t, pairs in outs.items() if t != "lm_head" for o, n in pairs) / L   # per block
    return int(N * (head + checkpointed_layer_floats(L, blocks, 0, every)))


def _checkpoint_every(value, L):
    """TrainConfig.checkpoint_activations as a block interval 0..L (True 1, False 0)."""
    return integer("checkpoint_activations", int(value) if isinstance(value, bool) else value, 0, L)


def llama_head_whole(c, adapted=(), base_dtype="float32"):
    """Whether a LlamaLM's training step takes its head's whole (B, T, vocab) output rather than
    F.linear_cross_entropy's chunks (Linear.cross_entropy): an untied head adapted (the adapted (hidden, vocab)
    layer of llama_lora_layers) or stored other than float32 (lora.apply's base_dtype)."""
    return not c.tie_word_embeddings and (base_dtype != "float32" or any(
        shape == (c.hidden_size, c.vocab_size) and layers == 1 for shape, layers in adapted))


def runs_fused_attention(prof, batch, heads, seq, head_dim, rotary=False):
    """Whether the engine runs a layer's attention on its fused kernels (WgpuBackend.flash_attention_fits, by
    attention_plan.kernels_run): where the kernels take the heads on this device (the blocks that fit its workgroup
    memory decide how wide, none on numpy's profiles; rotary heads a multiple of 8) and are asked for (Llama's
    rotary attention by default, LAB_FLASH_ATTENTION as the engine reads it) or the (B, H, T, T) weights would
    exceed one buffer."""
    if not prof.workgroup_storage:
        return False
    from ..engine.wgpu import attention_plan, nn   # (only here: the package imports wgpu; a CPU plan needs none)
    return attention_plan.kernels_run(head_dim, batch * heads, seq, prof.workgroup_storage, prof.max_binding_size,
                                      rotary, nn.NNOps.FLASH_ATTENTION)


def llama_activation_floats(c, b, T, host_temporaries=False, checkpoint_every=0, fused_attention=False,
                            whole_head=False, trains_head=True, gradients=0):
    """What a LlamaLM's training step on b sequences of T tokens holds beyond weights, gradients and optimizer
    state at its peak, in floats: per token and layer about 6 C (norms, residuals, attention and MLP outputs),
    3 (H + 2 Hkv) D (q, k, v and their rotated heads, merged heads), 2.75 H T (attention scores, weights and their
    gradient), 2 I (gate, up, SwiGLU); per token 9 C (embedding, final norm, the residual's gradient), and the
    loss's head_loss_floats (1.5 chunks of logits). host_temporaries (numpy): the whole-array temporaries numpy's
    ops make in the largest ones (SwiGLU's sigmoid, the norms: L (1.5 I + 1.5 C) per token; cross-entropy's one
    (rows, V) array, within the chunks counted, or V per token where the logits are whole). Against the peaks of 16
    random configs with the chunked loss (GQA ratios, head dims, tied and untied, 1-3 layers, T 16-64, vocabularies
    61-1000): lavapipe's peak bytes within -17%/+14%, numpy's traced peak within -13%/+18%
    (tests/test_training_length_and_plan.py checks three of them). checkpoint_every: checkpointed_layer_floats.
    fused_attention: attention by the fused kernels, which keep a log-sum-exp per query row instead of the weights.
    whole_head (llama_head_whole): the loss over the whole logits, 2.5 V per token (logits, softmax rows, their
    gradient; as many numpy temporaries); trains_head: the head's weight has a gradient (not under LoRA); gradients: the
    trained parameters' floats, alive in the backward only (the chunked loss's forward-end peak has none). Returns
    the floats of one layer, the largest single tensor (name, floats) and the total split into parts."""
    C, I, L, D, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim, c.vocab_size
    H, Hkv, N = c.num_attention_heads, c.num_key_value_heads, b * T
    per_layer = N * (6 * C + 3 * (H + 2 * Hkv) * D + (H if fused_attention else 2.75 * H * T) + 2 * I)
    chunk = (N if whole_head else min(N, logits_chunk_rows(V))) * V   # one chunk of the loss's logits (or all)
    weights = 0 if fused_attention else b * H * T * T
    largest = max([("logits of a chunk of rows (rows, vocab)", chunk), ("attention weights (B, H, T, T)", weights),
                   ("MLP hidden (B, T, intermediate)", N * I), ("token embedding table", V * C)],
                  key=lambda kv: kv[1])
    # (checkpointed: the last block runs again once 2.5 chunks of logits, the loss's and their temporaries, are
    # freed; with the chunked loss, measured peaks of 2-3 layers, k = 0, 1, 2, both backends: within -1%/+18%)
    parts = {"layers": checkpointed_layer_floats(L, per_layer, N * C, checkpoint_every, freed=2.5 * chunk),
             "embeddings and logits": 9 * N * C + (2.5 * chunk if whole_head else
                                                        head_loss_floats(N, V, C, 1.5, trains_head))}
    temporaries = N * L * (1.5 * I + 1.5 * C) if host_temporaries else 0
    if host_temporaries:   # (the loss's one temporary (rows, V) array: within its chunks' count when chunked)
        parts["op temporaries (numpy)"] = (chunk if whole_head else 0) + temporaries
    if not (whole_head or checkpoint_every):
        # the chunked loss runs at the forward's end beside every layer's activations: its chunk of logits (their
        # gradient in place) and numpy's one temporary of that size. The parts above are the backward's peak, once
        # the loss's chunks are freed; where the forward's end holds more (a frozen model's small backward: LoRA's
        # odd-untied numpy peak was 21% above them), the step peaks there: no gradient exists yet (`gradients`).
        # The excess is over the backward's peak as counted, whose layers lost the freed 2.5 chunks only down to
        # zero (a small model with a large vocabulary: counting it from L per_layer - 2.5 chunks overshot by the
        # difference, its plan 32% over numpy's peak and 67% over lavapipe's)
        at_loss = (2 if host_temporaries else 1) * chunk
        parts["embeddings and logits"] += max(0, L * per_layer - parts["layers"] + at_loss - 1.5 * chunk
                                              - temporaries - gradients)
    return per_layer, largest, {k: int(v) for k, v in parts.items()}


BASE_DTYPES = {"float32": None, "float16": None, "int8": "int8", "q4": "q4_1"}   # lora.apply's, and quant's kind


def _linear_weight_bytes(c, base_dtype):
    """Bytes of the linear weights lora.apply stores as `base_dtype` (every linear layer's, adapted or not; biases,
    embeddings and norms stay float32): 2 bytes a weight for float16, packed ones as quant lays them out ((out, in)
    blocks along `in`). GPT-2: per block c_attn C -> 3C, c_proj C -> C, c_fc C -> 4C, c_proj 4C -> C; the Llama
    family: llama_linears (an untied head too)."""
    if is_llama(c):
        layers = [(shape, 1 if path == "lm_head" else c.num_hidden_layers) for path, shape in llama_linears(c).items()]
    else:
        C = c.n_embd
        layers = [(shape, c.n_layer) for shape in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C))]
    kind = BASE_DTYPES[base_dtype]
    if kind is None:
        return sum(i * o * n for (i, o), n in layers) * (2 if base_dtype == "float16" else F32)
    return sum(n * quant.packed_nbytes(kind, (o, i)) for (i, o), n in layers)


def activation_floats(c, b, T, training=True, fused_attention=False, checkpoint_every=0, trains_head=True):
    """Floats of the forward intermediates the engine keeps until backward: the total, one layer's, the largest
    single tensor (name, floats), and the total split into embeddings, layers, logits and loss. fused_attention:
    attention by the fused kernels, which keep a log-sum-exp per row instead of the (B, H, T, T) weights.
    checkpoint_every: checkpointed_layer_floats."""
    N, C, H, L, V = b * T, c.n_embd, c.n_head, c.n_layer, c.vocab_size
    drop = c.dropout > 0 and training
    att = 0 if fused_attention else b * H * T * T
    # per layer, in units of N*C: ln_1 1, c_attn 3 (bias fused into the matmul), merged heads 1, c_proj 1,
    # residual 1, ln_2 1, c_fc 4, gelu 4, mlp c_proj 1, residual 1 = 18 (F.linear and F.causal_self_attention
    # keep no split, permute or bias-add copies: attention's products read the heads inside c_attn's output);
    # dropout adds 4 (measured: lab.stats() peaks of 2- and 3-layer models); attention holds the softmax (and its
    # dropped copy)
    per_layer = (18 + (4 if drop else 0)) * N * C + (1 + (1 if drop else 0)) * att + 4 * N + (
        b * H * T if fused_attention else 0)
    embed = (2 + (1 if drop else 0)) * N * C + T * C
    head = N * C + 2 * N + head_loss_floats(N, V, C, 2, trains_head)   # ln_f, its stats, the loss's chunk, gradients
    layers = checkpointed_layer_floats(L, per_layer, N * C, checkpoint_every)
    total = embed + layers + head
    largest = max([("logits of a chunk of rows (rows, vocab)", min(N, logits_chunk_rows(V)) * V),
                   ("attention weights (B, H, T, T)", att),
                   ("MLP hidden (B, T, 4C)", 4 * N * C), ("token embedding table", V * C)], key=lambda kv: kv[1])
    return total, per_layer, largest, {"embeddings": embed, "layers": layers, "logits and loss": head}


def dropout_floats(c, b, T, attention_mask_once=False):
    """Elements passed through dropout's mask in a step, forward and backward (0 without dropout). With
    attention_mask_once (the numpy backend: attention's softmax backward reads the dropped weights instead of
    making the mask again) the (B, H, T, T) mask is made in the forward only."""
    if c.dropout <= 0:
        return 0
    N = b * T
    return 2 * (N * c.n_embd + c.n_layer * 2 * N * c.n_embd) + (1 if attention_mask_once else 2) * (
        c.n_layer * b * c.n_head * T * T)


def bias_sums_folded(rows, n_in, n_out):
    """Whether a Linear's bias gradient comes with its weight gradient's product (x^T g over `rows` rows; the
    whole-tile kernels sum g's columns as they stage it, matmul_plan's column_sums) rather than by a reduction of
    its own: the engine's own plan decides."""
    from ..engine.wgpu import matmul_plan   # (only here, as runs_fused_attention's)
    # (no grid limit: it does not decide the kernel, and a product past it is a plan that does not fit, not an error)
    limits = matmul_plan.Limits(max_workgroups=math.inf)
    return matmul_plan.plan(n_in, n_out, rows, trans_a=True, column_sums=True, limits=limits).column_sums


def op_count(c, lora_rank=None, lora_targets=("c_attn", "c_proj", "c_fc"), heads_in_place=None, update_slots=1,
             rows=1):
    """Primitive ops (GPU dispatches) of one training step, as counted on the engine (lab.stats()): 30 + 75 per
    layer (gradient clipping runs inside the optimizer's kernel; the residual adds before ln_2 and the residual
    stream's gradient sums ride in the LayerNorm kernels, whose dw and db share one reduction), of which 8 copy
    attention's heads out of and into the activations unless its products take them in place (heads_in_place;
    None: as the wgpu backend decides, sequences and heads multiples of 64), and 8 sum the four linear layers' bias
    gradients (two passes each) unless their weight-gradient products take whole tiles of `rows` and sum them as
    they stage the gradient (bias_sums_folded); dropout 2 + 4 per layer more (attention's rides in its softmax);
    LoRA adds 5 per adapted module per layer ("c_proj" names two modules of a block; each of its products long
    enough to be split along K adds one more, for the sum) and saves 21 updates of frozen parameters (20 without
    dropout: its frozen ln_f takes no reduction). Those counts are of one update dispatch and one sum of squares
    (the gradient norm) per trained tensor; update_slots > 1 counts wgpu's adamw_many_ and sumsq_many, which take
    that many parameters (and four times as many gradients) per dispatch. rows (batch x seq): the head's loss
    (head_loss_ops) and the bias sums. Counted at 32 wide over 32 rows; products on whole tiles differ by a few a
    layer, not counted here: fewer where a forward product applies its bias and GELU as it stores (c_fc's from 64
    rows: 2), more for split-K sums and transposed weights (2-5). A 2-layer step over 64 rows: 2 fewer at 32 wide,
    4 more at 64 wide."""
    if heads_in_place is None:
        heads_in_place = c.block_size % 64 == 0 and (c.n_embd // c.n_head) % 64 == 0
    C = c.n_embd
    per_layer = (67 if heads_in_place else 75) - 2 * sum(
        bias_sums_folded(rows, n_in, n_out) for n_in, n_out in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)))
    ops = 30 + per_layer * c.n_layer + ((2 + 4 * c.n_layer) if c.dropout > 0 else 0) + head_loss_ops(
        rows, c.vocab_size, not lora_rank)
    if lora_rank:
        modules = sum(2 if t == "c_proj" else 1 for t in lora_targets)
        ops += c.n_layer * 5 * modules - (21 if c.dropout > 0 else 20)  # (measured, as all these counts)
    tensors = 2 * modules * c.n_layer if lora_rank else 4 + 12 * c.n_layer   # what the optimizer updates
    ops += math.ceil(tensors / update_slots) - tensors
    if update_slots > 1:  # the gradient norm too: one dispatch per 4 x update_slots gradients (and a copy of its
        chunks = math.ceil(tensors / (4 * update_slots))  # partial sums when several), not a fill and one each
        ops += chunks + (chunks if chunks > 1 else 0) - tensors - 1
    return ops


def estimate(config, batch=12, seq=None, tokens=None, steps=None, precision="fp32", optimizer="adamw",
             lora_rank=None, lora_targets=None, device=None, vocab_size=None, lora_base_dtype="float32",
             checkpoint_activations=0, _devices=True):
    """A Plan for training `config` (a TransformerConfig) with this batch, sequence length and token budget on
    `device`: a DeviceProfile, a named profile such as 'm1', 'rtx4090', 'h200', or a function that measures one
    (lab.plan.estimate, which also takes presets and config.json files, passes measure.profile_device for 'this').
    lora_base_dtype "float16", "int8", "q4": LoRA on a base whose linear weights are stored so (lora.apply's
    base_dtype): 2 bytes each, or their packed bytes (about 1 and 0.63), instead of 4. lora_targets: as
    lora.apply takes them (None: GPT-2's c_attn, c_proj, c_fc; the Llama family's "all-linear").
    checkpoint_activations: TrainConfig's (True: every block keeps only its input and runs again in the backward;
    k: every k-th block)."""
    if tokens is not None and steps is not None:   # (the steps were planned, the tokens dropped without a word)
        raise InputError(f"tokens {show(tokens)} and steps {show(steps)} both set how long the plan trains: give one "
                         f"(steps = tokens / (batch x seq))")
    if lora_targets is not None and (lora_rank is None or lora_rank is False or lora_rank == 0):
        raise InputError(f"lora_targets {show(lora_targets)} without a lora_rank: targets are for a LoRA plan (give "
                         f"lora_rank, --lora-rank), full training trains every layer")
    if is_llama(config):
        return _estimate_llama(config, batch, seq, tokens, steps, precision, optimizer, lora_rank, device,
                               vocab_size, _devices, ALL_LINEAR if lora_targets is None else lora_targets,
                               lora_base_dtype, checkpoint_activations)
    if not all(hasattr(config, f) for f in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")):
        # resolving a preset or a file is lab.plan.estimate's: it loads models and files, which sit above the planner
        raise InputError(f"estimator.estimate takes a model config (a TransformerConfig or LlamaConfig), got "
                         f"{show(config)}: "
                         f"lab.plan.estimate also takes a preset name or a config.json")
    c = config
    # every size at most 2**40 and tokens at most 1e18: the plan's products (attention matrices, total FLOPs)
    # then stay far inside a float, so no size overflows into an OverflowError or an infinite time
    if vocab_size is not None:
        c = replace(c, vocab_size=integer("vocab_size", vocab_size, 1, MAX_SIZE))
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        integer(name, getattr(c, name), 1, MAX_SIZE)
    batch = integer("batch", batch, 1, MAX_SIZE)
    seq = c.block_size if seq is None else integer("seq", seq, 1, MAX_SIZE)
    tokens = None if tokens is None else real("tokens", tokens, low=0, low_open=True, high=MAX_TOKENS)
    steps = None if steps is None else integer("steps", steps, 1, MAX_SIZE)
    # as lora.apply: a rank above the adapted layers' smaller side (n_embd for every target) adds no capacity
    lora_rank = None if lora_rank is None else integer("lora_rank", lora_rank, 0, c.n_embd) or None
    lora_targets = _gpt2_targets(lora_targets) if lora_rank else None
    every = _checkpoint_every(checkpoint_activations, c.n_layer)
    if seq > c.block_size:  # the model never sees more than block_size tokens (its position table ends there)
        raise InputError(f"seq {seq:,} is longer than the model's block_size {c.block_size:,}: a step trains on at "
                         f"most block_size tokens; plan a config with a larger block_size (lab plan --config "
                         f"config.json, or TransformerConfig(..., block_size={seq}) in Python)")
    if precision != "fp32":
        raise InputError(f"precision {show(precision)} is not supported yet: lab trains in fp32")
    choice("optimizer", optimizer, ("adamw", "sgd"))
    _check_base_dtype(lora_base_dtype, lora_rank)
    prof = device() if callable(device) else named_profile(device)
    tokens_per_step = batch * seq
    if steps is None:
        steps = math.ceil((tokens or 1e6) / tokens_per_step)  # (tokens is None or > 0)
    tokens = steps * tokens_per_step
    params, trainable = count_params(c, lora_rank, lora_targets)
    head = c.n_embd // c.n_head
    fused = head * c.n_head == c.n_embd and runs_fused_attention(prof, batch, c.n_head, seq, head)
    acts, per_layer, largest, parts = activation_floats(c, batch, seq, fused_attention=fused, checkpoint_every=every,
                                                        trains_head=not lora_rank)
    recomputed = len(range(0, c.n_layer, every)) if every else 0   # blocks whose forward runs twice
    opt_floats = (2 if optimizer == "adamw" else 1) * trainable
    # backward working set, measured on the engine (lab.stats() peaks of 2- and 3-layer models, the part that does
    # not grow with depth): about 25 x (B, T, C) of gradients and temporaries alive while the last block
    # is differentiated (its MLP's 4C-wide output and GELU gradients, the residual's gradient, dq|dk|dv) and 1.5
    # attention matrices (2.5 with dropout: the scores' gradient, before and after dropout, and the softmax's)
    att = 0 if fused else batch * c.n_head * seq * seq
    backward = int(25 * batch * seq * c.n_embd
                  + (2.5 if c.dropout > 0 else 1.5) * att)
    if lora_rank:   # (not counted at all: plans of 4 adapted layers were 22% under lavapipe's and numpy's peaks)
        parts["LoRA adapters"] = _adapter_floats(c.n_layer, {t: [(o, c.n_layer) for _, o in _gpt2_shapes(c.n_embd)[t]]
                                                             for t in lora_targets}, lora_rank, batch * seq, every)
        acts += parts["LoRA adapters"]
    saved = _linear_weight_bytes(c, "float32") - _linear_weight_bytes(c, lora_base_dtype)
    memory = {
        "weights": params * F32 - saved, "gradients": trainable * F32, "optimizer state": opt_floats * F32,
        f"activations: {c.n_layer} layers": parts["layers"] * F32, "activations: embeddings": parts["embeddings"] * F32,
        "activations: logits and loss": parts["logits and loss"] * F32, "backward working set": backward * F32,
        **({"activations: LoRA adapters": parts["LoRA adapters"] * F32} if lora_rank else {}),
    }
    memory["total"] = sum(memory.values())
    memory["activations"] = acts * F32                               # (the three activation rows together)
    memory["activations per layer"] = per_layer * F32
    memory["KV cache (generation, batch 1)"] = 2 * c.n_layer * c.block_size * c.n_embd * F32
    flops_per_token = 6 * params + 12 * c.n_layer * c.n_embd * seq
    if lora_rank:  # no weight gradients for the frozen base: about 4 of the 6 FLOPs per parameter remain
        flops_per_token = 4 * (params - trainable) + 6 * trainable + 12 * c.n_layer * c.n_embd * seq
    # a recomputed block's forward again: 2 FLOPs per weight (12 C^2) and attention's 4 C T
    flops_per_token += recomputed * (24 * c.n_embd ** 2 + 4 * c.n_embd * seq)
    # (19 dispatches a block's forward, 21 with dropout: counted on the engine, lab.stats(), at 32 wide over 32
    # rows; 17 where c_fc's product takes whole tiles and applies its bias and GELU as it stores, 16 at 64 wide)
    ops = op_count(c, lora_rank, lora_targets, update_slots=prof.update_slots, rows=batch * seq) + recomputed * (
        21 if c.dropout > 0 else 19)
    # elementwise work scales with the activation floats (the profile says what one costs on the device); the
    # optimizer reads and writes parameter, gradient and two moments of every trainable float
    step_time = (flops_per_token * tokens_per_step / prof.matmul_flops
                 + (acts + recomputed * per_layer) * prof.elementwise_s_per_float
                 + dropout_floats(c, batch, seq, attention_mask_once=prof.host_temporaries) * prof.dropout_s_per_float
                 + 4 * 2 * trainable * F32 / prof.bandwidth + ops * prof.op_overhead_s)
    plan = Plan(config=c.to_dict(), batch=batch, seq=seq, tokens=tokens, steps=steps, precision=precision,
                optimizer=optimizer, lora_rank=lora_rank or 0, device=prof, params=params,
                trainable_params=trainable, memory=memory, largest_buffer=(largest[0], largest[1] * F32),
                flops_per_token=flops_per_token, total_flops=flops_per_token * tokens, step_time_s=step_time,
                total_time_s=step_time * steps, lora_base_dtype=lora_base_dtype,
                lora_targets=_targets_shown(lora_targets) if lora_rank else None, checkpoint_activations=every)
    def share_bytes(b):  # one device's memory (with DDP's gradient buckets) for a share of b sequences
        share = estimate(c, b, seq, None, 1, precision, optimizer, lora_rank, lora_targets, prof,
                         lora_base_dtype=lora_base_dtype, checkpoint_activations=every, _devices=False)
        return share.memory["total"] + share.memory["gradients"]

    def checkpointed():   # the same plan with every block checkpointed
        return estimate(c, batch, seq, None, 1, precision, optimizer, lora_rank, lora_targets, prof,
                        lora_base_dtype=lora_base_dtype, checkpoint_activations=1, _devices=False)
    _check_fit(plan, c, prof, share_bytes if _devices else None, checkpointed)
    return plan


GPT2_LINEARS = ("c_attn", "c_proj", "c_fc")   # a GPT-2 block's linear layers (c_proj: attention's and the MLP's)


def _gpt2_targets(targets):
    """A GPT-2 plan's targets as lora.apply takes them by name (None: its default, all three), checked."""
    if targets is None or targets == ALL_LINEAR or targets == [ALL_LINEAR] or targets == (ALL_LINEAR,):
        return GPT2_LINEARS
    listed = [targets] if isinstance(targets, str) else targets
    if not (isinstance(listed, (list, tuple)) and listed and all(isinstance(t, str) for t in listed)):
        raise InputError(f"lora_targets must be a layer name, a list of them or {ALL_LINEAR!r} (a GPT-2 model's "
                         f"linear layers are {list(GPT2_LINEARS)}), got {show(targets)}")
    unknown = [t for t in listed if t not in GPT2_LINEARS]
    if unknown:
        raise InputError(f"unknown target module(s) {unknown}: a GPT-2 plan adapts {list(GPT2_LINEARS)} by name "
                         f"or {ALL_LINEAR!r}")
    return tuple(dict.fromkeys(listed))


def _plan_inputs(c, batch, seq, tokens, steps, precision, optimizer):
    """The checks every family's plan makes of its inputs; returns batch, seq, tokens, steps (seq None: the
    model's block_size)."""
    batch = integer("batch", batch, 1, MAX_SIZE)
    seq = c.block_size if seq is None else integer("seq", seq, 1, MAX_SIZE)
    tokens = None if tokens is None else real("tokens", tokens, low=0, low_open=True, high=MAX_TOKENS)
    steps = None if steps is None else integer("steps", steps, 1, MAX_SIZE)
    if seq > c.block_size:
        raise InputError(f"seq {seq:,} is longer than the model's block_size {c.block_size:,}: a step trains on at "
                         f"most block_size tokens")
    if precision != "fp32":
        raise InputError(f"precision {show(precision)} is not supported yet: lab trains in fp32")
    choice("optimizer", optimizer, ("adamw", "sgd"))
    return batch, seq, tokens, steps


def _estimate_llama(c, batch, seq, tokens, steps, precision, optimizer, lora_rank, device, vocab_size, _devices,
                    lora_targets=ALL_LINEAR, lora_base_dtype="float32", checkpoint_activations=0):
    """estimate() for the Llama family: grouped-query attention (keys and values of num_key_value_heads, in the
    KV cache too), SwiGLU's three matrices, a vocabulary whose logits, softmax rows and their gradient are often
    the largest tensors of a step, tied or untied head. With lora_rank: the adapters lora.apply(model, lora_rank,
    targets=lora_targets, base_dtype=lora_base_dtype) adds (llama_lora_layers) are all that trains; the linear
    weights are stored as lora_base_dtype."""
    if vocab_size is not None:
        c = replace(c, vocab_size=integer("vocab_size", vocab_size, 1, MAX_SIZE))
    for name in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                 "intermediate_size", "vocab_size", "max_position_embeddings"):
        integer(name, getattr(c, name), 1, MAX_SIZE)
    batch, seq, tokens, steps = _plan_inputs(c, batch, seq, tokens, steps, precision, optimizer)
    every = _checkpoint_every(checkpoint_activations, c.num_hidden_layers)
    lora_rank = None if lora_rank is None else integer("lora_rank", lora_rank, 0, MAX_SIZE) or None
    _check_base_dtype(lora_base_dtype, lora_rank)
    chosen = llama_lora_layers(c, lora_targets, lora_rank, by_name=True) if lora_rank else {}
    adapted = [(shape, chosen[sub]) for sub, shape in llama_linears(c).items() if sub in chosen]
    prof = device() if callable(device) else named_profile(device)
    tokens_per_step = batch * seq
    if steps is None:
        steps = math.ceil((tokens or 1e6) / tokens_per_step)
    tokens = steps * tokens_per_step
    base = llama_params(c)
    L, H, D = c.num_hidden_layers, c.num_attention_heads, c.head_dim
    fused = runs_fused_attention(prof, batch, H, seq, D, rotary=True)
    trainable = sum(lora_rank * (i + o) * n for (i, o), n in adapted) if lora_rank else base
    per_layer, largest, parts = llama_activation_floats(c, batch, seq, prof.host_temporaries, every, fused,
                                                        llama_head_whole(c, adapted, lora_base_dtype), not lora_rank,
                                                        trainable)
    recomputed = len(range(0, L, every)) if every else 0   # blocks whose forward runs twice
    params = base + trainable if lora_rank else base
    if lora_rank:
        parts["LoRA adapters"] = _adapter_floats(L, {sub: [(shape[1], chosen[sub])] for sub, shape
                                                     in llama_linears(c).items() if sub in chosen},
                                                 lora_rank, tokens_per_step, every)
    if prof.host_temporaries and lora_base_dtype != "float32":
        parts["op temporaries (numpy)"] += _base_copy_floats(c, lora_base_dtype)
    acts = sum(parts.values())
    saved = _linear_weight_bytes(c, "float32") - _linear_weight_bytes(c, lora_base_dtype)
    memory = {"weights": params * F32 - saved, "gradients": trainable * F32,
              "optimizer state": (2 if optimizer == "adamw" else 1) * trainable * F32,
              **{f"activations: {L} layers" if k == "layers" else f"activations: {k}": v * F32
                 for k, v in parts.items()}}
    memory["total"] = sum(memory.values())
    memory["activations"] = acts * F32
    memory["activations per layer"] = int(per_layer) * F32
    # keys and values of the key-value heads only (each serves num_attention_heads / num_key_value_heads queries)
    memory["KV cache (generation, batch 1)"] = 2 * L * c.num_key_value_heads * D * seq * F32
    # no weight gradients for a frozen base: 4 of the 6 FLOPs per parameter remain
    flops_per_token = 6 * trainable + 4 * (params - trainable) + 12 * L * H * D * seq
    # a recomputed block's forward again: 2 FLOPs per weight and attention's 4 H D T
    flops_per_token += recomputed * (2 * llama_layer_params(c) + 4 * H * D * seq)
    ops = llama_op_count(c, prof.update_slots, adapted, batch * seq, lora_base_dtype, fused, [
        chosen.get(f"self_attn.{p}_proj", 0) for p in "qkv"]) + recomputed * llama_recomputed_ops(c, batch * seq, fused)
    step_time = (flops_per_token * tokens_per_step / prof.matmul_flops
                 + (acts + recomputed * per_layer) * prof.elementwise_s_per_float
                 + 4 * 2 * trainable * F32 / prof.bandwidth + ops * prof.op_overhead_s)
    plan = Plan(config=c.to_dict(), batch=batch, seq=seq, tokens=tokens, steps=steps, precision=precision,
                optimizer=optimizer, lora_rank=lora_rank or 0, device=prof, params=params,
                trainable_params=trainable, memory=memory, largest_buffer=(largest[0], largest[1] * F32),
                flops_per_token=flops_per_token, total_flops=flops_per_token * tokens, step_time_s=step_time,
                total_time_s=step_time * steps, lora_base_dtype=lora_base_dtype,
                lora_targets=_targets_shown(lora_targets) if lora_rank else None, checkpoint_activations=every)

    def share_bytes(b):
        share = _estimate_llama(c, b, seq, None, 1, precision, optimizer, lora_rank, prof, None, False, lora_targets,
                                lora_base_dtype, every)
        return share.memory["total"] + share.memory["gradients"]

    def checkpointed():   # the same plan with every block checkpointed
        return _estimate_llama(c, batch, seq, None, 1, precision, optimizer, lora_rank, prof, None, False,
                               lora_targets, lora_base_dtype, 1)
    _check_fit(plan, c, prof, share_bytes if _devices else None, checkpointed)
    return plan


def _base_copy_floats(c, base_dtype):
    """The float32 copy numpy's products make of a frozen linear weight stored as base_dtype, at most: a float16
    weight whole, a packed one a chunk of rows at a time (quant.chunk_rows, rows of whole 32-blocks for q4)."""
    kind, most = BASE_DTYPES[base_dtype], 0
    for i, o in llama_linears(c).values():
        if kind is None:
            most = max(most, i * o)
        else:
            rows = min(o, quant.chunk_rows(quant.QuantizedArray(kind, (o, i))))
            most = max(most, rows * (i if kind == "int8" else quant.BLOCK * -(-i // quant.BLOCK)))
    return most


def _targets_shown(targets):
    """Targets as a plan records them (JSON's types; a set in the order lora.apply records it)."""
    return targets if isinstance(targets, str) else sorted(targets, key=str) if isinstance(
        targets, (set, frozenset)) else list(targets)


def _check_base_dtype(base_dtype, lora_rank):
    if base_dtype not in BASE_DTYPES or (base_dtype != "float32" and not lora_rank):
        raise InputError(f"lora_base_dtype must be one of {list(BASE_DTYPES)} (all but float32 with a lora_rank: "
                         f"a frozen base only), got {show(base_dtype)}" + ("" if lora_rank else " without a lora_rank"))


def llama_op_count(c, update_slots=1, adapted=(), rows=1, base_dtype="float32", fused_attention=False,
                   adapted_qkv=None):
    """Dispatches of a LlamaLM training step on wgpu (fused norm, rotary and SwiGLU kernels), as counted on the
    engine (lab.stats()): 15 + 51 per layer (+1 for a tied head: the embedding's two gradients summed; +2 a layer
    with dropout), or with fused_attention (runs_fused_attention: rotation, scores, softmax, dropout and weighted sum
    in its passes) 39 per layer, q|k|v one product of the weights side by side where the step has at least
    hidden_size rows (F.linears), 47 where their outputs are copied together, plus the
    optimizer's: an update and a sum of squares (the gradient
    norm) per trained tensor and a fill, or with update_slots > 1 one update per update_slots tensors and one sum
    per 4 x update_slots gradients (and a copy of the partial sums when several), as op_count counts them.
    adapted (llama_lora_layers' [((in, out), layers)]): LoRA on a frozen base, -1 + 44 per layer (fused: 40 where
    some of q_proj, k_proj, v_proj are adapted, their outputs copied together, and in the first layer, whose input
    wants no gradient, 2 more for each left plain; where none are, 31 side by side (40 in the first layer), else 40
    (37); adapted_qkv: how many layers adapt q_proj, k_proj, v_proj, all where None; no weight
    gradients for the linear layers, embedding and norms) + 10 per adapter (its two forward products and the
    backward's four, two scalings and the input gradient's sum), its A and B the trained tensors. rows (batch x
    seq): the head's loss (head_loss_ops), unless the head's output is taken whole (llama_head_whole)."""
    side = rows >= c.hidden_size   # (F.linears' q|k|v: one product of the weights side by side)
    if adapted:
        n = sum(layers for _, layers in adapted)
        tensors, ops = 2 * n, -1 + 44 * c.num_hidden_layers + 10 * n
        if fused_attention:   # (the layers adapting some of q, k, v taken as the same ones, the first among them)
            L = c.num_hidden_layers
            qkv = (L,) * 3 if adapted_qkv is None else adapted_qkv
            m, (plain, first) = max(qkv), (-13, -4) if side else (-4, -7)   # (where none is adapted)
            ops += -4 * m + 2 * (3 - sum(map(bool, qkv))) + plain * (L - m) if m else plain * (L - 1) + first
    else:
        qkv_bias = c.attention_bias or c.architecture == "Qwen2ForCausalLM"
        tensors = 2 + (not c.tie_word_embeddings) + c.num_hidden_layers * (
            9 + 3 * qkv_bias + c.attention_bias + 3 * c.mlp_bias)
        ops = 15 + bool(c.tie_word_embeddings) + (
            (39 if side else 47) if fused_attention else 51) * c.num_hidden_layers
    ops += 0 if fused_attention or not c.dropout else 2 * c.num_hidden_layers
    ops += 0 if llama_head_whole(c, adapted, base_dtype) else head_loss_ops(rows, c.vocab_size, not adapted)
    if update_slots > 1:
        chunks = math.ceil(tensors / (4 * update_slots))
        return ops + math.ceil(tensors / update_slots) + chunks + (chunks if chunks > 1 else 0)
    return ops + 2 * tensors + 1


def llama_recomputed_ops(c, rows, fused_attention=False):
    """Dispatches of a checkpointed LlamaLM block's forward run again in the backward, as counted on the engine
    (lab.stats()): 18 (19 with dropout), on the fused attention 14 (16 where the step's rows are fewer than
    hidden_size: q|k|v's outputs copied together, as llama_op_count counts)."""
    if fused_attention:
        return 14 if rows >= c.hidden_size else 16
    return 19 if c.dropout > 0 else 18


class DoesNotFitError(InputError):
    """A training plan needs more memory (or a bigger buffer) than the device has; the message says why and what
    would fit. `plan` is the estimate behind it."""

    def __init__(self, message, plan):
        super().__init__(message)
        self.plan = plan


def check_fits(config, batch, backend, seq=None, lora_rank=None, optimizer="adamw", lora_base_dtype="float32",
               lora_targets=None, checkpoint_activations=0):
    """Raise DoesNotFitError, with the plan estimator's reasons and suggestions, when training `config` at this
    batch would not fit `backend`'s device: called before a run allocates anything for its steps."""
    prof = limits_profile(backend)
    plan = estimate(config, batch=batch, seq=seq, steps=1, lora_rank=lora_rank, device=prof, optimizer=optimizer,
                    lora_base_dtype=lora_base_dtype, lora_targets=lora_targets,
                    checkpoint_activations=checkpoint_activations)
    if plan.fits:
        return plan
    # one line (the command line prints it as its one error line): the reasons, then what would fit
    message = f"this training plan does not fit {prof.name}: " + "; ".join(plan.reasons)
    if plan.suggestions:
        message += ". Suggestions: " + "; ".join(plan.suggestions)
    if plan.multi_device:
        message += f". More devices: {plan.multi_device}"
    raise DoesNotFitError(message, plan)


def check_model_fits(config, backend):
    """Raise DoesNotFitError before a model's weights are allocated when they alone cannot fit `backend`'s device:
    their total above its memory, or one weight above its largest buffer."""
    prof = limits_profile(backend)
    params, _ = count_params(config)
    C, V, T = config.n_embd, config.vocab_size, config.block_size
    largest = max((("wte (vocab_size, n_embd)", V * C), ("wpe (block_size, n_embd)", T * C),
                   ("mlp.c_fc.weight (n_embd, 4 n_embd)", 4 * C * C)), key=lambda x: x[1])
    reasons = []
    if params * F32 > prof.memory_bytes:
        reasons.append(f"its {params:,} weights need {params * F32 / 2 ** 30:.2f} GiB, the device has "
                       f"{prof.memory_bytes / 2 ** 30:.2f} GiB")
    limit = min(prof.max_binding_size, prof.max_buffer_size)
    if largest[1] * F32 > limit:
        reasons.append(f"the {largest[0]} weight needs {_mib(largest[1] * F32, limit)}, above the device's "
                       f"largest buffer binding of {_mib(limit, largest[1] * F32)}")
    if reasons:
        raise DoesNotFitError(f"this model does not fit {prof.name}: " + "; ".join(reasons) + ". A smaller "
                              f"n_embd, vocab_size or n_layer would; lab.plan.estimate(...) shows the whole budget",
                              None)


def _check_fit(plan, c, prof, share_bytes=None, checkpointed=None):
    total = plan.memory["total"]
    if total > prof.memory_bytes:
        plan.fits = False
        plan.reasons.append(f"needs {total / 2 ** 30:.2f} GiB, the device has {prof.memory_bytes / 2 ** 30:.2f} GiB")
    name, size = plan.largest_buffer
    for limit, label in ((prof.max_binding_size, "max-storage-buffer-binding-size"), (prof.max_buffer_size, "max-buffer-size")):
        if size > limit:
            plan.fits = False
            plan.reasons.append(f"the {name} tensor needs {_mib(size, limit)}, above the device's {label} of "
                                f"{_mib(limit, size)}")
            break
    if not plan.fits:
        if plan.checkpoint_activations != 1 and checkpointed is not None:
            other = checkpointed()
            if other.fits:   # (a buffer too large stays so: memory was what failed)
                ratio = other.step_time_s / plan.step_time_s if plan.step_time_s else math.nan
                plan.suggestions.append(
                    f"checkpoint_activations=True (TrainConfig; --checkpoint-activations): each block keeps only its "
                    f"input and runs again in the backward, {other.memory['total'] / 2 ** 30:.2f} GiB in all"
                    + (f", for about {ratio:.2f}x the step time" if math.isfinite(ratio) else ""))
        acts = plan.memory["activations"] + plan.memory.get("backward working set", 0)  # what scales with the batch
        fixed = total - acts
        if fixed < prof.memory_bytes and plan.batch > 1:
            b = max(1, int(plan.batch * (prof.memory_bytes - fixed) / acts * 0.9))
            # (the largest buffer shrinks with the micro-batch too, as _multi_device counts it)
            acc = max(math.ceil(plan.batch / min(b, plan.batch - 1)),
                      math.ceil(size / min(prof.max_binding_size, prof.max_buffer_size)))
            # a count of micro-batches that divides the batch, if one is near, keeps it exactly (b acc is the
            # effective batch; a bounded search: a batch of 10^18 has counts of 10^15)
            acc = next((a for a in range(acc, min(2 * acc, acc + 4096) + 1) if plan.batch % a == 0), acc)
            b = math.ceil(plan.batch / acc)
            plan.suggestions.append(f"batch {b} with gradient accumulation over {acc} micro-batches keeps the "
                                    f"effective batch of {plan.batch}" if b * acc == plan.batch else
                                    f"batch {b} with gradient accumulation over {acc} micro-batches (an effective "
                                    f"batch of {b * acc}: {plan.batch} is not a multiple of {acc})")
        if not plan.lora_rank:
            plan.suggestions.append("fine-tune a LoRA adapter (e.g. lora_rank=8): no gradients or optimizer state "
                                    "for the base weights")
        else:
            if plan.lora_rank > 4:
                plan.suggestions.append(f"a smaller LoRA rank than {plan.lora_rank} cuts adapter memory")
            now = _linear_weight_bytes(c, plan.lora_base_dtype)
            for dtype, how in (("float16", "as float16"), ("int8", "as int8 (per-output-channel absmax)"),
                               ("q4", "in 4 bits (GGUF's Q4_1 blocks)")):
                less = now - _linear_weight_bytes(c, dtype)
                if less > 0:
                    plan.suggestions.append(f"store the frozen base {how} (lora.apply(..., base_dtype='{dtype}')): "
                                            f"{less / 2 ** 20:,.0f} MiB less")
        if plan.seq > 64:
            plan.suggestions.append(f"a shorter context than {plan.seq} shrinks activations and attention weights "
                                    f"(quadratic in the context)")
    if share_bytes is not None:
        _check_devices(plan, prof, share_bytes)


DDP_SCALING = 0.9   # tokens/s on N devices over N x one device's, for DDP on one host (README: measured on H200s)
DAY_S = 24 * 3600


def _check_devices(plan, prof, share_bytes):
    """How many devices of this kind the run needs (to fit, or to finish within a day), and how long it takes on
    them with DDP: every device holds the whole model, gradients, optimizer state and DDP's gradient buckets,
    and a 1/N share of the batch's activations (share_bytes(b): one device's bytes for b sequences, which checks
    the count: a share can cross a threshold the whole batch did not, e.g. attention weights small enough to be
    held again)."""
    m = plan.memory
    fixed = m["weights"] + 2 * m["gradients"] + m["optimizer state"]
    acts = m["activations"] + m.get("backward working set", 0)   # (a Llama plan counts it in its activations)
    n_memory = 1
    if plan.memory["total"] > prof.memory_bytes:
        if fixed >= prof.memory_bytes:
            plan.multi_device = ("the model, its gradients and optimizer state alone exceed one device, and data "
                                 "parallelism (DDP) copies them to every device: shard the model (e.g. PyTorch FSDP)"
                                 + ("" if plan.lora_rank else " or use LoRA"))
            return
        n_memory = math.ceil(acts / (prof.memory_bytes - fixed))
        n_memory = _first_fitting(n_memory, plan.batch,
                                  lambda n: share_bytes(math.ceil(plan.batch / n)) <= prof.memory_bytes)
        if n_memory > plan.batch:
            plan.multi_device = (f"even one sequence per device does not fit: {plan.batch} devices are not enough")
            return
    name, size = plan.largest_buffer   # batch-sized tensors shrink with the per-device batch too
    n_binding = math.ceil(size / min(prof.max_binding_size, prof.max_buffer_size)) if size else 1
    n_memory = max(n_memory, n_binding)
    n_time = math.ceil(plan.total_time_s / DAY_S) if plan.total_time_s > DAY_S else 1
    n = max(n_memory, n_time)
    if n <= 1:
        return
    plan.devices_needed = n
    plan.multi_device_time_s = plan.total_time_s / (n * DDP_SCALING)
    why = "to fit the batch" if n_memory >= n_time else "to finish within a day"
    # a limits profile (the check before a run) has no timings: the time is NaN, and said only when known
    when = (f"about {_duration(plan.multi_device_time_s)} on " if math.isfinite(plan.multi_device_time_s)
            else "")
    plan.multi_device = (f"this needs more than one device ({why}): {when}"
                         f"{n} of them with PyTorch DDP (batch {math.ceil(plan.batch / n)} per device, "
                         f"{DDP_SCALING:.0%} scaling). Export the run (`python -m lab export --checkpoint DIR "
                         f"--format hf --out OUT`), train with `torchrun --nproc_per_node {n} -m lab.scale.ddp_train "
                         f"--model OUT --out OUT-ddp`, and bring it back with `python -m lab import OUT-ddp`")


def _mib(n_bytes, other):
    """n_bytes in MiB, or in bytes where MiB would print it equal to `other` (2 GiB against a 2 GiB - 4 limit)."""
    mib = f"{n_bytes / 2 ** 20:,.0f} MiB"
    return mib if mib != f"{other / 2 ** 20:,.0f} MiB" else f"{n_bytes:,} bytes"


def _first_fitting(n, limit, fits):
    """The first n' >= n with fits(n'), or a number above `limit` where none up to it fits. One by one at first (a
    share can cross a threshold, so fitting need not be monotonic in n), then by doubling and bisection: a huge
    batch (a typo in a form) costs a few dozen estimates, not one per device."""
    for _ in range(64):
        if n > limit or fits(n):
            return n
        n += 1
    bad, step = n - 1, 1
    while True:
        n = min(bad + step, limit + 1)
        if n > limit or fits(n):
            break
        bad, step = n, 2 * step
    while n - bad > 1:   # bad does not fit, n does (or is past the limit)
        mid = (bad + n) // 2
        bad, n = (bad, mid) if fits(mid) else (mid, n)
    return n
