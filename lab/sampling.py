"""Sampling the next tokens where the logits are (issue #22): a TokenSampler keeps each row's seen tokens on the
device and draws with Backend.sample_tokens (kernels/sample.wgsl on wgpu), so a decode step reads back one id per
row instead of the vocabulary's logits. The draw's uniform is a hash of (seed, step, row), not numpy's generator:
the same seed gives the same tokens on one backend; sample_rows is the host's equivalent (the numpy backend's)."""

import numpy as np

from .checks import InputError

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
    words with the ids added. The distribution is lab.generate's (float64); the draw inverts its running sum at
    uniforms(seed, step, rows)."""
    from .generate import apply_repetition_penalty, sample_distribution
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


class TokenSampler:
    """Draws the next token of each of `rows` (lists of token ids: each row's text so far, which the repetition
    penalty sees) from logits on the model's backend; each call is one step (the uniform's counter). Arguments
    as lab.generate's (checked there)."""

    def __init__(self, backend, rows, vocab, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 greedy=False, seed=0):
        self.backend, self.vocab, self.step = backend, vocab, 0
        self.args = (float(temperature), top_k, top_p, float(repetition_penalty), bool(greedy), int(seed) & 0xFFFFFFFF)
        self.seen = backend.from_numpy(pack_seen(rows, vocab))
        self.rows = len(rows)

    def __call__(self, logits, logprobs=False, probs=False):
        """The next ids (rows,) int64 for logits (rows, vocab) (a Tensor or the backend's array); with logprobs,
        also each id's log-probability under the distribution drawn from; with probs, also that distribution
        (rows, vocab) float32 (not for greedy)."""
        data = getattr(logits, "data", logits)
        if tuple(data.shape) != (self.rows, self.vocab):
            raise InputError(f"TokenSampler: logits of shape {tuple(data.shape)} for {self.rows} rows of a "
                             f"{self.vocab}-token vocabulary; expected ({self.rows}, {self.vocab})")
        t, k, p, pen, greedy, seed = self.args
        out, dist = self.backend.sample_tokens(data, self.seen, t, k, p, pen, greedy, seed, self.step)
        self.step += 1
        got = self.backend.to_numpy(out)
        bad = np.flatnonzero(got[:, 0] >= self.vocab)
        if bad.size:   # the host's rng.choice refuses such a row too ('probabilities contain NaN')
            raise ValueError(f"sampling: the logits of row {int(bad[0])} hold NaN (or, sampling, only -inf): no token "
                             f"can be drawn from them")
        result = (got[:, 0].astype(np.int64),)
        if logprobs:
            result += (got[:, 1].view(np.float32).copy(),)
        if probs:
            result += (self.backend.to_numpy(dist),)
        return result if len(result) > 1 else result[0]


def device_sampler(model, rows, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, greedy=False,
                   rng=None):
    """A TokenSampler for generation on the model's backend when that samples on the device, else None (the host
    path: numpy's). Also None for a vocabulary of 2^24 or more (the kernel's float32 ids), or a penalty beyond 1e8
    either way: the kernel's float32 scores (logit / penalty /
    temperature, temperature >= 1e-6) would overflow to inf where the host's float64 ones do not, and change the
    distribution. The seed is one draw of `rng`, so a seeded generation repeats."""
    params = model.parameters()
    backend = params[0].backend if params else None
    if backend is None or not backend.device_sampling or not 1e-8 <= repetition_penalty <= 1e8 or \
            model.config.vocab_size >= 1 << 24:
        return None
    seed = int(rng.integers(2 ** 32)) if rng is not None else 0
    return TokenSampler(backend, rows, model.config.vocab_size, temperature, top_k, top_p, repetition_penalty,
                        greedy, seed)
