import json
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


def test_optimizer_state_mismatch_names_entries(numpy_backend, data, tmp_path):
    """The optimizer state is keyed by parameter name: a checkpoint of other parameters says exactly which differ
    (it used to print the first four positional keys of each side, which looked the same)."""
    from lab import lora
    from lab.checkpoint import CheckpointError, restore_trainer, save_checkpoint
    t = _trainer(data)
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    adapted = _trainer(data)
    lora.apply(adapted.model, r=2, alpha=4, targets=["c_fc"])
    adapted = Trainer(adapted.model, data[1], data[2], adapted.cfg)
    full = [n for n, _ in t.model.named_parameters()]
    missing = sorted(f"{k}.h.0.mlp.c_fc.lora_{ab}" for k in "mv" for ab in "AB")
    unexpected = sorted(f"{k}.{n}" for k in "mv" for n in full)
    with pytest.raises(CheckpointError) as e:
        restore_trainer(adapted, tmp_path / "ck", state)
    assert str(e.value).endswith(f"optimizer.safetensors: the optimizer state does not match this optimizer's "
                                 f"parameters: missing {missing}, unexpected {unexpected}")
    assert adapted.step_num == 0 and adapted.optimizer.step_count == 0   # nothing restored


def test_optimizer_state_of_old_checkpoints_with_positional_keys_still_loads(numpy_backend, data, tmp_path):
    from safetensors.numpy import load_file, save_file
    from lab.checkpoint import save_checkpoint
    t = _trainer(data)
    for _ in range(2):
        t.train_step()
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    path = str(tmp_path / "ck" / "optimizer.safetensors")
    named = load_file(path)
    save_file({f"{k}.{i}": named[f"{k}.{n}"] for i, n in enumerate(t.optimizer.names) for k in "mv"}, path,
              metadata={"format": "pt"})   # the layout before names: m.0, v.0, ... in the optimizer's order
    resumed = Trainer.resume(tmp_path / "ck", data[1], data[2])
    B, own = t.optimizer.backend, resumed.optimizer.state_arrays()
    for name, a in t.optimizer.state_arrays().items():
        np.testing.assert_array_equal(B.to_numpy(own[name]), B.to_numpy(a), err_msg=name)


def test_short_validation_split_refused_before_training(use_backend):
    cfg = replace(PRESETS["tiny"], vocab_size=5, n_layer=1, n_embd=16, n_head=2, block_size=16)
    ids = np.arange(60, dtype=np.int32) % 5
    model = TransformerLM(cfg)
    with pytest.raises(ValueError, match="the validation split is too short for block_size 16: train has 60 tokens, "
                                         "validation 17, each needs at least 18"):
        Trainer(model, ids, ids[:17], TrainConfig(steps=5, batch_size=2))
    with pytest.raises(ValueError, match="the train and validation splits are too short"):
        Trainer(model, ids[:3], ids[:0], TrainConfig(steps=5, batch_size=2))
    Trainer(model, ids, ids[:18], TrainConfig(steps=1, batch_size=2, eval_every=1)).run(progress=False)  # the least


@pytest.mark.parametrize("field,bad", [("steps", 2.9), ("steps", True), ("batch_size", "12"), ("lr", float("inf")),
                                       ("lr", float("nan")), ("lr", 0), ("min_lr", -1e-3), ("warmup_steps", -1),
                                       ("grad_clip", float("inf")), ("max_seconds", float("nan")),
                                       ("betas", (0.9, 1.0)), ("betas", (float("nan"), 0.9)), ("nonfinite", "ignore")])
def test_train_config_refuses_each_bad_field_by_name(field, bad):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig(**{field: bad})


def test_train_config_takes_integral_floats_as_ints():
    cfg = TrainConfig(steps=3.0, batch_size=np.int64(4), betas=[0.9, 0.95])
    assert (cfg.steps, cfg.batch_size, cfg.betas) == (3, 4, (0.9, 0.95)) and type(cfg.steps) is int


def test_reconfigure_refused_changes_nothing(data):
    t = _trainer(data)
    before = dict(vars(t.cfg))
    for values in ({"steps": 10, "lr": float("inf")}, {"batch_size": 10 ** 8}, {"bogus": 1}, {"betas": (0.8, 0.9)}):
        with pytest.raises(ValueError):
            t.reconfigure(**values)
        assert vars(t.cfg) == before and t.optimizer.lr == before["lr"]
    t.reconfigure(steps=30.0, lr=2e-3)
    assert t.cfg.steps == 30 and t.cfg.lr == 2e-3 and t.optimizer.lr == 2e-3


def test_trainer_refuses_each_bad_argument_by_name(numpy_backend):
    """Trainer(model, ids, None) raised a bare TypeError from len(None); each argument is checked and named, as an
    InputError (a ValueError) saying what is allowed."""
    from lab.checks import InputError
    cfg = replace(PRESETS["tiny"], vocab_size=7, n_layer=1, n_embd=16, n_head=2, block_size=8)
    model, ids = TransformerLM(cfg), np.arange(100, dtype=np.int32) % 7
    cases = [((model, ids, None), {}, "^val_ids must be a 1-D sequence of integer token ids.*got None"),
             ((model, None, ids), {}, "^train_ids must be a 1-D sequence"),
             ((model, ids * 0.5, ids), {}, r"^train_ids .*got shape \(100,\), dtype float64"),
             ((model, ids.reshape(10, 10), ids), {}, r"^train_ids .*got shape \(10, 10\)"),
             ((model, ids, "some text"), {}, "^val_ids .*got 'some text'"),
             ((model, ids, [[1, 2], [3]]), {}, "^val_ids .*got"),
             ((model, ids + 1, ids), {}, r"^train_ids holds token ids 1..7, the model's vocabulary is \[0, 7\)"),
             ((None, ids, ids), {}, "^model must be a lab language model"),
             ((model, ids, ids, {"steps": 3}), {}, "^cfg must be a TrainConfig"),
             ((model, ids, ids), {"callbacks": print}, "^callbacks must be a list of functions"),
             ((model, ids, ids), {"callbacks": [1]}, "^callbacks must be a list of functions")]
    for args, kw, message in cases:
        with pytest.raises(InputError, match=message):
            Trainer(*args, **kw)
    t = Trainer(model, list(ids), ids, TrainConfig(steps=1), callbacks=(print,))   # any 1-D sequence of ints
    assert isinstance(t.train_ids, np.ndarray) and t.val_ids is ids and t.callbacks == [print]


def test_last_step_loss_kept_when_no_step_was_logged(use_backend, data):
    """A run that ends before its first log (Ctrl-C, a time limit, steps < log_every) still has its last step's
    loss: the same value a run logging every step records."""
    quiet = _trainer(data, log_every=10, max_seconds=1e-9)   # out of time after step 1, before any log
    assert quiet.last_loss is None
    assert quiet.run(progress=False, log_evals=False) == [] and quiet.step_num == 1
    logged = _trainer(data, log_every=1, max_seconds=1e-9)
    logged.run(progress=False, log_evals=False)
    assert quiet.last_loss == logged.history[-1]["loss"] and np.isfinite(quiet.last_loss)


def test_evaluate_refuses_a_batch_count_that_is_not_a_positive_integer(data):
    """evaluate(-1) returned NaN (a mean of no losses, with a RuntimeWarning), evaluate(2.5) a TypeError."""
    from lab.checks import InputError
    t = _trainer(data)
    for bad in (-1, 0, 2.5, "x"):
        with pytest.raises(InputError, match=f"^batches must be an integer >= 1, got {bad!r}"):
            t.evaluate(bad)
    assert t.evaluate(2.0) == t.evaluate(2) and np.isfinite(t.evaluate())


def test_a_trainer_built_before_lora_apply_says_to_build_a_new_one(data, use_backend):
    """lora.apply after the Trainer was built froze every parameter its optimizer holds and trained new ones it
    does not: the step failed with 'grad_norm: no parameter has a gradient', which says nothing of why."""
    from lab import lora
    t = _trainer(data)
    t.train_step()
    lora.apply(t.model, r=2, alpha=4)
    with pytest.raises(ValueError, match=r"trainable parameters changed after this Trainer was built .* build a new "
                                         r"Trainer"):
        t.train_step()
    assert t.step_num == 1 and t.optimizer.step_count == 1
    assert Trainer(t.model, t.train_ids, t.val_ids, t.cfg).train_step()[0].item() > 0   # as the error says
