import threading
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer, cosine_lr


@pytest.fixture(scope="module")
def data():
    text = load_corpus()[:100_000]
    tok = CharTokenizer.from_text(text)
    return tok, *train_val_split(tok.encode(text))


def _trainer(data, **kw):
    tok, tr, va = data
    lab.manual_seed(0)
    cfg = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16)
    return Trainer(TransformerLM(cfg), tr, va, TrainConfig(**{"steps": 20, "batch_size": 4, "warmup_steps": 2, **kw}))


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert cosine_lr(0, cfg) == pytest.approx(0.1) and cosine_lr(9, cfg) == pytest.approx(1.0)
    assert cosine_lr(55, cfg) == pytest.approx(0.55) and cosine_lr(100, cfg) == pytest.approx(0.1)
    lrs = [cosine_lr(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_callbacks_get_every_metric(use_backend, data):
    t = _trainer(data, steps=6, log_every=2, eval_every=3)
    records = []
    t.callbacks.append(records.append)
    t.run(progress=False)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert set(r) >= {"step", "loss", "val_loss", "grad_norm", "lr", "tokens_per_s", "elapsed", "eta"}
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert records[-1]["eta"] == 0 and records[-1]["val_loss"] is not None


def test_gradient_accumulation_equals_one_big_batch(use_backend, data):
    """Two micro-batches of 4 give the gradient of the batch of 8 made of the same rows."""
    big, acc = _trainer(data, batch_size=8), _trainer(data, batch_size=4, grad_accum_steps=2)
    big.train_step()
    acc.train_step()
    for (n, a), (_, b) in zip(big.model.named_parameters(), acc.model.named_parameters()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=n)


def test_early_stopping_stops_when_val_loss_stalls(use_backend, data):
    t = _trainer(data, steps=200, lr=1e-9, min_lr=1e-9, eval_every=5, early_stopping_patience=2,
                 early_stopping_min_delta=1.0)
    t.run(progress=False)
    assert t.step_num == 15 and "early stopping" in t.stop_reason


def test_stop_and_pause_from_another_thread(use_backend, data):
    t = _trainer(data, steps=10_000, log_every=1)
    seen = []

    def on_step(record):
        seen.append(record["step"])
        if record["step"] == 3:
            t.pause()
            threading.Timer(0.2, t.resume_training).start()
        if record["step"] == 6:
            t.request_stop()
    t.callbacks.append(on_step)
    t.run(progress=False)
    assert t.step_num == 6 and seen == [1, 2, 3, 4, 5, 6] and t.stop_reason == "stop requested"
    t.train_step()  # still usable after a stop


def test_long_runs_keep_a_bounded_history_with_every_evaluation(numpy_backend, monkeypatch):
    """A panel left training for hours must not grow the kernel's memory without bound: past HISTORY_LIMIT
    records the older half is thinned, evaluation steps kept."""
    import lab.train.trainer as T
    from lab.data import CharTokenizer
    from lab.models import PRESETS, TransformerLM
    from dataclasses import replace
    monkeypatch.setattr(T, "HISTORY_LIMIT", 40)
    text = "In the beginning God created the heaven and the earth.\n" * 20
    ids = CharTokenizer.from_text(text).encode(text)
    with lab.engine.backend.using_backend(numpy_backend):
        lab.manual_seed(0)
        model = TransformerLM(replace(PRESETS["tiny"], vocab_size=int(ids.max()) + 1, block_size=8, n_layer=1,
                                      n_head=2, n_embd=8))
        t = T.Trainer(model, ids, ids, T.TrainConfig(steps=300, batch_size=2, log_every=1, eval_every=25,
                                                    eval_batches=1))
        t.run(progress=False, log_evals=False)
    steps = [r["step"] for r in t.history]
    assert len(steps) <= 41 + 300 // 25 and steps == sorted(steps) and steps[-1] == 300  # limit + evaluations
    assert {s for s in range(25, 301, 25)} <= set(steps)        # every evaluation is still there
    assert steps[-20:] == list(range(281, 301))                  # the recent steps one by one
