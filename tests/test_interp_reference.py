"""lab.interp's hooks held against a forward written out by hand in float64 numpy (not the model's own ops), on
each family variant (GPT-2 with learned or sinusoidal positions, with and without biases; Llama with GQA, tied
or untied head, Qwen2's q/k/v bias), and the hostile inputs a hook, a names_filter or the cache's helpers may
get. Tiny models: lavapipe is slow."""
import numpy as np
import pytest

import lab
from lab.checks import InputError
from lab.models.llama import rope_tables

IDS = np.array([[1, 5, 2, 7, 3], [4, 4, 9, 0, 12]])
VARIANTS = {
    "gpt2-learned": lambda: lab.TransformerLM(lab.TransformerConfig(vocab_size=13, block_size=16, n_layer=2,
                                                                    n_head=2, n_embd=16)),
    "gpt2-sinusoidal-nobias": lambda: lab.TransformerLM(lab.TransformerConfig(
        vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16, positions="sinusoidal", bias=False)),
    "llama-gqa-untied": lambda: lab.LlamaLM(lab.LlamaConfig(
        vocab_size=13, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)),
    "qwen2-qkv-bias-tied-mqa": lambda: lab.LlamaLM(lab.LlamaConfig(
        vocab_size=13, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=16, architecture="Qwen2ForCausalLM")),
}


@pytest.fixture
def numpy_active(numpy_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)


def _made(variant):
    lab.manual_seed(0)
    m = VARIANTS[variant]()
    rng = np.random.default_rng(1)   # norm gains and biases off their init, so a dropped one shows
    m.load_state_dict({k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) if v.ndim == 1 else v
                       for k, v in m.state_dict().items()})
    return m.eval()


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _attention(out, i, q, k, v, o_weight, o_bias):
    """The attention's hook values from q (B, T, H, D), k, v (B, T, Hkv, D); returns its output."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out[f"blocks.{i}.attn.hook_q"], out[f"blocks.{i}.attn.hook_k"], out[f"blocks.{i}.attn.hook_v"] = q, k, v
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)                   # query head h reads kv head h // G
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D) + np.triu(np.full((T, T), -1e30), 1)
    out[f"blocks.{i}.attn.hook_attn_scores"] = s
    out[f"blocks.{i}.attn.hook_pattern"] = a = _softmax(s)
    out[f"blocks.{i}.attn.hook_z"] = z = np.einsum("bhts,bshd->bthd", a, v)
    out[f"blocks.{i}.hook_attn_out"] = y = z.reshape(B, T, H * D) @ o_weight + o_bias
    return y


def _reference(m, ids):
    """(logits, {hook name: float64 activation}) of a forward written out from the state dict."""
    sd = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    B, T = ids.shape
    out = {}
    if isinstance(m, lab.TransformerLM):
        c = m.config
        bias = lambda k: sd.get(k, 0.0)
        ln = lambda x, p: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
                           * sd[p + ".weight"] + bias(p + ".bias"))
        pe = sd["wpe.weight"][:T] if c.positions == "learned" else lab.nn.sinusoidal_positions(T, c.n_embd)
        out["hook_embed"], out["hook_pos_embed"] = sd["wte.weight"][ids], np.broadcast_to(pe, (B, T, c.n_embd))
        x = out["hook_embed"] + pe
        H, D = c.n_head, c.n_embd // c.n_head
        norms, head = ("ln_1", "ln_2"), sd["wte.weight"].T
        final = lambda x: ln(x, "ln_f")
    else:
        c = m.config
        bias = lambda k: sd.get(k, 0.0)
        ln = lambda x, p: x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * sd[p + ".weight"]
        cos, sin = (t[:T].astype(np.float64)[None, :, None] for t in rope_tables(c, T))
        rot = lambda x: x * cos + np.concatenate([-x[..., c.head_dim // 2:], x[..., :c.head_dim // 2]], -1) * sin
        out["hook_embed"] = x = sd["model.embed_tokens.weight"][ids]
        head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"].T
        final = lambda x: ln(x, "model.norm")
    for i in range(len(m._hook_layers())):
        out[f"blocks.{i}.hook_resid_pre"] = x
        if isinstance(m, lab.TransformerLM):
            p = f"h.{i}."
            out[f"blocks.{i}.ln1.hook_normalized"] = h = ln(x, p + "ln_1")
            q, k, v = (t.reshape(B, T, H, D) for t in np.split(h @ sd[p + "attn.c_attn.weight"]
                                                                + bias(p + "attn.c_attn.bias"), 3, -1))
            a = _attention(out, i, q, k, v, sd[p + "attn.c_proj.weight"], bias(p + "attn.c_proj.bias"))
        else:
            p = f"model.layers.{i}."
            out[f"blocks.{i}.ln1.hook_normalized"] = h = ln(x, p + "input_layernorm")
            proj = lambda n, heads: (h @ sd[p + f"self_attn.{n}.weight"] + bias(p + f"self_attn.{n}.bias")).reshape(
                B, T, heads, c.head_dim)
            Hkv = c.num_key_value_heads
            a = _attention(out, i, rot(proj("q_proj", c.num_attention_heads)), rot(proj("k_proj", Hkv)),
                           proj("v_proj", Hkv), sd[p + "self_attn.o_proj.weight"], bias(p + "self_attn.o_proj.bias"))
        out[f"blocks.{i}.hook_resid_mid"] = x = x + a
        if isinstance(m, lab.TransformerLM):
            out[f"blocks.{i}.ln2.hook_normalized"] = h = ln(x, p + "ln_2")
            out[f"blocks.{i}.mlp.hook_pre"] = g = h @ sd[p + "mlp.c_fc.weight"] + bias(p + "mlp.c_fc.bias")
            post = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
            down = p + "mlp.c_proj"
        else:
            out[f"blocks.{i}.ln2.hook_normalized"] = h = ln(x, p + "post_attention_layernorm")
            out[f"blocks.{i}.mlp.hook_pre"] = g = h @ sd[p + "mlp.gate_proj.weight"] + bias(p + "mlp.gate_proj.bias")
            post = g / (1 + np.exp(-g)) * (h @ sd[p + "mlp.up_proj.weight"] + bias(p + "mlp.up_proj.bias"))
            down = p + "mlp.down_proj"
        out[f"blocks.{i}.mlp.hook_post"] = post
        out[f"blocks.{i}.hook_mlp_out"] = mo = post @ sd[down + ".weight"] + bias(down + ".bias")
        out[f"blocks.{i}.hook_resid_post"] = x = x + mo
    out["ln_final.hook_normalized"] = h = final(x)
    return h @ head, out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_cached_activation_equals_a_forward_written_out_by_hand(use_backend, variant):
    m = _made(variant)
    logits_ref, ref = _reference(m, IDS)
    logits, cache = m.run_with_cache(IDS)
    assert list(cache) == m.hook_names() and set(cache) == set(ref)
    for name, want in ref.items():
        got = cache[name]
        assert got.shape == np.shape(want), name
        if name.endswith("hook_attn_scores"):   # the masked slots: -1e30 plus a score, in float32
            masked = np.broadcast_to(np.triu(np.ones((5, 5), bool), 1), got.shape)
            assert (got[masked] < -1e29).all()
            got, want = got[~masked], want[~masked]
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(logits.numpy(), logits_ref, atol=2e-5)
    np.testing.assert_allclose(m(IDS).numpy(), logits_ref, atol=2e-5)


@pytest.mark.parametrize("variant", ["gpt2-learned", "llama-gqa-untied"])
def test_a_hooks_replacement_of_another_dtype_or_backend_or_a_boolean_is_one_clear_error(use_backend, variant):
    m = _made(variant)
    ref = m(IDS).numpy()
    other = "numpy" if use_backend.name != "numpy" else None
    cases = [(lambda x, n: lab.tensor(x.numpy(), dtype="float16", backend=x.backend), "float16 Tensor"),
             (lambda x, n: x.numpy() > 0, "returned array")]
    if other:   # a replacement that needs a gradient cannot cross backends: Tensor.to makes a new leaf
        steer = lab.tensor(np.zeros(16, np.float32), requires_grad=True, backend=other)
        cases.append((lambda x, n: x.to(other) + steer, "gradients do not cross backends"))
    for fn, message in cases:
        with pytest.raises(InputError, match=message) as e:
            m.run_with_hooks(IDS, [("blocks.0.hook_resid_mid", fn)])
        assert "at blocks.0.hook_resid_mid" in str(e.value)
        assert not m.has_hooks
    # what is allowed: arrays of any float or integer dtype, any layout, cast to the activation's float32
    for fn in (lambda x, n: x.numpy().astype(np.float64), lambda x, n: np.asfortranarray(x.numpy()),
               lambda x, n: x.numpy()[..., ::-1].copy()[..., ::-1]):
        np.testing.assert_allclose(m.run_with_hooks(IDS, [("blocks.0.hook_resid_mid", fn)]).numpy(), ref, atol=1e-5)
    zeros = m.run_with_hooks(IDS, [("blocks.0.hook_mlp_out", lambda x, n: np.zeros(x.shape, np.int64))]).numpy()
    floats = m.run_with_hooks(IDS, [("blocks.0.hook_mlp_out", lambda x, n: np.zeros(x.shape, np.float32))]).numpy()
    np.testing.assert_array_equal(zeros, floats)
    if other:   # no gradient wanted: the values move
        with lab.no_grad():
            moved = m.run_with_hooks(IDS, [("blocks.0.hook_resid_mid", lambda x, n: x.to(other))]).numpy()
        np.testing.assert_allclose(moved, ref, atol=1e-5)


def test_predicates_answering_no_boolean_are_one_clear_error(numpy_active):
    m = _made("gpt2-learned")
    for bad, shown in ((lambda n: "no", "'no'"), (lambda n: np.array([1, 0]), "array"), (lambda n: None, "None")):
        with pytest.raises(InputError, match=f"names_filter .* returned {shown}.* for 'hook_embed'.*True or False"):
            m.run_with_cache(IDS, names_filter=bad)
        with pytest.raises(InputError, match=f"fwd_hooks predicate .* returned {shown}"):
            m.run_with_hooks(IDS, [(bad, lambda x, n: None)])
        assert not m.has_hooks
    _, cache = m.run_with_cache(IDS, names_filter=lambda n: np.bool_(n.endswith("hook_q")))
    assert list(cache) == ["blocks.0.attn.hook_q", "blocks.1.attn.hook_q"]


@pytest.mark.parametrize("variant", ["gpt2-learned", "llama-gqa-untied"])
def test_a_hook_that_runs_its_own_model_is_one_clear_error_not_endless_recursion(use_backend, variant):
    m = _made(variant)
    ref = m(IDS).numpy()

    def again(x, name):
        m.run_with_cache(IDS, names_filter="blocks.1.hook_resid_pre")
    with pytest.raises(InputError, match="hook again at blocks.0.hook_resid_post runs the model while that model's "
                                         "hooks are on"):
        m.run_with_hooks(IDS, [("blocks.0.hook_resid_post", again)])
    with pytest.raises(InputError, match="hook again at hook_embed runs the model"):
        with m.hooks([("hook_embed", again)]):
            m(IDS)
    assert not m.has_hooks and not any("_hooks" in vars(mod) for mod in m.modules())
    # a hook may run another model
    other = _made(variant)
    seen = []
    m.run_with_hooks(IDS, [("hook_embed", lambda x, n: seen.append(other(IDS[:1]).shape))])
    assert seen == [(1, 5, 13)]
    np.testing.assert_array_equal(m(IDS).numpy(), ref)


@pytest.mark.parametrize("variant", ["gpt2-learned", "llama-gqa-untied"])
def test_accumulated_resid_up_to_a_layer_includes_its_resid_pre_as_transformerlens(use_backend, variant):
    m = _made(variant)
    _, cache = m.run_with_cache(IDS, names_filter=lambda n: "hook_resid" in n)
    stack, labels = cache.accumulated_resid(0, return_labels=True)
    assert labels == ["0_pre"] and stack.shape == (1, 2, 5, 16)
    np.testing.assert_array_equal(stack[0], cache["blocks.0.hook_resid_pre"])
    assert cache.accumulated_resid(1, incl_mid=True, return_labels=True)[1] == ["0_pre", "0_mid", "1_pre"]
    for layer in (2, -1, None):
        stack, labels = cache.accumulated_resid(layer, incl_mid=True, return_labels=True)
        assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
        np.testing.assert_array_equal(stack[-1], cache["blocks.1.hook_resid_post"])
    for bad in (3, -2, True, 1.5):
        with pytest.raises(InputError, match="accumulated_resid: layer"):
            cache.accumulated_resid(bad)


@pytest.mark.parametrize("variant", ["gpt2-learned", "llama-gqa-untied"])
def test_decode_steps_patterns_cover_the_positions_so_far_on_either_backend(use_backend, variant):
    # wgpu's decode steps read a fixed window of cache slots (lab.decode's FixedCache); the hooks saw it whole,
    # (1, H, 1, 16) with zeros past the step, where numpy's showed (1, H, 1, pos + 1)
    m = _made(variant)
    seen = []
    prompt = [1, 5, 2]
    with m.hooks([("blocks.1.attn.hook_pattern", lambda x, n: seen.append(x.numpy())),
                   ("blocks.1.attn.hook_attn_scores", lambda x, n: seen.append(x.shape))]):
        out = list(lab.generate(m, prompt, 4, greedy=True))
    _, cache = m.run_with_cache(np.array([prompt + out[:-1]]), names_filter="blocks.1.attn.hook_pattern")
    full = cache["blocks.1.attn.hook_pattern"]                               # (1, H, 6, 6)
    shapes, patterns = seen[0::2], seen[1::2]
    assert [p.shape[-1] for p in patterns] == [3, 4, 5, 6] and [s[-1] for s in shapes] == [3, 4, 5, 6]
    np.testing.assert_allclose(patterns[0], full[:, :, :3, :3], atol=1e-6)
    for j, p in enumerate(patterns[1:]):
        pos = len(prompt) + j
        np.testing.assert_allclose(p, full[:, :, pos:pos + 1, :pos + 1], atol=1e-6)


@pytest.mark.parametrize("variant", ["gpt2-learned", "llama-gqa-untied"])
def test_gradients_through_a_replacement_at_every_hook_point_match_finite_differences(use_backend, variant):
    m = _made(variant)
    m.load_state_dict({k: v * 4 if v.ndim == 2 else v for k, v in m.state_dict().items()})   # larger gradients
    targets = np.roll(IDS, -1, axis=1)
    nonzero = 0
    for name in m.hook_names():
        if name.endswith("hook_attn_scores"):   # scaling the -1e30 mask's slots would unmask nothing but overflow
            continue

        def loss(s):
            with m.hooks([(name, lambda x, n: x * s)]):
                return m(IDS, targets=targets)[1]
        s = lab.tensor(np.ones(1, np.float32), requires_grad=True)
        loss(s).backward()
        grad, eps = s.grad.numpy()[0], 1e-2
        fd = (loss(lab.tensor([1 + eps])).item() - loss(lab.tensor([1 - eps])).item()) / (2 * eps)
        assert abs(fd - grad) < 2e-3 + 2e-2 * abs(fd), (name, fd, grad)
        nonzero += abs(grad) > 1e-3
    assert nonzero >= len(m.hook_names()) // 2   # (a scale into a norm alone has no gradient)


@pytest.mark.parametrize("variant", ["gpt2-learned", "llama-gqa-untied"])
def test_run_with_cache_returns_the_loss_asked_for_with_targets(use_backend, variant):
    # it returned the logits alone: the loss targets= computed was dropped without a word
    m = _made(variant)
    targets = np.roll(IDS, -1, axis=1)
    (logits, loss), cache = m.run_with_cache(IDS, names_filter="hook_embed", targets=targets)
    ref_logits, ref_loss = m(IDS, targets=targets)
    np.testing.assert_array_equal(logits.numpy(), ref_logits.numpy())
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and list(cache) == ["hook_embed"]
    loss.backward()   # gradients on from a cached run: the cache holds arrays, not the graph
    assert all(isinstance(a, np.ndarray) for a in cache.values()) and m.hook_names()[0] in cache
    logits, _ = m.run_with_cache(IDS, names_filter=[])
    np.testing.assert_array_equal(logits.numpy(), ref_logits.numpy())


@pytest.mark.parametrize("variant", ["gpt2-learned", "llama-gqa-untied"])
def test_hooks_of_a_block_are_not_run_by_a_training_thread_meanwhile(use_backend, variant):
    # a cell's `with model.hooks(...)` (generating with a head ablated) while a TrainingPanel trains the model in
    # its thread: the training steps ran the cell's hooks, so the ablation trained too
    import threading
    import time
    from lab.train import TrainConfig, Trainer
    m = _made(variant)
    data = np.random.default_rng(0).integers(0, 13, 400)
    trainer = Trainer(m, data, data, TrainConfig(steps=10_000, batch_size=2, warmup_steps=1))
    steps, stop = [], threading.Event()

    def train():
        while not stop.is_set():
            trainer.train_step()
            steps.append(m.has_hooks)
    callers = []

    def ablate(x, name):
        callers.append(threading.get_ident())
        return x * 0
    thread = threading.Thread(target=train)
    thread.start()
    try:
        with m.hooks([("blocks.0.attn.hook_z", ablate)]):
            assert m.has_hooks
            before = len(steps)
            while len(steps) < before + 3 and thread.is_alive():   # training steps while the hooks are on
                time.sleep(0.01)
            lab.generate(m, [1, 2, 3], 3, greedy=True)
    finally:
        stop.set()
        thread.join()
    assert len(steps) >= before + 3 and not any(steps)
    assert callers and set(callers) == {threading.get_ident()}
    assert len(callers) == 3   # the prefill and two decode steps
