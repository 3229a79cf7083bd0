"""Activation checkpointing (issue #23): a checkpointed block keeps only its input and runs again in the backward,
with the forward's dropout masks, so the gradients are the plain graph's (the same kernels in the same order: the
tolerance is 1e-6 relative, and they come out bit-equal on both backends)."""
import tracemalloc

import numpy as np
import pytest

import lab
from lab import lora
from lab.checks import InputError
from lab.engine.backend import using_backend
from lab.models.llama import LlamaConfig, LlamaLM
from lab.models.proneural import ProNeuralConfig, ProNeuralLM
from lab.models.transformer import TransformerConfig, TransformerLM
from lab.plan.estimator import DoesNotFitError, check_fits, estimate
from lab.plan.profiles import named_profile
from lab.train import TrainConfig, Trainer

V = 50
FAMILIES = {   # 2 layers, 32 wide, dropout on (attention, residual and MLP in GPT-2; attention in Llama)
    "gpt2": lambda drop: TransformerLM(TransformerConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                                         dropout=drop)),
    "llama": lambda drop: LlamaLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=16, dropout=drop)),
}
IDS = np.random.default_rng(0).integers(0, V, 3000)


def _grads(make, every, adapters=False):
    """Loss and gradients of one forward and backward (dropout 0.1) from the same weights and seeds."""
    lab.manual_seed(0)
    model = make(0.1)
    if adapters:
        lora.apply(model, r=4, dropout=0.1, targets="all-linear")
    if every:
        model.gradient_checkpointing_enable(every)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, V, (3, 7)), rng.integers(0, V, (3, 7))
    lab.manual_seed(5)
    _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain, checkpointed):
    (l0, g0), (l1, g1) = plain, checkpointed
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert sorted(g0) == sorted(g1) and g0
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-6, atol=1e-6 * np.abs(g0[name]).max(), err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_gradients_equal_plain_ones_with_dropout(use_backend, family, every):
    _assert_same(_grads(FAMILIES[family], 0), _grads(FAMILIES[family], every))


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointed_lora_gradients_equal_plain_ones_and_reach_only_adapters(use_backend, family):
    plain, checkpointed = _grads(FAMILIES[family], 0, adapters=True), _grads(FAMILIES[family], 1, adapters=True)
    _assert_same(plain, checkpointed)
    assert all(".lora_" in name for name in checkpointed[1])


def _losses(family, k, steps=5, **cfg):
    lab.manual_seed(0)
    trainer = Trainer(FAMILIES[family](0.1), IDS[:2500], IDS[2500:],
                      TrainConfig(steps=100, batch_size=2, block_size=8, checkpoint_activations=k, **cfg))
    losses = [trainer.train_step()[0].item() for _ in range(steps)]
    return losses, trainer


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_checkpointing_gives_the_plain_losses_step_by_step_with_replay_and_accumulation(use_backend, family):
    """Five steps of two micro-batches: on wgpu the last steps are replays of a captured step (the recomputation's
    dropout seeds patched as the forward's), as many as the plain run's; on numpy eager steps. Every loss equals
    the plain run's."""
    plain, plain_trainer = _losses(family, 0, grad_accum_steps=2)
    for k in (True, 2):
        checkpointed, trainer = _losses(family, k, grad_accum_steps=2)
        np.testing.assert_allclose(checkpointed, plain, rtol=1e-6)
        if use_backend.name == "wgpu":
            assert trainer.replay.replayed == plain_trainer.replay.replayed >= 2


def test_model_checkpointing_survives_trainer_setting_changes(use_backend):
    """Switching TrainConfig.checkpoint_activations mid-run (reconfigure) sends replay to a new capture: the losses
    stay the plain run's."""
    plain, _ = _losses("gpt2", 0, steps=6)
    lab.manual_seed(0)
    trainer = Trainer(FAMILIES["gpt2"](0.1), IDS[:2500], IDS[2500:], TrainConfig(steps=100, batch_size=2, block_size=8))
    losses = []
    for step, k in enumerate((0, 0, 0, 1, 1, 0)):
        trainer.reconfigure(checkpoint_activations=k)
        losses.append(trainer.train_step()[0].item())
    np.testing.assert_allclose(losses, plain, rtol=1e-6)


def _peak_of_step(backend, k):
    """Peak bytes of one training step beyond what was allocated before it (a step's activations dominate)."""
    lab.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32))
    trainer = Trainer(model, IDS[:2500], IDS[2500:], TrainConfig(steps=100, batch_size=8, checkpoint_activations=k,
                                                                 replay_steps=False))
    trainer.train_step()   # the optimizer's moments exist before the measured step
    if backend.name == "wgpu":
        backend.sync(wait=True)
        base = backend.stats()["bytes_in_use"]
        backend.reset_peak()
        trainer.train_step()
        backend.sync(wait=True)
        return backend.stats()["peak_bytes_in_use"] - base
    tracemalloc.start()
    try:
        trainer.train_step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_checkpointing_lowers_a_steps_peak_memory(use_backend):
    """2 layers of batch 8 x 32 tokens, 32 wide: a plain step holds each block's ~22 (B, T, C) activations, a
    checkpointed one each block's input and one block's recomputation: the measured peak falls by over a quarter."""
    plain, checkpointed = _peak_of_step(use_backend, 0), _peak_of_step(use_backend, 1)
    assert checkpointed < 0.75 * plain, (plain, checkpointed)


@pytest.mark.parametrize("value", [-1, "yes", 2.5, None])
def test_bad_checkpoint_activations_values_are_one_clear_error(value):
    with pytest.raises(InputError, match=r"checkpoint_activations must be True \(every block\), False \(none\) or an "
                                         r"integer k >= 1"):
        TrainConfig(checkpoint_activations=value)


def test_checkpointing_more_blocks_than_the_model_has_is_refused(numpy_backend):
    with using_backend(numpy_backend):
        model = FAMILIES["llama"](0.0)
        with pytest.raises(InputError, match=r"checkpoint_activations=3: the model has 2 blocks, so k must be 1\.\.2"):
            Trainer(model, IDS[:2500], IDS[2500:], TrainConfig(checkpoint_activations=3))
        trainer = Trainer(model, IDS[:2500], IDS[2500:], TrainConfig(checkpoint_activations=2))
        with pytest.raises(InputError, match="the model has 2 blocks"):
            trainer.reconfigure(checkpoint_activations=5)
        assert trainer.cfg.checkpoint_activations == 2
        with pytest.raises(InputError, match=r"every=3: the model has 2 blocks"):
            model.gradient_checkpointing_enable(3)
        assert not model.is_gradient_checkpointing
        pro = ProNeuralLM(ProNeuralConfig(vocab_size=V))
        with pytest.raises(InputError, match="ProNeuralLM has no blocks to checkpoint"):
            Trainer(pro, IDS[:2500], IDS[2500:], TrainConfig(checkpoint_activations=True))


def test_checkpointing_a_model_whose_adapters_are_off_is_the_trainers_clear_error(use_backend):
    """A block's output needs a gradient exactly when the plain forward's does: LoRA switched off (only adapters
    trainable, none used) is the trainer's one error, not a step that trains nothing."""
    lab.manual_seed(0)
    model = lora.apply(FAMILIES["gpt2"](0.0), r=2)
    lora.use_adapter(model, False)
    trainer = Trainer(model, IDS[:2500], IDS[2500:], TrainConfig(batch_size=2, block_size=8,
                                                                 checkpoint_activations=True))
    with pytest.raises(InputError, match="no trainable parameter takes part in the loss: the model's LoRA adapters "
                                         "are switched off"):
        trainer.train_step()


def test_a_block_whose_settings_change_before_its_backward_is_refused(use_backend):
    """model.eval() (or a changed dropout rate, a LoRA switch) between the forward and the backward would make the
    recomputation another function than the forward: the backward says so and changes no gradient."""
    lab.manual_seed(0)
    model = FAMILIES["gpt2"](0.1).gradient_checkpointing_enable()
    _, loss = model(IDS[:14].reshape(2, 7), IDS[1:15].reshape(2, 7))
    model.h[1].attn.attn_dropout = 0.2
    with pytest.raises(RuntimeError, match="checkpointed block 1: its settings changed between the forward and the "
                                           "backward"):
        loss.backward()
    assert all(p.grad is None for p in model.parameters())


def test_checkpointing_leaves_evaluation_and_cached_steps_as_they_were(use_backend):
    """Without gradients (evaluation, generation) a block runs once, plainly; a cached forward (which writes its
    KV cache) is never checkpointed, even in training mode with gradients on."""
    lab.manual_seed(0)
    model = FAMILIES["llama"](0.0)
    x = IDS[:16].reshape(2, 8)
    with lab.no_grad():
        plain = model(x).numpy()
    cache = model.new_cache(2)
    cached = model.forward_cached(x, cache, 0).numpy()
    model.gradient_checkpointing_enable()
    with lab.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), plain)
    cache = model.new_cache(2)
    out = model.forward_cached(x, cache, 0)
    np.testing.assert_array_equal(out.numpy(), cached)
    np.testing.assert_array_equal(lab.generate(model, [1, 2, 3], 5, greedy=True),
                                  lab.generate(model.gradient_checkpointing_disable(), [1, 2, 3], 5, greedy=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_blocks_run_once_with_checkpointing_on(use_backend, family):
    """lab.interp hooks see each activation once: a block with hooks on runs plainly (a recomputation would call
    them again), and a gradient through a hook (a steering vector) is the plain one."""
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, V, (2, 7)), rng.integers(0, V, (2, 7))
    results = []
    for every in (0, 1):
        lab.manual_seed(0)
        model = FAMILIES[family](0.0).gradient_checkpointing_enable(every)
        steer, calls = lab.tensor(np.full(32, 0.1, np.float32), requires_grad=True), []

        def hook(act, name):
            calls.append(name)
            return act + steer
        with model.hooks([("blocks.0.hook_resid_post", hook)]):
            _, loss = model(x, y)
            loss.backward()
        assert calls == ["blocks.0.hook_resid_post"]
        results.append(steer.grad.numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6)


@pytest.mark.parametrize("family", ["shakespeare-char", "smollm2-135m"])
def test_plan_counts_checkpointed_activations(family):
    """Every block checkpointed: the layers hold one (B, T, C) each plus one block's activations (recomputed in
    the backward); every k-th block: the others keep theirs. The step costs a forward of the blocks again."""
    from lab.models import PRESETS
    c = PRESETS[family]
    plain, every, half = (estimate(c, batch=8, seq=256, device="h200", checkpoint_activations=k) for k in (0, 1, 2))
    L = c.n_layer if hasattr(c, "n_layer") else c.num_hidden_layers
    C = c.n_embd if hasattr(c, "n_embd") else c.hidden_size
    layers, per_layer = f"activations: {L} layers", plain.memory["activations per layer"]
    assert plain.memory[layers] == L * per_layer
    assert every.memory[layers] == L * 8 * 256 * C * 4 + per_layer
    assert half.memory[layers] == (L - L // 2) * per_layer + (L // 2) * 8 * 256 * C * 4 + per_layer
    assert every.memory["total"] < half.memory["total"] < plain.memory["total"]
    assert plain.step_time_s < half.step_time_s < every.step_time_s < 1.5 * plain.step_time_s
    assert "every block checkpointed" in repr(every) and "one block in 2 checkpointed" in repr(half)
    assert "checkpointed" not in repr(plain)


def test_a_plan_that_fits_only_with_checkpointing_suggests_it(numpy_backend):
    """A device between the checkpointed and the plain plan's memory: the plan, and a Trainer's fit check, name
    checkpoint_activations=True; with it the plan fits; on a device too small even for that, it is not named."""
    from dataclasses import replace
    from lab.models import PRESETS
    c = PRESETS["shakespeare-char"]
    plain, checkpointed = (estimate(c, batch=64, device="h200", checkpoint_activations=k) for k in (0, 1))
    between = replace(named_profile("h200"), memory_bytes=(plain.memory["total"] + checkpointed.memory["total"]) // 2)
    refused = estimate(c, batch=64, device=between)
    assert not refused.fits
    assert any(s.startswith("checkpoint_activations=True") for s in refused.suggestions), refused.suggestions
    assert estimate(c, batch=64, device=between, checkpoint_activations=True).fits
    small = replace(between, memory_bytes=checkpointed.memory["total"] // 2)
    assert not any("checkpoint_activations" in s for s in estimate(c, batch=64, device=small).suggestions)
    # the trainer's check (a device's limits, no timings) says the same in its one line
    from lab.plan import estimator
    original = estimator.limits_profile
    estimator.limits_profile = lambda backend: replace(original(backend), memory_bytes=between.memory_bytes)
    try:
        with pytest.raises(DoesNotFitError, match=r"Suggestions: .*checkpoint_activations=True \(TrainConfig; "
                                                  r"--checkpoint-activations\)"):
            check_fits(c, 64, numpy_backend)
        check_fits(c, 64, numpy_backend, checkpoint_activations=True)
    finally:
        estimator.limits_profile = original


def test_plan_command_takes_checkpoint_activations(capsys):
    from lab.cli import main
    assert main(["plan", "--preset", "shakespeare-char", "--device", "h200", "--checkpoint-activations", "2"]) == 0
    assert "one block in 2 checkpointed" in capsys.readouterr().out
