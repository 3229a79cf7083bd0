"""Live diagnostics on problems whose answers are known in closed form."""
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.diagnostics.live import (DiagnosticsMonitor, edge_of_stability_threshold, efficiency_products, fisher_trace,
                                  flat_region, gradient_noise_scale, recommend, sharpness)


def _spd(n, eigs, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (q * eigs) @ q.T


def _quadratic(A):
    """loss(x) = 0.5 x^T A x with x a lab parameter (1, n)."""
    x = lab.tensor(np.random.default_rng(1).standard_normal((1, A.shape[0])), requires_grad=True)
    At = lab.tensor(A)
    return x, lambda: ((x @ At) * x).sum() * 0.5


def test_sharpness_of_a_quadratic_is_its_top_eigenvalue(use_backend):
    A = _spd(12, np.array([10.0, 4, 3, 2, 1, 1, 0.5, 0.5, 0.2, 0.1, 0.1, 0.05]))
    x, loss = _quadratic(A)
    assert sharpness(loss, [x], iters=40) == pytest.approx(10.0, rel=0.01)


def test_preconditioned_sharpness_matches_the_scaled_hessian(use_backend):
    A = _spd(8, np.array([6.0, 3, 2, 1, 1, 0.5, 0.2, 0.1]), seed=3)
    d = np.random.default_rng(4).uniform(0.5, 3.0, 8)
    expected = np.linalg.eigvalsh(A / np.sqrt(np.outer(d, d))).max()
    x, loss = _quadratic(A)
    assert sharpness(loss, [x], iters=60, preconditioner=[d.reshape(1, 8)]) == pytest.approx(expected, rel=0.01)


def test_edge_of_stability_thresholds():
    assert edge_of_stability_threshold(0.01, "sgd") == pytest.approx(200)
    assert edge_of_stability_threshold(0.01, "adam", 0.9) == pytest.approx(3800)  # 38 / lr


def test_fisher_trace_of_logistic_regression_has_its_closed_form(use_backend):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 5)), rng.choice([-1.0, 1.0], 20)
    w0 = rng.standard_normal((5, 1)) * 0.5
    w = lab.tensor(w0, requires_grad=True)

    def example_loss(i):  # log(1 + exp(-y x.w))
        z = lab.tensor(X[i:i + 1] * -y[i]) @ w
        return (z.exp() + 1.0).log().sum()
    got = fisher_trace(example_loss, 20, [w])
    margin = -y * (X @ w0)[:, 0]
    sig = 1 / (1 + np.exp(-margin))
    expected = np.mean(sig ** 2 * (X ** 2).sum(1))  # |d/dw|^2 = sigmoid(-y x.w)^2 |x|^2
    assert got["total"] == pytest.approx(expected, rel=1e-4)
    assert got["groups"]["all"] == pytest.approx(expected, rel=1e-4)


def test_noise_scale_recovers_a_known_covariance():
    rng = np.random.default_rng(0)
    G = rng.standard_normal(40) * 0.3
    sigma2 = rng.uniform(0.5, 2.0, 40)  # per-example gradient variance per coordinate
    expected = sigma2.sum() / (G ** 2).sum()

    def batch_grad(b):  # the mean of b per-example gradients G + noise
        return G + rng.standard_normal((b, 40)).mean(0) * np.sqrt(sigma2)
    got = gradient_noise_scale(batch_grad, 4, 64, repeats=4000)
    assert got["b_simple"] == pytest.approx(expected, rel=0.1)
    assert got["trace_sigma"] == pytest.approx(sigma2.sum(), rel=0.1)


def test_efficiency_product_and_flat_region():
    rng = np.random.default_rng(0)
    snaps = {"g": rng.standard_normal((4000, 3)) * 0.1}  # variance 0.01
    eff = efficiency_products(snaps, {"g": np.full(3, 2.0)}, n=50)
    assert eff["g"] == pytest.approx(50 * 0.01 * 2.0, rel=0.05)
    assert flat_region([2.0] * 10)[0] and not flat_region(np.linspace(3, 2, 10))[0]


def test_recommendations_follow_the_numbers():
    text = recommend({"sharpness": 5000.0, "threshold": 3800.0, "lr": 0.01, "noise_scale": 400.0, "batch_size": 12,
                      "efficiency": {"a": 0.5, "b": 0.6}, "edge_band_pct": 0, "flat": True, "loss_slope": 1e-5})
    assert "lower the learning rate" in text and "5e+03" in text and "larger batch" in text
    assert "under-efficient" in text and "flat" in text
    calm = recommend({"sharpness": 10.0, "threshold": 3800.0, "lr": 0.01, "noise_scale": 12.0, "batch_size": 12})
    assert "well below the threshold" in calm and "good choice" in calm


def test_monitor_reports_during_training(use_backend):
    from lab.data import CharTokenizer, load_corpus, train_val_split
    from lab.models import PRESETS, TransformerLM
    from lab.train import TrainConfig, Trainer
    text = load_corpus()[:50_000]
    tok = CharTokenizer.from_text(text)
    tr, va = train_val_split(tok.encode(text))
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=8))
    t = Trainer(m, tr, va, TrainConfig(steps=40, batch_size=8, log_every=5, eval_every=40))
    mon = DiagnosticsMonitor(t, every=40, snapshot_every=5, power_iters=3)
    t.run(progress=False)
    (r,) = mon.reports
    assert r["step"] == 40 and r["sharpness"] > 0 and r["fisher_trace"] > 0
    assert set(r["efficiency"]) == {"embeddings", "attention", "mlp", "norms"}
    assert r["threshold"] == pytest.approx(edge_of_stability_threshold(r["lr"], "adam"))
    assert len(r["recommendation"]) > 40 and mon.seconds > 0


def test_the_monitor_takes_its_losses_without_the_whole_logits(use_backend, monkeypatch):
    """The monitor's sharpness, Fisher trace and noise scale took model(x, y)[1]: the whole (B, T, vocab) logits and
    their gradient, which the trainer's step no longer makes (F.linear_cross_entropy), so a run that fits only
    without them ran out of memory at its first report. Any call for the whole head's output fails here."""
    from lab.models import TransformerLM
    from lab.models.transformer import TransformerConfig
    from lab.train import TrainConfig, Trainer
    lab.manual_seed(0)
    m = TransformerLM(TransformerConfig(vocab_size=67, block_size=8, n_layer=1, n_head=2, n_embd=16))
    ids = np.random.default_rng(0).integers(0, 67, 2000)
    t = Trainer(m, ids[:1500], ids[1500:], TrainConfig(steps=2, batch_size=4, block_size=8))
    mon = DiagnosticsMonitor(t, every=1000, power_iters=2, fisher_examples=2)
    t.train_step()

    def whole(self, h):
        raise AssertionError("the whole (B, T, vocab) logits were asked for")
    monkeypatch.setattr(TransformerLM, "_head", whole)
    r = mon.run(1)
    assert np.isfinite(r["sharpness"]) and r["fisher_trace"] > 0


@pytest.mark.parametrize("tied", [True, False])
def test_monitor_groups_llama_parameters_by_their_role(use_backend, tied):
    """A Llama model's attention, norms and embeddings all fell into "other" (only ".attn." / "ln_" / "wte" were
    recognised): its Fisher traces and efficiency products were reported per group under the wrong names."""
    from lab.models import LlamaConfig, LlamaLM
    from lab.train import TrainConfig, Trainer
    lab.manual_seed(0)
    m = LlamaLM(LlamaConfig(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                            tie_word_embeddings=tied))
    ids = np.random.default_rng(0).integers(0, 29, 600)
    t = Trainer(m, ids[:500], ids[500:], TrainConfig(steps=2, batch_size=4, block_size=8))
    mon = DiagnosticsMonitor(t, every=1000, power_iters=1, fisher_examples=1)
    names = {id(p): n for n, p in m.named_parameters()}
    grouped = {g: sorted(names[id(p)] for p in ps) for g, ps in mon.groups.items()}
    assert set(grouped) == {"embeddings", "attention", "mlp", "norms"}
    assert grouped["embeddings"] == ([] if tied else ["lm_head.weight"]) + ["model.embed_tokens.weight"]
    assert grouped["norms"] == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                                "model.norm.weight"]
    assert all(".self_attn." in n for n in grouped["attention"]) and len(grouped["attention"]) == 4
    assert sum(map(len, grouped.values())) == len(list(m.parameters()))
    t.train_step()
    assert set(mon.run(1)["fisher_groups"]) == set(grouped)
