"""ProNeuralLM: the feed-forward neural language model baseline (after Bengio et al., 2003), with the context
represented by the average of its token embeddings:

    h_t = mean(E[x_{t-w+1}], ..., E[x_t]),   logits_t = W2 dropout(relu(W1 h_t + b1)) + b2

It sees the same (B, T) batches as TransformerLM and is trained by the same Trainer, so the two can be compared
on one corpus. The causal window average is one matmul with a fixed banded (T, T) matrix.
"""
import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import nn
from ..checks import InputError
from ..engine import ops as F
from ..engine.tensor import tensor
from ..lora import Adapters
from .transformer import check_return_logits


@dataclass
class ProNeuralConfig:
    vocab_size: int = 65
    block_size: int = 64      # positions per training sequence
    context: int = 8          # w: how many previous tokens (the current one included) are averaged
    n_embd: int = 128
    n_hidden: int = 512
    dropout: float = 0.0

    def __post_init__(self):
        if self.context < 1:
            raise InputError(f"context must be >= 1, got {self.context}")

    def to_dict(self):
        return asdict(self)


def window_average_matrix(T, w):
    """A[t, s] = 1 / min(w, t+1) for t-w < s <= t: row t averages the last w positions up to t."""
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    inside = (s <= t) & (s > t - w)
    return (inside / np.minimum(w, t + 1)).astype(np.float32)


class ProNeuralLM(nn.Module, Adapters):
    def __init__(self, cfg):
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # He init for the ReLU layer: with GPT's 0.02 the hidden units start near zero and learn slowly
        self.hidden = nn.Linear(cfg.n_embd, cfg.n_hidden, std=math.sqrt(2.0 / cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.n_hidden, cfg.vocab_size)
        self._avg = {}

    def _average(self, T):
        if T not in self._avg:
            self._avg[T] = tensor(window_average_matrix(T, self.config.context), backend=self.wte.weight.backend)
        return self._avg[T]

    def forward(self, idx, targets=None, return_logits=True):
        """Logits (B, T, vocab); with targets also the mean cross-entropy. return_logits=False (with targets), as
        the transformer families take it: None in the logits' place (this head is small: the loss is composed)."""
        check_return_logits(targets, return_logits)
        T = idx.shape[1]
        if T > self.config.block_size:
            raise InputError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        h = self._average(T) @ self.wte(idx)                          # (T, T) @ (B, T, C) -> (B, T, C)
        logits = self.out(self.drop(self.hidden(h).relu()))           # (B, T, vocab)
        if targets is None:
            return logits
        return logits if return_logits else None, F.cross_entropy(logits, targets)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter plus the window average (2 C per averaged position, x3)."""
        c = self.config
        return 6 * self.num_parameters() + 6 * c.context * c.n_embd
