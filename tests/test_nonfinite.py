"""NaN / Inf in a training step: skipped on the device, detected within the step by run(), reported with the step
and the first tensor where it appeared; the last good checkpoint is kept."""
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.checkpoint import load_checkpoint
from lab.data import CharTokenizer
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer
from lab.train.faults import NonFiniteError
from lab.train.optim import AdamW, SGD

TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n" * 30


def _trainer(cfg, seed=0):
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    lab.manual_seed(seed)
    model = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2,
                                  n_embd=16))
    t = Trainer(model, ids, ids, cfg)
    t.tokenizer = tok
    return t


def _weights(model):
    return {k: v.numpy().copy() for k, v in model.named_parameters()}


def _poison_block(model, i):
    """Make block i's MLP output NaN from now on (as an overflow inside it would)."""
    mlp = model.h[i].mlp
    forward = mlp.forward
    object.__setattr__(mlp, "forward", lambda x: forward(x) * float("nan"))


@pytest.mark.parametrize("opt_cls", [AdamW, SGD])
def test_nonfinite_gradient_norm_skips_the_update_on_the_device(use_backend, opt_cls):
    p = lab.tensor(np.ones((3, 4), np.float32), requires_grad=True)
    opt = opt_cls([p], lr=0.1)
    p.grad = lab.tensor(np.full((3, 4), 0.5, np.float32))
    for bad in (float("nan"), float("inf")):
        opt.step(guard=lab.tensor(np.array([bad], np.float32)))
        np.testing.assert_array_equal(p.numpy(), 1.0)
        assert all((opt.backend.to_numpy(a) == 0).all() for a in opt.state_arrays().values())
    opt.step(guard=lab.tensor(np.array([0.5], np.float32)))  # a finite norm updates as usual
    assert (p.numpy() < 1.0).all()


def test_run_stops_at_the_bad_step_naming_it_and_keeps_the_weights(use_backend):
    t = _trainer(TrainConfig(steps=6, batch_size=4, eval_every=100, log_every=1))
    t.train_step()
    t.train_step()
    before = _weights(t.model)
    _poison_block(t.model, 1)
    t.run(progress=False, log_evals=False)
    assert isinstance(t.fault, NonFiniteError) and t.fault.step == 3
    assert "step 3" in t.stop_reason and "block 1's output" in t.stop_reason
    assert t.step_num == 3
    after = _weights(t.model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_a_nonfinite_weight_is_named(use_backend):
    t = _trainer(TrainConfig(steps=3, batch_size=4, eval_every=100))
    w = t.model.h[0].attn.c_attn.weight
    bad = w.numpy()
    bad[0, 0] = np.inf
    w.data = w.backend.from_numpy(bad)
    with pytest.raises(NonFiniteError, match=r"step 1: .*parameter 'h.0.attn.c_attn.weight'"):
        t.check_finite(*t.train_step())


def test_skip_policy_skips_bad_steps_and_goes_on(use_backend):
    t = _trainer(TrainConfig(steps=5, batch_size=4, eval_every=100, log_every=1, nonfinite="skip"))
    t.train_step()
    before = _weights(t.model)
    _poison_block(t.model, 0)
    t.run(progress=False, log_evals=False)
    assert t.step_num == 5 and t.fault is None
    assert [s for s, _ in t.skipped_steps] == [2, 3, 4, 5]
    assert "block 0's output" in t.skipped_steps[0][1]
    for k, v in _weights(t.model).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_last_good_checkpoint_is_kept(use_backend, tmp_path):
    ck = tmp_path / "ck"
    t = _trainer(TrainConfig(steps=8, batch_size=4, eval_every=100, log_every=1, checkpoint_dir=str(ck),
                             checkpoint_every=1))
    calls = []

    def poison_after_two(record):
        calls.append(record["step"])
        if record["step"] == 2:
            _poison_block(t.model, 1)
    t.callbacks.append(poison_after_two)
    t.run(progress=False, log_evals=False)
    assert t.fault is not None and t.fault.step == 3
    model, _, state = load_checkpoint(ck)
    assert state["step"] == 2  # the checkpoint of the last good step, not overwritten by the bad one
    for k, v in _weights(model).items():
        np.testing.assert_array_equal(v, _weights(t.model)[k], err_msg=k)
