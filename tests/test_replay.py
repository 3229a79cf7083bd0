"""Step replay on the wgpu backend (lab/train/replay.py): replayed steps compute exactly what eager steps compute,
and every change a replay cannot follow sends the step back to eager."""
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.data import CharTokenizer
from lab.engine.backend import using_backend
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 40


def _trainer(replay, dropout=0.0, accum=1, seed=0, model=None, **cfg):
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    lab.manual_seed(seed)
    shape = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **(model or {})}
    model = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, dropout=dropout, **shape))
    cfg = {"steps": 50, "batch_size": 4, "warmup_steps": 2, **cfg}
    t = Trainer(model, ids, ids, TrainConfig(grad_accum_steps=accum, replay_steps=replay, **cfg))
    t.tokenizer = tok
    return t


def _steps(t, n, between=None):
    out = []
    for i in range(n):
        if between:
            between(t, i)
        loss, norm = t.train_step()
        out.append((loss.item(), norm.item()))
    return out


def _weights(t):
    return {k: v.numpy() for k, v in t.model.named_parameters()}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


FUSED = {"block_size": 32, "n_layer": 1, "n_head": 1, "n_embd": 64}  # heads of 64: attention.wgsl's kernels


@pytest.mark.parametrize("dropout,accum,native,model", [(0.0, 1, True, None), (0.2, 1, True, None),
                                                        (0.1, 2, True, None), (0.2, 1, False, None),
                                                        (0.2, 1, True, FUSED)],
                         ids=["plain", "dropout", "accumulation", "through-the-python-wrappers",
                              "fused-attention-dropout"])
def test_replayed_steps_equal_eager_steps_bit_for_bit(wgpu_backend, dropout, accum, native, model, monkeypatch):
    monkeypatch.setattr(wgpu_backend, "NATIVE_REPLAY", native)
    if model:
        monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
        assert wgpu_backend.flash_attention_fits((4, 32, 192), 1)
    with using_backend(wgpu_backend):
        eager = _trainer(False, dropout, accum, model=model)  # each trainer re-seeds lab's generator (dropout seeds)
        losses = _steps(eager, 8)
        replayed = _trainer(True, dropout, accum, model=model)
        assert _steps(replayed, 8) == losses
        assert _same(_weights(eager), _weights(replayed))
        assert replayed.replay.replayed == 6 and replayed.replay.off is None   # two captures, then replays
        assert eager.replay.replayed == 0
        # the grads the parameters hold after a replay are that step's, as after an eager step
        for p, q in zip(eager.optimizer.params, replayed.optimizer.params):
            np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())


@pytest.mark.parametrize("dropout,adapters,kv,flash", [(0.0, False, 1, False), (0.2, False, 2, False),
                                                        (0.1, True, 2, False), (0.2, True, 2, True)],
                         ids=["multi-query", "gqa-dropout", "gqa-lora-dropout", "gqa-fused-attention-lora-dropout"])
def test_replayed_llama_steps_equal_eager_steps_bit_for_bit(wgpu_backend, dropout, adapters, kv, flash, monkeypatch):
    """The Llama family's step (fused RMSNorm with the residual, SwiGLU, rotary reading its tables at an offset,
    key-value heads shared by query heads, attention dropout, LoRA adapters; the fused attention's kernels with
    their dropout seeds) replays exactly as it runs eagerly."""
    from lab import lora
    from lab.models import LlamaConfig, LlamaLM
    if flash:
        monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)

    def trainer(replay):
        tok = CharTokenizer.from_text(TEXT)
        lab.manual_seed(0)
        model = LlamaLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=40,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv,
                                    max_position_embeddings=16, dropout=dropout))
        if adapters:
            lora.apply(model, r=2, alpha=4, targets=["q_proj", "v_proj", "gate_proj"])
        ids = tok.encode(TEXT)
        return Trainer(model, ids, ids, TrainConfig(steps=50, batch_size=3, warmup_steps=2, replay_steps=replay))

    with using_backend(wgpu_backend):
        eager = trainer(False)
        losses = _steps(eager, 7)
        replayed = trainer(True)
        assert _steps(replayed, 7) == losses
        assert _same(_weights(eager), _weights(replayed))
        assert replayed.replay.replayed >= 4 and replayed.replay.off is None
        for p, q in zip(eager.optimizer.params, replayed.optimizer.params):
            np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())


def test_run_with_evaluations_and_callbacks_equals_eager(wgpu_backend, tmp_path):
    with using_backend(wgpu_backend):
        runs = []
        for replay in (False, True):
            t = _trainer(replay, 0.1, eval_every=4, eval_batches=2, log_every=1, steps=13)
            history = t.run(progress=False, log_evals=False)
            runs.append(([(r["step"], r["loss"], r["val_loss"], r["grad_norm"]) for r in history], _weights(t), t))
        assert runs[0][0] == runs[1][0]
        assert _same(runs[0][1], runs[1][1])
        assert runs[1][2].replay.replayed >= 7  # evaluations give the buffers back: one capture after each


def _dropout_to(p):
    def edit(t, i):
        if i == 4:
            for m in t.model.modules():
                if type(m).__name__ == "Dropout":
                    m.p = p
    return edit


def _patch_forward(t, i):
    if i == 4:
        mlp = t.model.h[1].mlp
        forward = mlp.forward
        object.__setattr__(mlp, "forward", lambda x: forward(x) * 0.5)


@pytest.mark.parametrize("edit", [_dropout_to(0.3), _patch_forward], ids=["dropout-rate", "patched-forward"])
def test_model_edits_between_steps_are_not_replayed_stale(wgpu_backend, edit):
    with using_backend(wgpu_backend):
        eager = _trainer(False, 0.1)
        losses = _steps(eager, 9, edit)
        replayed = _trainer(True, 0.1)
        assert _steps(replayed, 9, edit) == losses
        assert _same(_weights(eager), _weights(replayed))
        assert replayed.replay.replayed >= 3


def test_new_parameter_arrays_are_picked_up(wgpu_backend, tmp_path):
    """Loading weights replaces the parameters' arrays: the capture bound the old ones and must not be replayed."""
    with using_backend(wgpu_backend):
        donor = _trainer(False, seed=5)
        _steps(donor, 3)
        donor.model.save_pretrained(tmp_path / "donor")
        saved = TransformerLM.from_pretrained(tmp_path / "donor")

        def load(t, i):
            if i == 4:
                for (_, p), (_, q) in zip(t.model.named_parameters(), saved.named_parameters()):
                    p.data = p.backend.from_numpy(q.numpy())
        eager = _trainer(False)
        losses = _steps(eager, 8, load)
        replayed = _trainer(True)
        assert _steps(replayed, 8, load) == losses
        assert _same(_weights(eager), _weights(replayed))


def test_profiling_runs_the_step_eagerly(wgpu_backend):
    with using_backend(wgpu_backend):
        t = _trainer(True)
        _steps(t, 3)
        assert t.replay.ready is not None
        with lab.profile() as prof:
            t.train_step()
        assert any(name.startswith("matmul") for name, _, _ in prof.records)
        assert t.replay.replayed == 1


def test_buffers_come_back_when_the_trainer_goes(wgpu_backend):
    import gc
    with using_backend(wgpu_backend):
        wgpu_backend.sync()
        gc.collect()
        before = wgpu_backend.stats()["bytes_in_use"]
        t = _trainer(True)
        _steps(t, 4)
        assert t.replay.ready is not None and wgpu_backend._held
        del t
        gc.collect()
        assert wgpu_backend.stats()["bytes_in_use"] == before
        assert not wgpu_backend._reserved


def test_a_capture_that_reads_back_cannot_be_replayed(wgpu_backend):
    x = wgpu_backend.from_numpy(np.ones(8, np.float32))
    wgpu_backend.capture_begin()
    y = wgpu_backend.scalar("mul", x, 2.0)
    wgpu_backend.to_numpy(y)
    capture = wgpu_backend.capture_end()
    assert capture.broken and "reads a value back" in capture.broken
    with pytest.raises(RuntimeError, match="cannot be replayed"):
        wgpu_backend.replay(capture, {})
    wgpu_backend.release_capture(capture)


def test_difference_names_a_changed_param(wgpu_backend):
    x = wgpu_backend.from_numpy(np.ones(8, np.float32))
    captures = []
    for c in (2.0, 3.0):
        wgpu_backend.capture_begin()
        wgpu_backend.scalar("mul", x, c)
        captures.append(wgpu_backend.capture_end())
    assert "params of dispatch 0" in captures[0].difference(captures[1], {})
    assert captures[0].difference(captures[0], {}) is None
    for c in captures:
        wgpu_backend.release_capture(c)


def test_numpy_backend_has_no_replay(numpy_backend):
    with using_backend(numpy_backend):
        t = _trainer(True)
        _steps(t, 3)
        assert t.replay is None


def test_turning_replay_off_gives_the_buffers_back(wgpu_backend):
    with using_backend(wgpu_backend):
        t = _trainer(True)
        _steps(t, 3)
        assert t.replay.ready is not None
        t.cfg.replay_steps = False
        _steps(t, 1)
        assert t.replay.ready is None and t.replay.replayed == 1


def test_a_replayed_step_follows_a_threads_adapter_switch(use_backend):
    """lora.adapter_enabled(model, False) switches adapters in the calling thread, leaving each module's stored
    `_enabled` as it was: replay's signature read the stored value and replayed the captured step with adapters
    on, so the steps inside the switch trained the wrong function (trainable norms beside the adapters), without
    a word. Replay on gives the eager losses and weights."""
    from lab import lora
    runs = []
    for replay in (False, True):
        t = _trainer(replay, dropout=0.1)
        lora.apply(t.model, r=2, alpha=4, dropout=0.1, targets="all-linear")
        for name, p in t.model.named_parameters():
            p.requires_grad = p.requires_grad or name.endswith("ln_1.weight")
        t = Trainer(t.model, t.train_ids, t.val_ids, t.cfg)
        losses = _steps(t, 3)
        with lora.adapter_enabled(t.model, False):
            losses += _steps(t, 3)
        runs.append((losses + _steps(t, 2), _weights(t)))
    assert runs[1][0] == runs[0][0]
    assert _same(runs[1][1], runs[0][1])


def test_a_capture_keeps_no_array_alive_beyond_the_buffers_it_binds(wgpu_backend):
    """A capture keeps its patches (how a replay's params follow the step) as long as it lives. dropout's patch
    held its input array, AdamW's and SGD's their weight: each captured step kept every dropout input alive through
    the next step, checkpointed blocks' included (a quarter of a shakespeare-char step's peak). The buffers stay
    held for replays either way; the arrays, and with them the memory of their storage, must go."""
    import weakref
    B = wgpu_backend
    x, p, g, m, v, q, gq, buf = (B.from_numpy(np.ones((4, 8), np.float32)) for _ in range(8))
    B.capture_begin()
    try:
        y = B.dropout(x, 0.5, 7)
        B.adamw_(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
        B.sgd_(q, gq, buf, 0.1, 0.9, 0.0)
    finally:
        capture = B.capture_end()
    try:
        assert len(capture.patches) == 3
        storages = [weakref.ref(a.storage) for a in (x, y, p, g, m, v, q, gq, buf)]
        del x, y, p, g, m, v, q, gq, buf
        assert [s() for s in storages] == [None] * len(storages)
    finally:
        B.release_capture(capture)


def test_a_reference_capture_keeps_none_of_its_steps_gradients(wgpu_backend):
    """The first capture is kept as the reference the next one is compared with, never replayed: it held its
    step's gradients (and loss and norm), so the second capture's peak, where every buffer its step bound is
    counted in use, carried a copy of every gradient beside its own."""
    import weakref
    with using_backend(wgpu_backend):
        t = _trainer(True, dropout=0.1)
        _steps(t, 1)
        assert t.replay.reference is not None and t.replay.ready is None
        grads = [weakref.ref(p.grad.data.storage) for p in t.optimizer.params]
        t.optimizer.zero_grad()
        assert [g() for g in grads] == [None] * len(grads)
        losses = _steps(t, 4)   # the reference still leads to a ready capture, replayed as before
        assert t.replay.replayed == 3 and losses == _steps(_trainer(False, dropout=0.1), 5)[1:]


def test_a_suspended_capture_keeps_none_of_its_steps_gradients(wgpu_backend):
    """An evaluation (or replay turned off) suspends the ready capture: its buffers went back, but it stayed the
    reference with its step's gradients, loss and norm, so the capture after every evaluation carried a copy of every
    gradient at its peak (what e7b8696 fixed for the first reference only). Replays resume as before."""
    import weakref
    with using_backend(wgpu_backend):
        t = _trainer(True, dropout=0.1)
        losses = _steps(t, 3)
        assert t.replay.ready is not None and t.replay.replayed == 1
        t.replay.suspend()   # as Trainer.run does before an evaluation
        assert t.replay.reference is not None
        grads = [weakref.ref(p.grad.data.storage) for p in t.optimizer.params]
        t.optimizer.zero_grad()
        assert [g() for g in grads] == [None] * len(grads)
        losses += _steps(t, 3)   # captured again, matched with the reference, replayed
        assert t.replay.replayed == 3 and losses == _steps(_trainer(False, dropout=0.1), 6)
