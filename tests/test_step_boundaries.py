"""What another thread (the kernel's cells, beside a TrainingPanel's training thread) sees and changes happens at a
training step's boundary: the model's step lock (nn.step_lock) orders saves, generation's forwards, adapter changes
and config changes against the steps; a bad device index is raised in the thread that used it."""
import threading
import time

import numpy as np
import pytest

import lab
from lab import lora, nn
from lab.data import CharTokenizer
from lab.engine.random import manual_seed
from lab.models import TransformerConfig, TransformerLM
from lab.train import TrainConfig, Trainer

TEXT = "in the beginning god created the heaven and the earth. " * 30


def _model(tok):
    manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8))


def _blocked_while_step_lock_held(model, action):
    """Run `action` in a thread while this thread holds the model's step lock (as a training step does): it must
    wait for the release, then run. Returns the thread's result."""
    out = {}

    def run():
        out["value"] = action()
    t = threading.Thread(target=run)
    with nn.step_lock(model):
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and "value" not in out, "ran in the middle of a step"
    t.join(30)
    assert not t.is_alive()
    return out["value"]


def test_adapter_merge_waits_for_the_step_boundary(use_backend):
    """merge_adapter from another thread changed the weights under a save's read (a save of half-merged layers,
    or one refused as 'merged in some layers only'); it now takes the step lock, as saves do."""
    tok = CharTokenizer.from_text(TEXT)
    model = _model(tok)
    lora.apply(model, r=2, alpha=4, targets=["c_attn"])
    for p in model.parameters():   # a non-zero update (B starts at 0): merging changes the base weights
        if p.requires_grad:
            p.data = p.backend.from_numpy(np.full(p.shape, 0.1, dtype=np.float32))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    _blocked_while_step_lock_held(model, model.merge_adapter)
    after = model.state_dict()
    assert any(not np.array_equal(before[k], after[k]) for k in before if ".lora_" not in k)


def test_load_state_dict_and_reconfigure_wait_for_the_step_boundary(use_backend):
    tok = CharTokenizer.from_text(TEXT)
    model = _model(tok)
    ids = np.asarray(tok.encode(TEXT))
    trainer = Trainer(model, ids[:1200], ids[1200:], TrainConfig(steps=3, batch_size=2, eval_every=10_000))
    state = model.state_dict()
    _blocked_while_step_lock_held(model, lambda: model.load_state_dict(state))
    cfg = _blocked_while_step_lock_held(model, lambda: trainer.reconfigure(lr=1e-4, grad_accum_steps=2))
    assert cfg.lr == 1e-4 and cfg.grad_accum_steps == 2


def test_generation_forwards_wait_for_the_step_boundary(use_backend):
    """Each token's forward reads every weight of one step (a forward used to span an optimizer step: weights of
    step k in one layer, k+1 in the next)."""
    tok = CharTokenizer.from_text(TEXT)
    model = _model(tok)
    text = _blocked_while_step_lock_held(model, lambda: lab.generate(model, "god", 3, tokenizer=tok, greedy=True))
    assert text == lab.generate(model, "god", 3, tokenizer=tok, greedy=True)


def test_generation_takes_a_tokenizer_without_byte_pieces():
    """A tokenizer with encode/decode but no decode_bytes (another library's) was refused by generate while the
    GenerationPanel accepted it; its decoded pieces stand in for the bytes."""
    lab.set_backend("numpy")
    tok = CharTokenizer.from_text(TEXT)

    class Plain:
        vocab_size = tok.vocab_size

        def encode(self, text):
            return tok.encode(text)

        def decode(self, ids):
            return tok.decode(ids)
    model = _model(tok)
    assert lab.generate(model, "god", 5, tokenizer=Plain(), greedy=True) == \
        lab.generate(model, "god", 5, tokenizer=tok, greedy=True)


def test_a_bad_device_index_is_raised_in_the_thread_that_used_it(wgpu_backend):
    """The record of an unchecked device index was the backend's: the next readback in any thread raised it (a
    panel's training thread stopped for an index the kernel's cell got wrong) and the thread that used it read on."""
    from lab.engine import ops
    from lab.engine.backend import IndexRangeError
    B = wgpu_backend
    w = lab.tensor(np.arange(8, dtype=np.float32).reshape(4, 2), backend=B)
    bad = lab.tensor(np.array([7], dtype=np.int32), backend=B)  # a tensor on the device: not checked on the host
    out = {}
    y = ops.embedding(bad, w)

    def other_thread():
        out["other"] = (lab.tensor(np.ones(3, np.float32), backend=B) * 2).numpy()
    t = threading.Thread(target=other_thread)
    t.start()
    t.join(30)
    np.testing.assert_array_equal(out["other"], [2.0, 2.0, 2.0])
    with pytest.raises(IndexRangeError, match="index 7 is out of range for a table of 4 rows"):
        y.numpy()
