"""Sampling on the device (kernels/sample.wgsl): a decode step's next tokens drawn from the logits where they
are, so that only the ids (and their log-probabilities) are read back."""
from .common import _f32bits, _grid, _row_subs


class SamplingOps:
    """WgpuBackend's sample_tokens (see Backend.sample_tokens)."""
    device_sampling = True

    def sample_tokens(self, logits, seen, temperature, top_k, top_p, penalty, greedy, seed, step, feed=None,
                      ring=None):
        rows, n = logits.shape
        if n >= 1 << 24:   # (the kernel counts and finds ids through float32, exact below 2^24)
            raise ValueError(f"sample_tokens: a vocabulary of {n} tokens; the device samples fewer than {1 << 24}")
        out = self._alloc((rows, 2), "int32")
        probs = self._alloc((rows, n), "float32")
        # (a top_p within 1e-9 of 0 keeps the top token, as the host's: its target stays above 0, which means none)
        # the step enters the params as is: a replayed decode step patches it as linear in the position
        params = [rows, n, int(greedy), n if top_k is None else min(int(top_k), n),
                  0 if top_p is None or top_p >= 1.0 else _f32bits(max(top_p - 1e-9, 1e-30)), _f32bits(temperature),
                  _f32bits(penalty), seed, step, 0 if ring is None else ring.shape[0]]
        self._dispatch("sample", "sample_main", params, [logits, seen, probs, out, feed, ring], _grid(rows),
                       rows * n, _row_subs(n))
        return out, probs
