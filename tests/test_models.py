from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, ProNeuralConfig, ProNeuralLM, TransformerLM
from lab.models.proneural import window_average_matrix
from lab.train import TrainConfig, Trainer


def test_transformer_parameter_count_and_flops_match_the_formulas(use_backend):
    c = replace(PRESETS["tiny"], vocab_size=65)
    m = TransformerLM(c)
    L, C, V, T = c.n_layer, c.n_embd, c.vocab_size, c.block_size
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert m.num_parameters() == V * C + T * C + L * per_block + 2 * C
    assert m.flops_per_token() == 6 * m.num_parameters() + 12 * L * C * T


def test_forward_returns_attention_and_hidden_states(use_backend):
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=20, n_layer=2, n_embd=16, n_head=2, block_size=8)).eval()
    idx = np.random.default_rng(0).integers(0, 20, (3, 8))
    logits, loss, att, hidden = m(idx, idx, return_attention=True, return_hidden=True)
    assert logits.shape == (3, 8, 20) and loss.shape == ()
    assert [a.shape for a in att] == [(3, 2, 8, 8)] * 2 and len(hidden) == 3
    a = att[0].numpy()
    np.testing.assert_allclose(a.sum(-1), 1, rtol=1e-5)
    assert np.allclose(np.triu(a, 1), 0), "causal: no weight on future positions"
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        m(np.zeros((1, 9), dtype=np.int32))


def test_window_average_matrix():
    A = window_average_matrix(5, 2)
    np.testing.assert_allclose(A[0], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(A[3], [0, 0, 0.5, 0.5, 0])
    np.testing.assert_allclose(A.sum(1), 1)


def test_proneural_predicts_from_the_window_average(use_backend):
    cfg = ProNeuralConfig(vocab_size=11, block_size=6, context=3, n_embd=4, n_hidden=5)
    m = ProNeuralLM(cfg).eval()
    idx = np.random.default_rng(0).integers(0, 11, (2, 6))
    E = m.wte.weight.numpy()
    W1, b1, W2, b2 = (t.numpy() for t in (m.hidden.weight, m.hidden.bias, m.out.weight, m.out.bias))
    t = 4
    h = E[idx[1, t - 2:t + 1]].mean(0)
    expected = np.maximum(h @ W1 + b1, 0) @ W2 + b2
    np.testing.assert_allclose(m(idx).numpy()[1, t], expected, rtol=1e-5, atol=1e-6)
    assert m.flops_per_token() > 6 * m.num_parameters()


def test_both_architectures_learn_with_the_same_trainer(use_backend):
    text = load_corpus()[:50_000]
    tok = CharTokenizer.from_text(text)
    tr, va = train_val_split(tok.encode(text))
    models = [TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16)),
              ProNeuralLM(ProNeuralConfig(vocab_size=tok.vocab_size, block_size=16, n_embd=32, n_hidden=64))]
    for m in models:
        lab.manual_seed(0)
        t = Trainer(m, tr, va, TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=4, eval_every=40, log_every=40))
        before = t.evaluate(2)
        t.run(progress=False)
        assert t.evaluate(2) < before - 0.5, type(m).__name__


def test_a_layer_shared_by_two_attributes_is_one_parameter_stepped_once(use_backend):
    """A Module reaching one Linear by two attributes listed its weight twice: an optimizer built from
    model.parameters() applied each step's update twice (SGD moved it 2 lr g) and num_parameters counted it twice.
    Each tensor is listed once under its first name, as PyTorch's named_parameters does."""
    from lab import nn
    from lab.train import SGD

    class Shared(nn.Module):
        def __init__(self):
            self.a = nn.Linear(2, 3, bias=False)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x)[:, :2])

    m = Shared()
    assert [n for n, _ in m.named_parameters()] == ["a.weight"] and m.num_parameters() == 6
    assert list(m.state_dict()) == ["a.weight"]
    before = m.a.weight.numpy()
    opt = SGD(m.parameters(), lr=0.1)
    m(lab.tensor(np.ones((1, 2), np.float32))).sum().backward()
    g = m.a.weight.grad.numpy()
    opt.step()
    np.testing.assert_allclose(m.a.weight.numpy(), before - 0.1 * g, rtol=1e-6, atol=1e-7)
