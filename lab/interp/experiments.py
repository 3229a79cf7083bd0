"""Experiments on a language model's insides, as functions returning arrays: activation patching over layers and
positions, direct logit attribution per head, and induction scores per head. Each runs the model through its hook
points (lab.interp.hooks: run_with_cache, run_with_hooks) without dropout and without gradients; the names and
shapes are TransformerLens's. Shapes: L layers, H heads, B batch, T positions, C the residual width, V the vocab."""
from dataclasses import dataclass, field

import numpy as np

from .. import nn
from ..checks import InputError, integer, show
from ..engine import ops as F
from ..engine.tensor import Tensor, no_grad
from .lens import _tokens

PATCH_HOOKS = {"resid_pre": "blocks.{}.hook_resid_pre", "attn_out": "blocks.{}.hook_attn_out",
               "mlp_out": "blocks.{}.hook_mlp_out", "resid_post": "blocks.{}.hook_resid_post"}
_PATCH_BYTES = 1 << 26   # the float32 logits of one patched forward (the copies of the prompt it runs), at most


def n_layers(model):
    from .hooks import HookedModel
    if not isinstance(model, HookedModel):
        raise InputError(f"lab.interp's experiments need a model with hook points (TransformerLM, LlamaLM), got "
                         f"{show(model)}")
    return sum(1 for name in model.hook_names() if name.endswith(".hook_resid_pre"))


def _ids(model, name, value, rows):
    """An answer id (one for every row, or one per row) as an int64 array (rows,), each in the vocabulary."""
    vocab = model.config.vocab_size
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(rows, integer(name, value, low=0, high=vocab - 1))
    if arr.shape != (rows,) or arr.dtype.kind not in "iu":
        raise InputError(f"{name} must be a token id or one token id per row ({rows} row{'s' * (rows != 1)}), got {show(value)}")
    for v in arr:
        integer(name, v, low=0, high=vocab - 1)
    return arr.astype(np.int64)


def _wrong_ids(model, wrong_id, answer):
    """wrong_id as _ids gives it, refused where it is the answer in every row: a token's logit minus its own is 0
    whatever the model does, so nothing could be measured or attributed."""
    wrong = _ids(model, "wrong_id", wrong_id, len(answer))
    if (wrong == answer).all():
        raise InputError(f"wrong_id {show(wrong_id)} is answer_id itself: the logit difference of a token with "
                         f"itself is 0 in every run; pass a competing token (or wrong_id=None where allowed)")
    return wrong


def _position(pos, T, name="pos"):
    p = integer(name, pos, low=-T, high=T - 1)
    return p % T


def _logit_diff(logits, pos, answer, wrong):
    """Mean over rows of logit[answer] - logit[wrong] (wrong None: the answer's logit) at position pos."""
    rows = np.arange(len(answer))
    last = logits[rows, pos]
    return float(np.mean(last[rows, answer] - (0 if wrong is None else last[rows, wrong])))


def _numpy(logits):
    return logits.numpy() if isinstance(logits, Tensor) else np.asarray(logits)


@dataclass
class PatchingResult:
    """values[l, j]: the logit difference restored by patching layer l's activation at positions[j] from the clean
    run into the corrupted one, as a fraction: (patched - corrupted) / (clean - corrupted); 1 restores the clean
    run's difference, 0 changes nothing."""
    values: np.ndarray
    clean_diff: float
    corrupted_diff: float
    labels: list            # the rows' layer labels, "L0", "L1", ...
    positions: list         # the columns' positions in the prompts
    hook: str               # which activation was patched: "resid_pre", "attn_out", "mlp_out" or "resid_post"
    _run: object = field(default=None, repr=False)

    def patched_logits(self, layer, pos):
        """Logits (B, V) at the answer position of the corrupted run with `layer`'s activation at position `pos`
        patched from the clean run: what that cell's run predicts. One forward of the model."""
        L, T = len(self.labels), self._run["tokens"].shape[1]
        layer = integer("layer", layer, low=-L, high=L - 1) % L
        return self._run["forward"]([(layer, _position(pos, T))])[:, self._run["pos"]]


def activation_patching(model, clean_tokens, corrupted_tokens, answer_id, wrong_id, hook="resid_pre",
                        positions=None, pos=-1):
    """Patch one activation at a time from the clean run into the corrupted run: for each layer and each position
    (all, or those listed), the corrupted prompt runs with that layer's `hook` activation at that position replaced
    by the clean run's. PatchingResult.values (L, positions) holds the logit difference answer - wrong at position
    `pos` that each patch restores, as a fraction of clean - corrupted. The prompts must have the same length (the
    positions correspond) and be told apart by the model (clean and corrupted differences must differ)."""
    if not isinstance(hook, str) or hook not in PATCH_HOOKS:
        raise InputError(f"activation_patching: hook must be one of {list(PATCH_HOOKS)}, got {show(hook)}")
    L = n_layers(model)
    clean = _tokens(model, clean_tokens, "clean_tokens")
    corrupted = _tokens(model, corrupted_tokens, "corrupted_tokens")
    if clean.shape != corrupted.shape:
        raise InputError(f"activation_patching: clean_tokens {clean.shape} and corrupted_tokens {corrupted.shape} "
                         f"differ in shape: patching swaps activations position for position, so both prompts need "
                         f"the same number of rows and tokens")
    B, T = clean.shape
    answer = _ids(model, "answer_id", answer_id, B)
    wrong = _wrong_ids(model, wrong_id, answer)
    pos = _position(pos, T)
    if positions is None:
        positions = list(range(T))
    else:
        if isinstance(positions, (int, np.integer)) or not len(positions):
            raise InputError(f"activation_patching: positions must be a non-empty list of positions, got "
                             f"{show(positions)}")
        positions = [_position(p, T, "positions") for p in positions]
    names = [PATCH_HOOKS[hook].format(layer) for layer in range(L)]
    with no_grad(), nn.evaluating():
        clean_logits, cache = model.run_with_cache(clean, names_filter=names)
        corrupted_logits = _numpy(model(corrupted))
    clean_diff = _logit_diff(_numpy(clean_logits), pos, answer, wrong)
    corrupted_diff = _logit_diff(corrupted_logits, pos, answer, wrong)
    if not np.isfinite([clean_diff, corrupted_diff]).all():
        raise InputError(f"activation_patching: the model's logit differences are not finite (clean {clean_diff}, "
                         f"corrupted {corrupted_diff}): its logits hold NaN or inf")
    # a difference of float32 rounding would turn the fractions into noise: the prompts must be told apart
    if abs(clean_diff - corrupted_diff) <= 1e-5 * (1 + abs(clean_diff) + abs(corrupted_diff)):
        raise InputError(f"activation_patching: the clean and corrupted runs give the same logit difference "
                         f"({clean_diff:.6g} and {corrupted_diff:.6g}), so no fraction of it can be restored; choose "
                         f"prompts, or answer and wrong ids, that the model tells apart")
    sources = [cache[name] for name in names]   # (B, T, C) each

    def patched(cells):
        """Logits (len(cells) * B, T, V): the corrupted prompt once per (layer, position) in `cells`, each copy with
        that layer's activation at that position taken from the clean run. The cells of all layers share one
        forward: a forward of few tokens reads every weight for little work, so fewer, wider ones are faster."""
        def patch(layer):
            def fn(act, name):
                a = act.numpy().copy()
                for i, (l, p) in enumerate(cells):
                    if l == layer:
                        a[i * B:(i + 1) * B, p] = sources[layer][:, p]
                return a
            return fn
        hooks = [(names[layer], patch(layer)) for layer in sorted({l for l, _ in cells})]
        with no_grad(), nn.evaluating():
            return _numpy(model.run_with_hooks(np.tile(corrupted, (len(cells), 1)), fwd_hooks=hooks))

    cells = [(layer, p) for layer in range(L) for p in positions]
    values = np.zeros(len(cells), dtype=np.float64)
    step = max(1, _PATCH_BYTES // (4 * B * T * model.config.vocab_size))   # copies whose logits fit the budget
    for start in range(0, len(cells), step):
        logits = patched(cells[start:start + step])
        for i in range(len(logits) // B):
            diff = _logit_diff(logits[i * B:(i + 1) * B], pos, answer, wrong)
            values[start + i] = (diff - corrupted_diff) / (clean_diff - corrupted_diff)
    values = values.reshape(L, len(positions))
    return PatchingResult(values.astype(np.float32), clean_diff, corrupted_diff, [f"L{i}" for i in range(L)],
                          positions, hook, _run={"forward": patched, "tokens": corrupted, "pos": pos})


@dataclass
class LogitAttribution:
    """Each component's direct contribution to the logit difference answer - wrong (or the answer's logit) at one
    position, through the final norm with the scale of this run (frozen, as TransformerLens does): heads (L, H);
    attn_bias and mlp (L,) the attention output bias and each MLP; embed and pos_embed (0 where the family has no
    position embedding); rest the final norm's own bias. Their sum is logit_diff, the model's own difference.
    np.asarray(result) is the heads' array."""
    heads: np.ndarray
    attn_bias: np.ndarray
    mlp: np.ndarray
    embed: float
    pos_embed: float
    rest: float
    logit_diff: float
    labels: list           # "L0H0", "L0H1", ... the heads in heads.ravel() order

    def __array__(self, dtype=None, copy=None):
        return self.heads if dtype is None else self.heads.astype(dtype)

    def total(self):
        return float(self.heads.sum() + self.attn_bias.sum() + self.mlp.sum() + self.embed + self.pos_embed
                     + self.rest)


def _unembedding(model, ids):
    """(C, len(ids)) columns of the output head for these token ids (the head has no bias in either family)."""
    from ..lora import LoRALinear
    from ..models.llama import LlamaLM
    if isinstance(model, LlamaLM) and not model.config.tie_word_embeddings:
        head = model.lm_head
        columns = head.weight.numpy()[:, ids]                  # Linear stores (in, out): (C, V)
        if isinstance(head, LoRALinear) and not head.plain:    # an adapter on the head: its update's columns too
            columns = columns + head.scale * head.lora_A.numpy().T @ head.lora_B.numpy()[ids].T
        return columns
    table = model.model.embed_tokens.weight if isinstance(model, LlamaLM) else model.wte.weight
    return F.embedding(np.asarray(ids), table).numpy().T      # rows of the tied (V, C) table, not all of it


def direct_logit_attribution(model, tokens, answer_id, wrong_id=None, pos=-1):
    """How much each head (and the embeddings, each MLP, each attention bias) writes directly into the logit
    difference answer - wrong at position `pos` (wrong None: the answer's logit): each component's output, put
    through the final norm with the scale the run had (cache.apply_ln_to_stack), dotted with the unembedding of
    answer minus wrong; averaged over the rows. Returns a LogitAttribution whose heads are (L, H)."""
    L = n_layers(model)
    tokens = _tokens(model, tokens, "tokens")
    B, T = tokens.shape
    answer = _ids(model, "answer_id", answer_id, B)
    wrong = None if wrong_id is None else _wrong_ids(model, wrong_id, answer)
    pos = _position(pos, T)
    with no_grad(), nn.evaluating():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: not n.startswith("blocks.") or (
            n.endswith((".attn.hook_z", ".hook_attn_out", ".hook_mlp_out")) or n == f"blocks.{L - 1}.hook_resid_post"))
    rows = np.arange(B)
    direction = _unembedding(model, answer) - (0 if wrong is None else _unembedding(model, wrong))   # (C, B)

    def attribute(stack):   # (n, B, T, C) -> (n,): through the final norm, onto the direction, mean over rows
        normed = np.asarray(cache.apply_ln_to_stack(stack))[:, rows, pos]    # (n, B, C)
        return np.einsum("nbc,cb->n", normed, direction) / B

    heads, labels = cache.stack_head_results(return_labels=True)           # (L*H, B, T, C)
    H = len(heads) // L
    attn_out = np.stack([cache[f"blocks.{i}.hook_attn_out"] for i in range(L)])
    bias = attn_out - heads.reshape((L, H) + heads.shape[1:]).sum(1)        # what the heads leave: the output bias
    mlp = np.stack([cache[f"blocks.{i}.hook_mlp_out"] for i in range(L)])
    embeds = [cache[n] if n in cache else np.zeros_like(attn_out[0]) for n in ("hook_embed", "hook_pos_embed")]
    terms = attribute(np.concatenate([heads, bias, mlp, np.stack(embeds)]))
    logit_diff = _logit_diff(_numpy(logits), pos, answer, wrong)
    parts = terms[:L * H].reshape(L, H), terms[L * H:L * H + L], terms[L * H + L:L * H + 2 * L]
    embed, pos_embed = float(terms[-2]), float(terms[-1])
    rest = logit_diff - float(terms.sum())
    return LogitAttribution(parts[0], parts[1], parts[2], embed, pos_embed, rest, logit_diff, list(labels))


def induction_scores(model, seq_len=20, batch=4, seed=0, bos="auto"):
    """Each head's induction score (L, H): the mean attention, over a batch of random token sequences repeated
    once, from each token of the repeat to the token after that token's first occurrence (where an induction head
    looks, to predict that the sequence goes on as it did). The random sequences hold no token twice, so the
    previous occurrence is unique. bos: a token id put first, "auto" the config's bos_token_id (if any), None none."""
    L = n_layers(model)
    vocab, block = model.config.vocab_size, model.config.block_size
    seq_len, batch = integer("seq_len", seq_len, low=2), integer("batch", batch, low=1)
    seed = None if seed is None else integer("seed", seed, low=0)
    if bos == "auto":
        bos = getattr(model.config, "bos_token_id", None)
    prefix = [] if bos is None else [integer("bos", bos, low=0, high=vocab - 1)]
    candidates = np.setdiff1d(np.arange(vocab), prefix)
    if seq_len > len(candidates) or len(prefix) + 2 * seq_len > block:
        raise InputError(f"induction_scores: seq_len must be at most {min(len(candidates), (block - len(prefix)) // 2)}"
                         f" (distinct tokens of a {vocab}-token vocabulary, repeated within block_size {block}), "
                         f"got {seq_len}")
    rng = np.random.default_rng(seed)
    r = np.stack([rng.choice(candidates, seq_len, replace=False) for _ in range(batch)])
    tokens = np.concatenate([np.full((batch, len(prefix)), prefix, dtype=np.int64).reshape(batch, -1), r, r], axis=1)
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(L)]
    with no_grad(), nn.evaluating():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    off = len(prefix)
    queries = off + seq_len + np.arange(seq_len)           # each token of the repeat
    keys = queries - seq_len + 1                            # the token after its first occurrence
    return np.stack([cache[n][:, :, queries, keys].mean(axis=(0, 2)) for n in names]).astype(np.float32)
