"""lab.decode: decode steps captured once and replayed on wgpu give the logits of eager steps, bit for bit."""
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab import lora
from lab.checks import InputError
from lab.decode import DecodeRunner, FixedCache
from lab.engine import ops as F
from lab.engine.tensor import no_grad, tensor
from lab.models import PRESETS, TransformerLM

PROMPT = np.array([[3, 5, 7, 1]], np.int32)
TOKENS = [4, 9, 2, 11, 6, 8, 13, 1, 0, 29]   # fed one by one at slots 4..13 of a 16-slot cache


def _model(family, adapters):
    lab.manual_seed(0)
    if family == "gpt":
        m = TransformerLM(replace(PRESETS["tiny"], vocab_size=30, n_layer=2, n_embd=32, n_head=4, block_size=16))
    else:
        m = lab.LlamaLM(lab.LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    if adapters:   # B starts at zero: random values, so the adapters change the logits
        lora.apply(m, r=2, alpha=4, targets="all-linear")
        rng = np.random.default_rng(1)
        for module in m.modules():
            if isinstance(module, lora.LoRALinear):
                b = module.lora_B
                b.backend.write(b.data, rng.normal(0, 0.5, b.shape).astype(np.float32))
    return m.eval()


def _eager(model, cache, tokens, start):
    """Logits of eager one-token steps (the prompt prefilled first) on `cache`."""
    out = [model.forward_cached(PROMPT, cache, 0)[0, -1].numpy()]
    for i, t in enumerate(tokens):
        out.append(model.forward_cached(np.array([[t]], np.int32), cache, start + i)[0, -1].numpy())
    return out


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("adapters", [False, True])
def test_replayed_decode_steps_give_the_logits_of_eager_steps(any_backend, family, adapters):
    from lab.engine import backend as B
    prev = dict(B._state)
    B._state["backend"] = any_backend
    try:
        model = _model(family, adapters)
        with no_grad():
            slices = _eager(model, model.new_cache(1), TOKENS, 4)          # the cache read up to each slot
            whole = _eager(model, [FixedCache(layer) for layer in model.new_cache(1)], TOKENS, 4)
            with DecodeRunner(model, 1) as runner:
                got = [model.forward_cached(PROMPT, runner.cache, 0)[0, -1].numpy()]
                got += [runner.step([t], 4 + i)[0, -1].numpy() for i, t in enumerate(TOKENS)]
    finally:
        B._state.update(prev)
    if any_backend.name == "wgpu":
        assert runner.off is None and runner.replayed == len(TOKENS) - 3   # all but the three captured steps
        for a, b in zip(got, whole):
            np.testing.assert_array_equal(a, b)
    else:
        assert runner.replayed == 0
    for a, b in zip(got, slices):   # the whole block read with its tail masked: the same logits within rounding
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        assert np.argmax(a) == np.argmax(b)


def test_a_decode_replay_follows_adapters_switched_and_weights_written(wgpu_backend):
    from lab.engine import backend as B
    prev = dict(B._state)
    B._state["backend"] = wgpu_backend
    try:
        model = _model("llama", adapters=True)
        w = model.model.layers[0].mlp.down_proj.weight
        w0 = w.numpy()

        def run(cache, step):
            """The prompt, then ten steps: adapters on for six, off for three, then a weight written in place."""
            model.use_adapter(True)
            w.backend.write(w.data, w0)
            model.forward_cached(PROMPT, cache, 0)
            out = [step(t, 4 + i) for i, t in enumerate(TOKENS[:6])]
            model.use_adapter(False)   # a signature change: captured anew, not a replay of the old capture
            out += [step(t, 4 + i) for i, t in enumerate(TOKENS[6:9], 6)]
            # the capture binds the weight's buffer, not its values: a replay reads what was written
            w.backend.write(w.data, w0 * 0.5)
            return out + [step(TOKENS[9], 13)]

        with no_grad(), DecodeRunner(model, 1) as runner:
            cache = [FixedCache(layer) for layer in model.new_cache(1)]
            reference = run(cache, lambda t, pos: model.forward_cached(np.array([[t]]), cache, pos)[0, -1].numpy())
            got = run(runner.cache, lambda t, pos: runner.step([t], pos)[0, -1].numpy())
        assert runner.replayed == 3 + 1   # three steps captured, three replayed; three captured anew, one replayed
        for a, b in zip(got, reference):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(got[8], got[9])
    finally:
        B._state.update(prev)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_generate_with_replayed_decode_steps_makes_the_tokens_of_full_recompute(use_backend, family, monkeypatch):
    model = _model(family, adapters=False)
    replays = []
    close = DecodeRunner.close
    monkeypatch.setattr(DecodeRunner, "close", lambda self: (replays.append(self.replayed), close(self)))
    cached = lab.generate(model, [3, 5, 7, 1], 11, greedy=True, eos_token_id=[])
    full = lab.generate(model, [3, 5, 7, 1], 11, greedy=True, eos_token_id=[], use_cache=False)
    np.testing.assert_array_equal(cached, full)
    assert max(replays) == (7 if use_backend.name == "wgpu" else 0)   # 10 decode steps, three captured


def test_decode_step_refuses_bad_ids_and_positions(any_backend):
    from lab.models.proneural import ProNeuralConfig, ProNeuralLM
    with pytest.raises(InputError, match="ProNeuralLM keeps no KV cache"):
        DecodeRunner(ProNeuralLM(ProNeuralConfig(vocab_size=5)), 1)
    from lab.engine import backend as B
    prev = dict(B._state)
    B._state["backend"] = any_backend
    try:
        model = _model("gpt", adapters=False)
        with no_grad(), DecodeRunner(model, 1) as runner:
            model.forward_cached(PROMPT, runner.cache, 0)
            for ids, pos, message in (([1, 2], 4, r"one integer token id per row of the batch \(1\), got \[1, 2\]"),
                                      ([1.5], 4, r"one integer token id per row"),
                                      ([30], 4, r"token ids must be in \[0, 29\], got \[30\]"),
                                      ([-1], 4, r"token ids must be in \[0, 29\]"),
                                      ([1], 16, r"pos must be an integer >= 1 and <= 15, got 16"),
                                      ([1], 0, r"pos must be an integer >= 1 and <= 15, got 0")):
                with pytest.raises(InputError, match=message):
                    runner.step(ids, pos)
    finally:
        B._state.update(prev)


def test_softmax_length_masks_the_columns_from_it(any_backend):
    x = np.random.default_rng(0).normal(size=(3, 2, 7)).astype(np.float32)
    y = F.softmax(tensor(x, backend=any_backend), scale=0.5, length=4).numpy()
    e = np.exp(0.5 * (x[..., :4] - x[..., :4].max(-1, keepdims=True)))
    np.testing.assert_allclose(y[..., :4], e / e.sum(-1, keepdims=True), rtol=1e-6, atol=1e-7)
    assert (y[..., 4:] == 0).all()
    for length, message in ((0, r"softmax length must be an integer >= 1 and <= 7, got 0"),
                            (8, r"softmax length must be an integer >= 1 and <= 7, got 8")):
        with pytest.raises(ValueError, match=message):
            F.softmax(tensor(x, backend=any_backend), length=length)
    with pytest.raises(ValueError, match="causal and length masks cannot be combined"):
        F.softmax(tensor(x[:, :, :2], backend=any_backend), causal=True, length=1)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_decode_steps_across_cache_windows_give_the_logits_of_eager_steps(use_backend, family):
    """A 40-slot cache: steps at slots 4..38 read windows of 16, 32 and 40 slots, each captured on its own."""
    lab.manual_seed(0)
    if family == "gpt":
        model = TransformerLM(replace(PRESETS["tiny"], vocab_size=30, n_layer=1, n_embd=16, n_head=2, block_size=40))
    else:
        model = lab.LlamaLM(lab.LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=40))
    model.eval()
    tokens = np.random.default_rng(2).integers(0, 30, 35)
    with no_grad():
        slices = _eager(model, model.new_cache(1), tokens, 4)
        with DecodeRunner(model, 1) as eager:   # the same windows, every step eager (lab.profile() is not replayed)
            model.forward_cached(PROMPT, eager.cache, 0)
            with lab.profile():
                whole = [eager.step([t], 4 + i)[0, -1].numpy() for i, t in enumerate(tokens)]
        with DecodeRunner(model, 1) as runner:
            model.forward_cached(PROMPT, runner.cache, 0)
            got = [runner.step([t], 4 + i)[0, -1].numpy() for i, t in enumerate(tokens)]
            windows = sorted(w for w, _ in runner.windows)   # (window, whether its steps sample)
    if use_backend.name == "wgpu":
        assert windows == [16, 32, 40] and eager.replayed == 0
        assert runner.replayed == (12 - 3) + (16 - 3) + (7 - 3)   # slots 4..15, 16..31, 32..38
        for a, b in zip(got, whole):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(got, slices[1:]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        assert np.argmax(a) == np.argmax(b)


def test_an_interrupted_decode_step_gives_its_capture_back(wgpu_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", wgpu_backend)
    model = _model("gpt", adapters=False)
    mlp, calls = model.h[0].mlp, []
    forward = mlp.forward

    def interrupted(x, residual=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(x, residual)

    before = dict(wgpu_backend._reserved), set(wgpu_backend._held)   # (other tests' trainers may hold captures)
    with no_grad(), DecodeRunner(model, 1) as runner:
        model.forward_cached(PROMPT, runner.cache, 0)
        monkeypatch.setattr(mlp, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            for pos in range(4, 8):
                runner.step([1], pos)
        monkeypatch.delattr(mlp, "forward")
        for pos in range(5, 12):
            runner.step([1], pos)
        assert runner.replayed == 4
        held = sum(len(w.captured) + (w.ready is not None) for w in runner.windows.values())
        assert wgpu_backend._reserved != before[0] and held == 1
    assert (wgpu_backend._reserved, set(wgpu_backend._held)) == before   # nothing out of the pool once closed
