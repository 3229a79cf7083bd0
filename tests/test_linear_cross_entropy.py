"""F.linear_cross_entropy (issue #23): the output layer's mean cross-entropy without the whole (N, V) logits, a chunk of
rows at a time, its gradients taken in the forward. It must equal the composed F.matmul + F.cross_entropy (and
PyTorch) within float32 rounding: the sums over chunks run in another order, so 1e-5 relative, not bit-equal."""

import numpy as np
import pytest
import torch

import lab
from lab import lora
from lab.checks import InputError
from lab.engine import ops as F
from lab.engine.ops import linalg
from lab.engine.tensor import enable_grad
from lab.models.llama import LlamaConfig, LlamaLM
from lab.models.transformer import TransformerConfig, TransformerLM
from lab.train import TrainConfig, Trainer
from peak_memory import peak_bytes
from step_counts import second_step_dispatches

V = 67   # a vocabulary not a multiple of 4, 32 or 64
FAMILIES = {   # 2 layers, 32 wide: GPT-2's tied head, Llama's tied and untied ones
    "gpt2": lambda: TransformerLM(TransformerConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32)),
    "llama-tied": lambda: LlamaLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=16)),
    "llama-untied": lambda: LlamaLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=16, tie_word_embeddings=False)),
}
IDS = np.random.default_rng(0).integers(0, V, 3000)


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)


def _operands(vocab, transpose_b, bias, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    w = rng.standard_normal((vocab, 6)).astype(np.float32)
    b = rng.standard_normal(vocab).astype(np.float32) if bias else None
    t = rng.integers(0, vocab, (2, 5))
    t[0, 1] = t[1, 4] = -100
    return x, (w if transpose_b else np.ascontiguousarray(w.T)), b, t


def _lab_grads(fn, x, w, b):
    xt, wt = lab.tensor(x, requires_grad=True), lab.tensor(w, requires_grad=True)
    bt = lab.tensor(b, requires_grad=True) if b is not None else None
    loss = fn(xt, wt, bt)
    (loss * 3.0).backward()   # an upstream gradient other than 1
    return loss.item(), xt.grad.numpy(), wt.grad.numpy(), None if b is None else bt.grad.numpy()


@pytest.mark.parametrize("vocab", [67, 131])
@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_gradients_equal_the_composed_ops_and_pytorch(use_backend, vocab, transpose_b, bias):
    """10 rows in chunks of 3 (the last chunk 1 row), two rows ignored, loss * 3 backpropagated."""
    x, w, b, t = _operands(vocab, transpose_b, bias)
    fused = _lab_grads(lambda xt, wt, bt: F.linear_cross_entropy(xt, wt, t, bias=bt, transpose_b=transpose_b,
                                                                 chunk_rows=3), x, w, b)
    composed = _lab_grads(lambda xt, wt, bt: F.cross_entropy(
        F.matmul(xt, wt, transpose_b=transpose_b) + (0.0 if bt is None else bt), t), x, w, b)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True) if bias else None
    logits = xt @ (wt.T if transpose_b else wt) + (bt if bias else 0)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), torch.tensor(t).reshape(-1))
    (loss * 3).backward()
    theirs = (loss.item(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy() if bias else None)
    for ref in (composed, theirs):
        for name, a, r in zip(("loss", "dx", "dweight", "dbias"), fused, ref):
            if r is not None:
                _close(a, r, name)


def test_every_row_ignored_gives_a_zero_loss_and_zero_gradients(use_backend):
    """The composed cross_entropy's answer for no counted row (PyTorch's mean gives NaN): 0, and no NaN anywhere."""
    x, w, _, t = _operands(V, True, False)
    loss, dx, dw, _ = _lab_grads(lambda xt, wt, bt: F.linear_cross_entropy(xt, wt, np.full_like(t, -100),
                                                                           chunk_rows=4), x, w, None)
    assert loss == 0.0
    assert not dx.any() and not dw.any()


def test_without_grad_the_forward_gives_the_loss_alone(use_backend):
    x, w, _, t = _operands(V, True, False)
    xt, wt = lab.tensor(x, requires_grad=True), lab.tensor(w, requires_grad=True)
    with lab.no_grad():
        loss = F.linear_cross_entropy(xt, wt, t, chunk_rows=3)
    assert not loss.requires_grad
    _close(loss.item(), F.cross_entropy(F.matmul(xt, wt, transpose_b=True), t).item(), "loss")


def _model_grads(family, return_logits, every=0):
    lab.manual_seed(0)
    model = FAMILIES[family]()
    if every:
        model.gradient_checkpointing_enable(every)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, V, (3, 7)), rng.integers(0, V, (3, 7))
    y[0, :2] = -100
    out = model(x, y, return_logits=return_logits)
    assert (out[0] is None) == (not return_logits)
    out[1].backward()
    return out[1].item(), {n: p.grad.numpy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("every", [0, 1])
def test_a_models_loss_and_every_gradient_equal_the_logits_path(use_backend, monkeypatch, family, every):
    """21 rows in chunks of 5; with every=1 the blocks are checkpointed."""
    monkeypatch.setattr(linalg, "LOGITS_CHUNK_BYTES", 4 * V * 5)
    (l0, g0), (l1, g1) = _model_grads(family, True, every), _model_grads(family, False, every)
    _close(l1, l0, "loss")
    assert sorted(g1) == sorted(g0)
    for name in g0:
        _close(g1[name], g0[name], name)


def test_an_adapter_on_the_head_takes_the_composed_output(use_backend):
    """A LoRA adapter on lm_head changes its output: the loss must be the adapted layer's, as with the logits."""
    def grads(return_logits):
        lab.manual_seed(0)
        model = FAMILIES["llama-untied"]()
        lora.apply(model, r=4, targets=["q_proj", "lm_head"])
        for p in model.parameters():   # B = 0 at first: a nonzero one makes the adapter count
            if p.shape == (V, 4):
                p.data = p.backend.from_numpy(np.full((V, 4), 0.05, np.float32))
        rng = np.random.default_rng(1)
        x, y = rng.integers(0, V, (2, 7)), rng.integers(0, V, (2, 7))
        loss = model(x, y, return_logits=return_logits)[1]
        loss.backward()
        return loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    (l0, g0), (l1, g1) = grads(True), grads(False)
    _close(l1, l0, "loss")
    assert sorted(g1) == sorted(g0) and any("lm_head" in n for n in g0)
    for name in g0:
        _close(g1[name], g0[name], name)



def test_a_head_with_a_forward_of_its_own_gives_the_loss_of_its_output(use_backend):
    """lm_head.cross_entropy took the chunked loss of the weight alone wherever the layer was a Linear: a head whose
    forward is its own (patched on the instance, here scaling the logits by 2) gave the unpatched loss. Linear.plain
    asks nn.own_forward, so the loss is cross-entropy of what the forward returns, gradients alike."""
    def run(patched):
        lab.manual_seed(0)
        model = FAMILIES["llama-untied"]()
        if patched:
            base = model.lm_head.forward
            model.lm_head.forward = lambda x, activation=None, residual=None: base(x) * 2.0
        rng = np.random.default_rng(1)
        x, y = rng.integers(0, V, (2, 7)), rng.integers(0, V, (2, 7))
        if patched:
            loss = model(x, y, return_logits=False)[1]
        else:   # the composed loss of the doubled logits
            out = model(x)
            loss = F.cross_entropy((out[0] if isinstance(out, tuple) else out) * 2.0, lab.tensor(y, backend=use_backend))
        loss.backward()
        return loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters()}
    (l0, g0), (l1, g1) = run(False), run(True)
    _close(l1, l0, "loss")
    for name in g0:
        _close(g1[name], g0[name], name)

def _trainer_losses(monkeypatch, family, composed, steps=5, **cfg):
    if composed:   # the head's loss through the whole logits, as before linear_cross_entropy
        cls = type(FAMILIES[family]())
        monkeypatch.setattr(cls, "_head_loss", lambda self, h, t: F.cross_entropy(self._head(h), t))
    lab.manual_seed(0)
    trainer = Trainer(FAMILIES[family](), IDS[:2500], IDS[2500:],
                      TrainConfig(steps=steps, batch_size=3, block_size=8, lr=1e-2, **cfg))
    losses = [trainer.train_step()[0].item() for _ in range(steps)]
    monkeypatch.undo()
    return losses, trainer


@pytest.mark.parametrize("family", ["gpt2", "llama-untied"])
def test_trainer_steps_replayed_or_not_give_the_logits_paths_losses(use_backend, monkeypatch, family):
    """Five steps of two micro-batches, 24 rows in chunks of 5, checkpointing on: on wgpu the last steps are replays
    of the captured chunked step; every loss (each after the previous steps' updates) equals the logits path's."""
    def run(composed):
        monkeypatch.setattr(linalg, "LOGITS_CHUNK_BYTES", 4 * V * 5)
        return _trainer_losses(monkeypatch, family, composed, grad_accum_steps=2, checkpoint_activations=True)
    (plain, _), (chunked, trainer) = run(True), run(False)
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)
    if use_backend.name == "wgpu":
        assert trainer.replay.replayed >= 2
    assert np.isfinite(trainer.evaluate(2))


def _peak_of_step(backend, chunked):
    """Peak bytes of one plain training step of a GPT-2 of vocabulary 2053 (logits (128, 2053): 1.05 MB, far above
    the 2 x 32-wide layers' activations) beyond what was allocated before it."""
    lab.manual_seed(0)
    vocab = 2053
    model = TransformerLM(TransformerConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
    ids = np.random.default_rng(0).integers(0, vocab, 3000)
    trainer = Trainer(model, ids[:2500], ids[2500:], TrainConfig(steps=100, batch_size=4, replay_steps=False))
    if not chunked:
        cls = type(model)
        cls._head_loss, saved = (lambda self, h, t: F.cross_entropy(self._head(h), t)), cls._head_loss
    try:
        trainer.train_step()   # the optimizer's moments exist before the measured step
        return peak_bytes(backend, lambda _: trainer.train_step())
    finally:
        if not chunked:
            cls._head_loss = saved


def test_a_training_steps_peak_falls_by_more_than_the_logits(use_backend, monkeypatch):
    """The plain step holds the logits and their gradient (and the matmul's gradient products beside them); the
    chunked one a 16-row chunk's: the peak falls by more than the logits' 1.05 MB."""
    monkeypatch.setattr(linalg, "LOGITS_CHUNK_BYTES", 4 * 2053 * 16)
    plain, chunked = _peak_of_step(use_backend, False), _peak_of_step(use_backend, True)
    assert plain - chunked > 128 * 2053 * 4, (plain, chunked)


def test_bad_input_is_one_clear_error(use_backend):
    x, w, _, t = _operands(V, True, False)
    xt, wt = lab.tensor(x), lab.tensor(w)
    cases = [
        (lambda: F.linear_cross_entropy(xt, lab.tensor(w[:, :5]), t), r"x \(2, 5, 6\) and weight \(67, 5\) do not "
                                                                         r"align: 6 != 5 \(the weight is \(V, C\)"),
        (lambda: F.linear_cross_entropy(xt, wt, t, transpose_b=False), r"6 != 67 \(the weight is \(C, V\)"),
        (lambda: F.linear_cross_entropy(xt, wt, t[:, :4]), r"targets of shape \(2, 4\) do not match x \(2, 5, 6\)"),
        (lambda: F.linear_cross_entropy(xt, wt, t, bias=lab.tensor(np.zeros(66, np.float32))),
         r"bias of shape \(66,\) .* want \(67,\)"),
        (lambda: F.linear_cross_entropy(xt, wt, np.where(np.arange(10).reshape(2, 5) == 7, V, t)),
         r"linear_cross_entropy: target 67 .* 67 classes"),
        (lambda: F.linear_cross_entropy(xt, lab.tensor(w[0]), t), r"weight must be a 2-D float tensor"),
        (lambda: F.linear_cross_entropy(xt, wt, t, chunk_rows=0), r"chunk_rows must be an integer >= 1"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, InputError), match=message):
            call()
    with pytest.raises(InputError, match="return_logits=False needs targets"):
        FAMILIES["gpt2"]()(np.zeros((1, 3), np.int64), return_logits=False)



def test_the_plan_counts_one_chunk_of_logits_not_all_of_them():
    """gpt2-small, 8 and 16 x 1024 tokens: the loss's memory grows with the rows' C-wide tensors (the final norm, its
    statistics, the input's gradient), not with their 50257-wide logits (1.65 GB more at the larger batch)."""
    from lab import plan
    small, large = (plan.estimate("gpt2-small", batch=b, seq=1024, device="h200", vocab_size=50257) for b in (8, 16))
    key = "activations: logits and loss"
    assert large.memory[key] - small.memory[key] == 8192 * (2 * 768 + 2) * 4
    assert "logits" not in small.largest_buffer[0]   # a chunk's (640 rows, 123 MiB) is below the attention weights


@pytest.mark.parametrize("family", ["gpt2", "llama-untied"])
def test_the_plans_op_count_counts_the_chunks(wgpu_backend, monkeypatch, family):
    """The dispatches of a training step with its 48 rows in 4 chunks (12 rows each) beyond those with 1 chunk, as
    the plan counts them (op_count / llama_op_count with the step's rows; their totals: tests/test_plan.py)."""
    from lab.plan.estimator import llama_op_count, op_count
    measured, counted = [], []
    for rows_per_chunk in (64, 12):
        monkeypatch.setattr(linalg, "LOGITS_CHUNK_BYTES", 4 * V * rows_per_chunk)
        models = []
        measured.append(second_step_dispatches(wgpu_backend, lambda: models.append(FAMILIES[family]()) or models[0],
                                               IDS, batch_size=3, block_size=16))
        model = models[0]
        slots = wgpu_backend.optimizer_slots()
        counted.append(op_count(model.config, update_slots=slots, rows=48) if family == "gpt2" else
                       llama_op_count(model.config, slots, rows=48))
    assert measured[1] - measured[0] == counted[1] - counted[0] > 0, (measured, counted)


@pytest.mark.parametrize("transpose_b", [True, False])
def test_a_padded_head_pads_its_weight_once_and_never_its_logits(wgpu_backend, monkeypatch, transpose_b):
    """Products of ragged widths run on zero-padded whole tiles (wgpu; forced here for tiny shapes): the composed
    head pads the weight and the logits' gradient for each of its products; the chunked one pads the weight once
    (to 128 classes) and takes the padded logits as they are. Loss and gradients stay the composed ones."""
    from dataclasses import replace
    from lab.engine.backend import using_backend
    monkeypatch.setattr(wgpu_backend, "matmul_tuning", replace(wgpu_backend.matmul_tuning, PAD_MIN_VOLUME=1, ROWS_MAX=0,
                                                                 PAD_MAX_WORK=1e6))
    padded, zero_padded = [], type(wgpu_backend)._zero_padded

    def spy(self, x, rows_cols):
        if V in x.shape[1:] and rows_cols != x.shape[1:]:   # a V-wide operand (weight, logits, their gradient)
            padded.append(x.shape)
        return zero_padded(self, x, rows_cols)
    monkeypatch.setattr(type(wgpu_backend), "_zero_padded", spy)
    x, w, b, t = _operands(V, transpose_b, True)
    with using_backend(wgpu_backend):
        fused = _lab_grads(lambda xt, wt, bt: F.linear_cross_entropy(xt, wt, t, bias=bt, transpose_b=transpose_b,
                                                                     chunk_rows=3), x, w, b)
        assert not padded
        composed = _lab_grads(lambda xt, wt, bt: F.cross_entropy(
            F.matmul(xt, wt, transpose_b=transpose_b) + bt, t), x, w, b)
    assert padded   # (the spy sees them)
    for name, a, r in zip(("loss", "dx", "dweight", "dbias"), fused, composed):
        _close(a, r, name)


@pytest.mark.parametrize("base_dtype", ["float16", "q4"])
def test_an_untied_head_on_a_float16_or_packed_base_trains(use_backend, base_dtype):
    """lora.apply(base_dtype=...) stores every linear weight, the untied lm_head's too, as float16 or packed: the
    head's loss is then its whole output's (a float16 lm_head failed the trainer's step before), as with logits."""
    lab.manual_seed(0)
    model = lora.apply(FAMILIES["llama-untied"](), r=4, targets="all-linear", base_dtype=base_dtype)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, V, (2, 7)), rng.integers(0, V, (2, 7))
    _close(model(x, y, return_logits=False)[1].item(), model(x, y)[1].item(), "loss")
    trainer = Trainer(model, IDS[:2500], IDS[2500:], TrainConfig(steps=2, batch_size=2, block_size=8))
    assert np.isfinite(trainer.train_step()[0].item())


@pytest.mark.parametrize("ignore_index", [2 ** 32 + 2, 2.5, True, None])
def test_an_ignore_index_not_an_int32_is_one_clear_error_on_both_losses(use_backend, ignore_index):
    """The wgpu kernels compare targets with ignore_index's int32 bits: 2**32 + 2 and 2.5 skipped target 2 there
    where numpy skipped none (a different loss per backend), None was a TypeError on wgpu and 'skip none' on numpy."""
    x, w, _, t = _operands(V, True, False)
    t = np.abs(t) % 3   # target 2 present
    for call in (lambda: F.linear_cross_entropy(lab.tensor(x), lab.tensor(w), t, ignore_index=ignore_index),
                 lambda: F.cross_entropy(F.matmul(lab.tensor(x), lab.tensor(w), transpose_b=True), t, ignore_index)):
        with pytest.raises(InputError, match=r"ignore_index must be an integer >= -2,147,483,648 .* got"):
            call()
    assert F.linear_cross_entropy(lab.tensor(x), lab.tensor(w), t, ignore_index=np.int64(2)).item() == \
        pytest.approx(F.cross_entropy(F.matmul(lab.tensor(x), lab.tensor(w), transpose_b=True), t, 2).item(), rel=1e-5)


@pytest.mark.parametrize("grad", [True, False])
def test_a_chunked_loss_holds_one_chunks_logits_and_one_weight_gradient_beside_its_sum(use_backend, grad):
    """Chunk k's logits were still bound while chunk k + 1's were made (two chunks at a time), and the weight
    gradient's running sum was `product + sum` beside both (three (V, C) arrays: the sum, the chunk's product and
    their new sum). Now the last chunk goes first and the sum is added into in place (Backend.add_): one chunk's
    logits (numpy's cross_entropy takes a second as its temporary) and two (V, C) arrays at most. wgpu before:
    7.1 chunks with the gradient, 2.0 without."""
    backend = use_backend
    rng = np.random.default_rng(0)
    N, C, vocab, rows = 64, 32, 2048, 16
    x = lab.tensor(rng.standard_normal((N, C)).astype(np.float32), requires_grad=True)
    w = lab.tensor(rng.standard_normal((vocab, C)).astype(np.float32), requires_grad=True)
    t = rng.integers(0, vocab, N)

    def loss():
        with (enable_grad() if grad else lab.no_grad()):
            return F.linear_cross_entropy(x, w, t, chunk_rows=rows)
    loss()   # kernels compiled, pools warm
    kept = []
    peak = peak_bytes(backend, lambda _: kept.append(loss()))
    chunk = rows * vocab * 4
    allowed = (1 + (backend.name == "numpy")) * chunk + (2 * vocab * C * 4 if grad else 0) + chunk // 2
    assert peak < allowed, (peak / chunk, allowed / chunk)
    assert np.isfinite(kept[0].item())


@pytest.mark.parametrize("family", list(FAMILIES) + ["proneural"])
def test_return_logits_is_true_or_false_checked_before_the_forward_runs(use_backend, monkeypatch, family):
    """return_logits='no' was true (the whole logits the flag is there to avoid, silently) and None took the chunked
    loss; each is one InputError now, raised before any block runs, as is False without targets."""
    from lab.models.proneural import ProNeuralConfig, ProNeuralLM
    model = ProNeuralLM(ProNeuralConfig(vocab_size=V)) if family == "proneural" else FAMILIES[family]()
    x = np.zeros((1, 4), np.int64)
    embed = "wte" if family != "llama-tied" and family != "llama-untied" else None
    table = model.wte if embed else model.model.embed_tokens
    monkeypatch.setattr(table, "forward", lambda *a, **k: pytest.fail("the forward ran"))
    for value, message in (("no", "return_logits must be True or False, got 'no'"),
                           (None, "return_logits must be True or False, got None")):
        with pytest.raises(InputError, match=message):
            model(x, x, return_logits=value)
    with pytest.raises(InputError, match="return_logits=False needs targets"):
        model(x, return_logits=False)
