"""A TrainingPanel trains in a background thread while the kernel stays free: generation in the main thread, on
the model being trained and on another, must neither fail nor change a single bit of the training's losses."""
import threading
import time

import numpy as np
import pytest

import lab
from lab.data import CharTokenizer
from lab.engine.random import manual_seed
from lab.models import TransformerConfig, TransformerLM
from lab.train import TrainConfig, Trainer
from lab.widgets import TrainingPanel

TEXT = "and god said let there be light and there was light " * 20
STEPS = 30


def _trainer(seed=0):
    manual_seed(seed)
    tok = CharTokenizer.from_text(TEXT)
    # dropout on: the training's dropout seeds must not be drawn by anyone else
    model = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2,
                                            n_embd=8, dropout=0.1))
    ids = np.asarray(tok.encode(TEXT))
    cfg = TrainConfig(steps=STEPS, batch_size=2, warmup_steps=2, eval_every=10_000, log_every=1)
    return Trainer(model, ids[:800], ids[800:], cfg), tok


def _losses(trainer):
    return [r["loss"] for r in trainer.history]


def _generate_while(thread, model, other, tok):
    """Generate on both models (sampling with the lab generator, greedy, seeded) until `thread` ends."""
    outputs = []
    while thread.is_alive() or not outputs:
        for m in (model, other):
            outputs.append(lab.generate(m, "god", 6, tokenizer=tok, temperature=0.9, top_k=5))
            outputs.append(lab.generate(m, [1, 2], 4, greedy=True))
            outputs.append(lab.generate(m, "let", 5, tokenizer=tok, seed=1, use_cache=False))
    return outputs


def _check_outputs(outputs, tok):
    for out in outputs:
        if isinstance(out, str):
            assert len(out) and set(out) <= set(TEXT), out
        else:
            assert out.dtype == np.int64 and ((0 <= out) & (out < tok.vocab_size)).all(), out


def test_training_thread_and_generation_in_main_thread(use_backend):
    alone, _ = _trainer()
    alone.run(progress=False, log_evals=False)
    trainer, tok = _trainer()
    other, _ = _trainer(seed=1)
    errors = []

    def train():
        try:
            trainer.run(progress=False, log_evals=False)
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)
    thread = threading.Thread(target=train)
    thread.start()
    outputs = _generate_while(thread, trainer.model, other.model, tok)
    thread.join()
    assert not errors, errors
    assert trainer.step_num == STEPS
    assert _losses(trainer) == _losses(alone)  # bitwise: nothing beside the training changes it
    if trainer.replay is not None:  # wgpu: no generation op got into a captured step, so the steps still replay
        assert trainer.replay.off is None and trainer.replay.replayed > 0, trainer.replay.off
    _check_outputs(outputs, tok)


def test_training_panel_start_leaves_generation_free_and_losses_unchanged(use_backend):
    alone, _ = _trainer()
    TrainingPanel(alone, sample_every=0).run(wait=True)
    trainer, tok = _trainer()
    other, _ = _trainer(seed=1)
    panel = TrainingPanel(trainer, tokenizer=tok, sample_every=3, sample_prompt="the", sample_tokens=4)
    assert panel.start()
    outputs = _generate_while(panel._thread, trainer.model, other.model, tok)
    panel.wait()
    assert panel.status == "done", panel.error
    assert _losses(trainer) == _losses(alone)
    assert panel.sample and not panel.sample.startswith("(no sample")
    _check_outputs(outputs, tok)


def test_profiling_in_main_thread_leaves_the_training_thread_running(use_backend):
    """lab.profile() beginning between a step's check for profiling and its capture or replay stopped the
    training with 'cannot capture a step while lab.profile() is active' (the step now holds the backend)."""
    alone, _ = _trainer()
    alone.run(progress=False, log_evals=False)
    trainer, tok = _trainer()
    errors = []

    def train():
        try:
            trainer.run(progress=False, log_evals=False)
        except BaseException as e:
            errors.append(e)
    thread = threading.Thread(target=train)
    thread.start()
    profiles = 0
    while thread.is_alive() or not profiles:
        with lab.profile():
            lab.generate(trainer.model, [1, 2], 2, greedy=True)
        profiles += 1
    thread.join()
    assert not errors, errors
    assert trainer.step_num == STEPS and _losses(trainer) == _losses(alone)


def test_lora_training_thread_keeps_its_adapters_while_generation_switches_them(use_backend):
    """generate(adapter=False) switched the adapters off for every thread: the training thread's steps then had
    nothing to train (backward() on a tensor that does not require grad)."""
    from lab import lora

    def lora_trainer():
        base, tok = _trainer()
        lora.apply(base.model, r=2, alpha=4, targets=["c_attn", "c_fc"])
        return Trainer(base.model, base.train_ids, base.val_ids, base.cfg), tok
    alone, _ = lora_trainer()
    alone.run(progress=False, log_evals=False)
    trainer, tok = lora_trainer()
    errors = []

    def train():
        try:
            trainer.run(progress=False, log_evals=False)
        except BaseException as e:
            errors.append(e)
    thread = threading.Thread(target=train)
    thread.start()
    outputs = []
    while thread.is_alive() or not outputs:
        for adapter in (False, True):
            outputs.append(lab.generate(trainer.model, "god", 4, tokenizer=tok, adapter=adapter, seed=2))
    thread.join()
    assert not errors, errors
    assert _losses(trainer) == _losses(alone)
    assert all(m.enabled for _, m in lora.adapters(trainer.model))  # as set, after all the switching
    _check_outputs(outputs, tok)


def test_an_array_freed_while_another_thread_holds_the_backend_does_not_wait_for_it(wgpu_backend):
    """A finalizer runs wherever the last reference goes, even inside code another thread waits on: it must not
    take the backend's lock (here the holder waits for the freeing thread, which waited for the holder)."""
    x = wgpu_backend.from_numpy(np.ones(1000, np.float32))
    in_use = wgpu_backend.stats()["bytes_in_use"]
    held, freed, waited_out = threading.Event(), threading.Event(), []

    def hold():
        with wgpu_backend.exclusive():
            held.set()
            waited_out.append(not freed.wait(10))
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    del x
    freed.set()
    holder.join()
    assert waited_out == [False]
    assert wgpu_backend.stats()["bytes_in_use"] == in_use - 4096  # taken back at the next call (1000 floats: 4096 B)


def test_checkpoint_saved_beside_a_training_thread_is_of_one_step(use_backend, tmp_path, monkeypatch):
    """save_checkpoint(dir, model, tok, trainer) from the kernel while a panel's thread trains: each checkpoint's
    weights, optimizer moments and step are those of one step boundary (the trainer's step lock), bitwise those of
    a run alone after that many steps, never weights of step k with moments of step k+1."""
    from lab import checkpoint as C, io
    alone, _ = _trainer()
    opt = alone.optimizer

    def snapshot():
        return alone.model.state_dict(), {k: opt.backend.to_numpy(a) for k, a in opt.state_arrays().items()}
    at_step = {0: snapshot()}
    for _ in range(STEPS):
        alone.train_step()
        at_step[alone.step_num] = snapshot()

    write_tensors = io._Staging.write_tensors

    def slow_disk(self, name, tensors, metadata=None):   # a slow disk: a step fits between two files' reads
        time.sleep(0.02)
        return write_tensors(self, name, tensors, metadata)
    monkeypatch.setattr(io._Staging, "write_tensors", slow_disk)
    trainer, tok = _trainer()
    thread = threading.Thread(target=trainer.run, kwargs=dict(progress=False, log_evals=False))
    thread.start()
    saved = []
    while thread.is_alive():
        saved.append(C.save_checkpoint(tmp_path / f"ck{len(saved)}", trainer.model, tok, trainer))
    thread.join()
    assert trainer.step_num == STEPS and len(saved) > 2
    for d in saved:
        model, _, state = C.load_checkpoint(d)
        moments = C._named_state(C.read_safetensors(d / C.OPTIMIZER_FILE), opt)
        weights_then, moments_then = at_step[state["step"]]
        assert state["optimizer_step"] == state["step"]
        for name, value in model.state_dict().items():
            assert np.array_equal(value, weights_then[name]), (d, state["step"], name)
        for name, value in moments.items():
            assert np.array_equal(value, moments_then[name]), (d, state["step"], name)


def _refused_while_training(trainer, attempts):
    """Pause `trainer`'s panel run in its thread, try each attempt from this thread, resume; returns the messages."""
    panel = TrainingPanel(trainer, sample_every=0)
    assert panel.start()
    panel.pause()   # the thread waits inside run(), between two steps: the model is still in use there
    messages = []
    for name, attempt in attempts:
        try:
            attempt()
        except RuntimeError as e:
            messages.append(str(e))
            assert str(e).startswith(f"{name}: the model is in use in thread 'lab-training'"), e
            assert "stop it first" in str(e)
        else:
            raise AssertionError(f"{name} was not refused while the model trains in another thread")
    panel.resume()
    panel.wait()
    assert panel.status == "done", panel.error
    return messages


def test_changing_a_model_that_trains_in_another_thread_is_refused(use_backend, tmp_path):
    """lora.apply on the model a panel trains froze its parameters under the run (which stopped with 'grad_norm:
    no parameter has a gradient'); eval() turned its dropout off mid-run; load_state_dict, a second Trainer or a
    train_step from the kernel stepped or replaced its weights beside the run. Each is refused, naming itself,
    and the run's losses stay those of a run alone; once it ends the same calls work."""
    from lab import lora
    from lab.diagnostics import DiagnosticsMonitor
    alone, _ = _trainer()
    alone.run(progress=False, log_evals=False)
    trainer, tok = _trainer()
    model = trainer.model
    state = model.state_dict()
    _refused_while_training(trainer, [
        ("lora.apply", lambda: lora.apply(model, r=2)),
        ("load_state_dict", lambda: model.load_state_dict(state)),
        ("model.eval()", model.eval),
        ("Trainer.run", lambda: Trainer(model, trainer.train_ids, trainer.val_ids, trainer.cfg).run(progress=False)),
        ("Trainer.train_step", trainer.train_step),
        # its gradients go through the model's parameters: into the run's step, had it been let through
        ("DiagnosticsMonitor.run", DiagnosticsMonitor(Trainer(model, trainer.train_ids, trainer.val_ids, trainer.cfg),
                                                      every=10, power_iters=1).run)])
    assert _losses(trainer) == _losses(alone)
    assert model.training and not lora.adapters(model)
    model.eval()
    lora.apply(model, r=2)   # the run is over: allowed again
    assert lora.adapters(model)


def test_changing_adapters_of_a_lora_model_that_trains_in_another_thread_is_refused(use_backend, tmp_path):
    from lab import lora

    def lora_trainer():
        base, tok = _trainer()
        lora.apply(base.model, r=2, alpha=4, targets=["c_attn"])
        return Trainer(base.model, base.train_ids, base.val_ids, base.cfg)
    alone = lora_trainer()
    alone.run(progress=False, log_evals=False)
    lora.save_adapter(alone.model, tmp_path / "adapter")
    trainer = lora_trainer()
    model = trainer.model
    _refused_while_training(trainer, [
        ("lora.merge", lambda: lora.merge(model)), ("lora.unmerge", lambda: lora.unmerge(model)),
        ("lora.use_adapter", lambda: lora.use_adapter(model, False)),
        ("lora.load_adapter", lambda: lora.load_adapter(model, tmp_path / "adapter"))])
    assert _losses(trainer) == _losses(alone)
    assert all(m.enabled and not m.merged for _, m in lora.adapters(model))
    lora.load_adapter(model, tmp_path / "adapter")   # the run is over: allowed again


def test_save_pretrained_beside_a_training_thread_holds_one_steps_weights(use_backend, tmp_path):
    """save_pretrained knows no trainer: it takes the model's step lock (nn.step_lock), so a save from the kernel
    while a panel trains holds every weight of one step boundary, never some from before a step and some after."""
    from lab.checkpoint import load_pretrained
    alone, _ = _trainer()
    at_step = [alone.model.state_dict()]
    for _ in range(STEPS):
        alone.train_step()
        at_step.append(alone.model.state_dict())
    trainer, _ = _trainer()
    model = trainer.model

    def slow_read():   # a big model: a step fits between the first parameter read and the last
        out = {}
        for name, p in model.named_parameters():
            out[name] = p.numpy()
            time.sleep(0.002)
        return out
    model.state_dict = slow_read
    step = trainer.train_step

    def paced_step():   # steps of at least 10 ms: on a fast host 30 steps of this small model ended within two saves
        time.sleep(0.01)
        return step()
    trainer.train_step = paced_step
    thread = threading.Thread(target=trainer.run, kwargs=dict(progress=False, log_evals=False))
    thread.start()
    saved = []
    while thread.is_alive():
        saved.append(model.save_pretrained(tmp_path / f"m{len(saved)}"))
    thread.join()
    assert trainer.step_num == STEPS and len(saved) > 2
    for d in saved:
        weights = load_pretrained(d).state_dict()
        assert any(all(np.array_equal(weights[n], then[n]) for n in weights) for then in at_step), d


def test_step_lock_serves_a_waiting_thread_before_the_holder_takes_it_again():
    """A training loop releases the step lock and takes it again for its next step; a save waiting for it must get
    it at that release. Python's own locks are not fair: depending on the scheduling the loop took it back step
    after step and a save from the kernel waited for the end of the run (a test's 30-step run made one save)."""
    from lab.nn import FairLock

    def busy(seconds):   # holding the GIL, as a step's Python does
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            pass
    lock, done, order = FairLock(), threading.Event(), []

    def loop():
        for _ in range(50):
            with lock:
                with lock:          # re-entrant, as Trainer.run holds it around train_step
                    order.append("step")
                    busy(0.001)
        done.set()
    t = threading.Thread(target=loop)
    t.start()
    while not done.is_set():
        with lock:
            order.append("save")
            busy(0.001)
    t.join()
    # served in turn: a step followed by a step only where the saver had not yet asked again (threading.RLock: 47
    # to 49 of 50 steps here, or the saver's turns all taken before the loop's)
    assert sum(a == b == "step" for a, b in zip(order, order[1:])) <= 15, order
    assert 35 <= order.count("save") <= 60, order.count("save")
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.release()
