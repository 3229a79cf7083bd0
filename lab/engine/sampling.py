"""Sampling the next token on the host: the reference for Backend.sample_tokens (its fallback) and for
lab.generate's numpy path. CTRL's repetition penalty, temperature, top-k and top-p as Hugging Face applies them;
the draw's uniform is sample.wgsl's hash of (seed, step, row), so a device and the host draw alike."""

import numpy as np


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty, as Hugging Face applies it: positive logits of seen tokens divided, negative multiplied."""
    if penalty == 1.0 or not len(seen):
        return logits
    idx = np.unique(seen)
    logits = logits.astype(np.float64)  # a copy, wide enough for a penalty of 1e-300 or 1e300
    vals = logits[idx]
    with np.errstate(over="ignore"):  # beyond float64: +-inf, which sample_distribution takes as it means
        logits[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def sample_distribution(logits, temperature=1.0, top_k=None, top_p=None):
    """The probabilities sampling draws from, after temperature, top-k and top-p filtering."""
    with np.errstate(over="ignore"):
        z = logits.astype(np.float64) / temperature
    top = z == np.inf
    if top.any():  # logits past float64 (a tiny repetition penalty): those tokens alone, evenly (inf - inf is NaN)
        z = np.where(top, 0.0, -np.inf)
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # the smallest set whose mass reaches top_p (the tolerance absorbs rounding in the running sum)
        keep = order[: int(np.searchsorted(cum, top_p - 1e-9) + 1)]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


_M = np.uint64(0xFFFFFFFF)


def _pcg(x):
    """dropout_mask.wgsl's pcg on uint32 values (as uint64 arithmetic wrapped to 32 bits)."""
    x = np.asarray(x, dtype=np.uint64) & _M
    s = (x * np.uint64(747796405) + np.uint64(2891336453)) & _M
    w = (((s >> ((s >> np.uint64(28)) + np.uint64(4))) ^ s) * np.uint64(277803737)) & _M
    return (w >> np.uint64(22)) ^ w


def uniforms(seed, step, rows):
    """The uniforms in [0, 1) sample.wgsl draws rows 0..rows-1 with at (seed, step): float32, 24 bits."""
    h = _pcg(_pcg(_pcg(seed) ^ np.uint64(step & 0xFFFFFFFF)) ^ np.arange(rows, dtype=np.uint64))
    return ((h >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / 16777216.0))


def pack_seen(rows, vocab):
    """Each row's token ids as bits: (len(rows), ceil(vocab / 32)) int32, bit j % 32 of word j // 32 for id j."""
    bits = np.zeros((len(rows), -(-vocab // 32) * 32), dtype=bool)
    for r, ids in enumerate(rows):
        bits[r, np.asarray(ids, dtype=np.int64)] = True
    return np.packbits(bits, axis=1, bitorder="little").view("<u4").astype(np.uint32).view(np.int32)


def _seen_ids(words, vocab):
    return np.flatnonzero(np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")[:vocab])


def sample_rows(logits, words, temperature, top_k, top_p, penalty, greedy, seed, step):
    """Backend.sample_tokens on the host: (rows, 2) int32 [id, log p bits], the probabilities drawn from, the seen
    words with the ids added. The distribution is sample_distribution's (float64); the draw inverts its running sum at
    uniforms(seed, step, rows)."""
    rows, n = logits.shape
    words = np.array(words, dtype=np.int32).reshape(rows, -1)
    out = np.zeros((rows, 2), dtype=np.int32)
    probs = np.zeros((rows, n), dtype=np.float32)
    u = uniforms(seed, step, rows)
    for r in range(rows):
        scores = apply_repetition_penalty(logits[r], _seen_ids(words[r], n), penalty)
        if np.isnan(scores).any() or not greedy and (scores == -np.inf).all():
            out[r] = n, 0   # nothing to draw from: the kernel's id n
            continue
        if greedy:
            j = int(np.argmax(scores))
            z = np.asarray(scores, dtype=np.float64)
            with np.errstate(invalid="ignore"):  # (a row of -inf only: NaN, as the kernel's)
                logp = -np.log(np.exp(z - z[j]).sum())
        else:
            p = sample_distribution(scores, temperature, top_k, top_p)
            probs[r] = p
            cdf = np.cumsum(p)
            j = min(int(np.searchsorted(cdf, u[r] * cdf[-1], side="right")), n - 1)
            if p[j] == 0:  # (rounding past the last token with mass)
                j = int(np.flatnonzero(p)[-1])
            logp = np.log(p[j])
        out[r] = j, np.float32(logp).view(np.int32)
        words[r, j // 32] |= np.uint32(1 << (j % 32)).view(np.int32)
    return out, probs, words
