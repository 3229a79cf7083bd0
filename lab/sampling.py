"""Sampling the next tokens where the logits are (issue #22): a TokenSampler keeps each row's seen tokens on the
device and draws with Backend.sample_tokens (kernels/sample.wgsl on wgpu), so a decode step reads back one id per
row instead of the vocabulary's logits. The draw's uniform is a hash of (seed, step, row), not numpy's generator:
the same seed gives the same tokens on one backend; sample_rows is the host's equivalent (the numpy backend's)."""

import numpy as np

from .checks import InputError
from .engine.sampling import pack_seen, sample_rows, uniforms  # noqa: F401  (lab.sampling's API)

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
        out, dist = self.record(data)
        got = self.backend.to_numpy(out)
        result = (self.ids(got),)
        if logprobs:
            result += (got[:, 1].view(np.float32).copy(),)
        if probs:
            result += (self.backend.to_numpy(dist),)
        return result if len(result) > 1 else result[0]

    def record(self, data, feed=None, ring=None):
        """This step's draw from logits `data` (the backend's (rows, vocab) array) recorded, nothing read back:
        (out, probs) as Backend.sample_tokens, which also puts the ids into feed and ring when given."""
        t, k, p, pen, greedy, seed = self.args
        # the step enters the kernel's params as is: a replayed decode step patches it as linear in the position
        out, dist = self.backend.sample_tokens(data, self.seen, t, k, p, pen, greedy, seed, self.step, feed, ring)
        self.step += 1
        return out, dist

    def ids(self, got):
        """The ids (int64) of results [id, log p bits] (..., 2) read back."""
        bad = np.argwhere(got[..., 0] >= self.vocab)
        if bad.size:
            raise undrawable(int(bad[0][-1]))
        return got[..., 0].astype(np.int64)


def undrawable(row):
    """The error for a row whose logits no token can be drawn from, the device's and the host's alike (the host's
    argmax took a NaN's index and went on, numpy's rng.choice said only 'probabilities contain NaN')."""
    return ValueError(f"sampling: the logits of row {row} hold NaN (or, sampling, only -inf): no token can be drawn "
                      f"from them")


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
