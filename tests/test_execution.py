"""The wgpu execution model: recorded dispatches, one submit per training step, no readback unless asked,
pooled buffers reused from step to step."""
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer


def _tiny_trainer(backend_state, batch_size=2):
    lab.manual_seed(0)
    text = load_corpus()
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(tok.encode(text))
    cfg = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16)
    return Trainer(TransformerLM(cfg), train_ids, val_ids, TrainConfig(steps=10, batch_size=batch_size))


def test_training_step_is_one_submit_without_readback(wgpu_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", wgpu_backend)
    trainer = _tiny_trainer(wgpu_backend)
    # as in a training loop, each step runs while the previous step's results are still held
    loss, _ = trainer.train_step()
    lab.sync()
    before = wgpu_backend.stats()
    loss, _ = trainer.train_step()
    lab.sync()
    after = wgpu_backend.stats()
    assert after["submits"] - before["submits"] == 1
    assert after["readbacks"] == before["readbacks"]
    assert after["dispatches"] - before["dispatches"] > 50
    reserved = after["bytes_reserved"]
    loss, _ = trainer.train_step()
    lab.sync()
    assert wgpu_backend.stats()["bytes_reserved"] == reserved, "a repeated step must reuse pooled buffers"
    loss.item()
    assert wgpu_backend.stats()["readbacks"] == after["readbacks"] + 1


def test_buffers_freed_by_garbage_collection_are_reused_safely(wgpu_backend):
    """A tensor dropped inside a reference cycle is finalized by the garbage collector together with its
    buffer; the pool must never hand out a buffer that wgpu has released."""
    import gc
    gc.disable()
    try:
        for _ in range(20):
            x = lab.tensor(np.ones(1000, dtype=np.float32), backend=wgpu_backend)
            holder = [x]
            holder.append(holder)
            del x, holder
        gc.collect()
    finally:
        gc.enable()
    assert all(b._internal is not None for bs in wgpu_backend._pool.values() for b in bs)
    y = lab.tensor(np.ones(1000, dtype=np.float32), backend=wgpu_backend)
    np.testing.assert_array_equal((y * 2.0).numpy(), 2.0)


def test_nothing_is_submitted_until_a_sync_point(wgpu_backend):
    x = lab.tensor(np.ones(10), backend=wgpu_backend)
    lab.sync()
    s0 = wgpu_backend.stats()
    y = (x * 2.0 + 1.0).exp()
    s1 = wgpu_backend.stats()
    assert s1["dispatches"] - s0["dispatches"] == 3 and s1["submits"] == s0["submits"]
    np.testing.assert_allclose(y.numpy(), np.exp(3.0), rtol=1e-6)
    assert wgpu_backend.stats()["submits"] == s0["submits"] + 1


def test_stats_reports_counters_and_memory(wgpu_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", wgpu_backend)
    s = lab.stats()
    for key in ("dispatches", "submits", "readbacks", "bytes_in_use", "peak_bytes_in_use"):
        assert key in s
    before = s["bytes_in_use"]
    x = lab.zeros(1000)
    assert lab.stats()["bytes_in_use"] >= before + 4000
    del x
    assert lab.stats()["bytes_in_use"] == before


def test_backends_give_the_same_training_losses(wgpu_backend, numpy_backend, monkeypatch):
    """Same init, same batches: the wgpu and numpy training curves agree step by step."""
    from lab.engine import backend as B
    curves = []
    for backend in (numpy_backend, wgpu_backend):
        monkeypatch.setitem(B._state, "backend", backend)
        trainer = _tiny_trainer(backend)
        curves.append([trainer.train_step()[0].item() for _ in range(4)])
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-4)
    assert curves[0][-1] < curves[0][0]


def test_trace_peak_lists_what_was_in_use_at_the_peak_and_the_code_that_made_it(wgpu_backend):
    """The way to see what a step's peak holds (issue #23: a checkpointed step's peak was far above its arithmetic):
    the buffers in use at the highest peak, each with its shape and the op that allocated it; off, nothing kept."""
    from lab.engine.backend import using_backend
    B = wgpu_backend
    with using_backend(B):
        B.sync(wait=True)
        B.reset_peak()
        B.trace_peak()
        try:
            x = lab.tensor(np.ones((64, 256), np.float32), requires_grad=True)
            (x * 2.0).exp().sum().backward()
            arrays = B.peak_arrays()
            assert sum(a[0] for a in arrays) == B.stats()["peak_bytes_in_use"]
            made = {by for _, shape, dtype, by in arrays if shape == (64, 256) and dtype == "float32"}
            assert {"tensor.tensor", "elementwise.mul", "elementwise.exp"} <= made, made
            assert any("tensor._walk" in by for by in made), made   # gradients name the backward that made them
        finally:
            B.trace_peak(False)
        lab.tensor(np.ones((512, 512), np.float32))
        assert B.peak_arrays() == [] and B._made is None


def test_trace_peak_on_numpy_is_one_clear_error(numpy_backend):
    with pytest.raises(NotImplementedError, match="numpy backend keeps no count.*tracemalloc"):
        numpy_backend.trace_peak()


def test_peak_arrays_on_numpy_is_the_same_clear_error(numpy_backend):
    """peak_arrays() on numpy was an AttributeError (trace_peak's error came with 394c876, peak_arrays had none)."""
    with pytest.raises(NotImplementedError, match="peak_arrays: the numpy backend keeps no count.*tracemalloc"):
        numpy_backend.peak_arrays()


@pytest.mark.parametrize("on", ["no", 0, 1.0, None])
def test_trace_peak_takes_true_or_false_only(wgpu_backend, on):
    """trace_peak('no') turned tracing on (a string's truth), trace_peak(None) off: one error naming the value."""
    import re
    from lab.checks import show
    with pytest.raises(ValueError, match=f"trace_peak: on must be True or False, got {re.escape(show(on))}"):
        wgpu_backend.trace_peak(on)
    assert wgpu_backend._made is None
