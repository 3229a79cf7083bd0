"""lab.interp's hook points, run_with_hooks / run_with_cache and the activation cache, on both model families and
both backends (tiny models: lavapipe is slow). Tolerances: 1e-5 where the hooked run takes the composed attention
and the forward the fused one (float32 sums in another order); bitwise where both run the same ops."""
import numpy as np
import pytest

import lab
from lab import lora
from lab.checks import InputError
from lab.train.optim import AdamW
from lab.train.replay import module_signature, same_signature

VOCAB = 13


def _gpt2():
    lab.manual_seed(0)
    m = lab.TransformerLM(lab.TransformerConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16))
    return _perturbed(m).eval()


def _llama():
    lab.manual_seed(0)
    cfg = lab.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                          tie_word_embeddings=False)
    return _perturbed(lab.LlamaLM(cfg)).eval()


def _perturbed(model):
    """Norm gains and biases off their init (ones, zeros), so a test that drops one of them fails."""
    rng = np.random.default_rng(1)
    state = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) if v.ndim == 1 else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


FAMILIES = {"gpt2": _gpt2, "llama": _llama}
IDS = np.array([[1, 5, 2, 7, 3], [4, 4, 9, 0, 12]])


@pytest.fixture
def on_numpy(numpy_backend):
    """The numpy backend active for the test, the previous one restored after."""
    from lab.engine import backend as B
    prev = dict(B._state)
    B._state["backend"], B._state["reason"] = numpy_backend, "test"
    yield numpy_backend
    B._state.update(prev)


@pytest.fixture(params=sorted(FAMILIES))
def model(request, use_backend):
    return FAMILIES[request.param]()


def _n_layers(model):
    return len(model._hook_layers())


def _width(model):
    return model.config.n_embd if isinstance(model, lab.TransformerLM) else model.config.hidden_size


def test_cached_activations_equal_the_forwards_intermediates(model):
    logits_ref, attentions, hidden = model(IDS, return_attention=True, return_hidden=True)
    logits, cache = model.run_with_cache(IDS)
    assert set(cache) == set(model.hook_names())
    assert all(a.dtype == np.float32 for a in cache.values())
    # every attention insides cached: the composed path, against the fused forward's logits
    np.testing.assert_allclose(logits.numpy(), logits_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(cache["blocks.0.hook_resid_pre"], hidden[0].numpy(), atol=1e-6)
    for i in range(_n_layers(model)):
        np.testing.assert_allclose(cache[f"blocks.{i}.hook_resid_post"], hidden[i + 1].numpy(), atol=1e-5)
        np.testing.assert_allclose(cache[f"blocks.{i}.attn.hook_pattern"], attentions[i].numpy(), atol=1e-6)
        np.testing.assert_allclose(cache[f"blocks.{i}.hook_resid_mid"] + cache[f"blocks.{i}.hook_mlp_out"],
                                   cache[f"blocks.{i}.hook_resid_post"], atol=1e-6)
    B, T = IDS.shape
    H = model.config.n_head if hasattr(model.config, "n_head") else model.config.num_attention_heads
    Hkv = getattr(model.config, "num_key_value_heads", H)
    assert cache["blocks.1.attn.hook_q"].shape[:3] == (B, T, H)
    assert cache["blocks.1.attn.hook_k"].shape[:3] == cache["blocks.1.attn.hook_v"].shape[:3] == (B, T, Hkv)
    assert cache["blocks.1.attn.hook_attn_scores"].shape == (B, H, T, T)
    assert cache["blocks.1.attn.hook_attn_scores"][0, 0, 0, 1] <= -1e29   # masked before the softmax
    head = model._head(lab.tensor(cache["ln_final.hook_normalized"])).numpy()
    np.testing.assert_allclose(head, logits.numpy(), atol=1e-5)


def test_a_hook_returning_its_input_changes_nothing(model):
    ref = model(IDS).numpy()
    # points whose hooked path is the forward's own ops: bitwise
    same_path = lambda n: not any(s in n for s in ("attn.hook_", "hook_resid_mid", "mlp.hook_pre", "pos_embed"))
    out = model.run_with_hooks(IDS, [(same_path, lambda x, name: x)]).numpy()
    np.testing.assert_array_equal(out, ref)
    every = model.run_with_hooks(IDS, [(lambda n: True, lambda x, name: x)]).numpy()
    np.testing.assert_allclose(every, ref, atol=1e-5)
    arrays = model.run_with_hooks(IDS, [(lambda n: True, lambda x, name: x.numpy())]).numpy()
    np.testing.assert_allclose(arrays, ref, atol=1e-5)


def test_hooks_run_in_hook_names_order(on_numpy):
    for make in FAMILIES.values():
        m = make()
        seen = []
        m.run_with_hooks(IDS, [(lambda n: True, lambda x, name: seen.append(name))])
        assert seen == m.hook_names()


def _out_proj(model, layer):
    attn = model._hook_layers()[layer][1]
    return attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj


def test_zero_ablating_a_head_via_hook_z_equals_removing_its_contribution_by_hand(model):
    _, clean = model.run_with_cache(IDS, names_filter=["blocks.1.attn.hook_z"])
    z = clean["blocks.1.attn.hook_z"].copy()                                  # (B, T, H, D)

    def ablate(x, name):
        zeroed = x.numpy().copy()
        zeroed[:, :, 1] = 0
        return zeroed
    with model.hooks([("blocks.1.attn.hook_z", ablate)]):
        _, ablated = model.run_with_cache(IDS, names_filter="blocks.1.hook_attn_out")
    z[:, :, 1] = 0
    proj = _out_proj(model, 1)
    by_hand = z.reshape(*z.shape[:2], -1) @ proj.weight.numpy()
    if proj.bias is not None:
        by_hand = by_hand + proj.bias.numpy()
    np.testing.assert_allclose(ablated["blocks.1.hook_attn_out"], by_hand, atol=1e-5)
    _, normal = model.run_with_cache(IDS, names_filter="blocks.1.hook_attn_out")
    assert np.abs(normal["blocks.1.hook_attn_out"] - by_hand).max() > 1e-4   # the head did contribute


def test_unknown_hook_name_lists_valid_names_nearest_first(on_numpy):
    m = _gpt2()
    with pytest.raises(InputError) as e:
        m.run_with_hooks(IDS, [("blocks.1.hook_resid_psot", lambda x, n: None)])
    msg = str(e.value)
    assert "'blocks.1.hook_resid_psot'" in msg
    listed = msg.split("nearest first: ")[1]
    assert listed.startswith("blocks.1.hook_resid_post, ")
    with pytest.raises(InputError, match="unknown hook name 'blocks.9.hook_z'"):
        m.run_with_cache(IDS, names_filter=["blocks.9.hook_z"])
    with pytest.raises(InputError, match="hook_pos_embed"):   # GPT-2 only: Llama has no position embedding
        _llama().run_with_hooks(IDS, [("hook_pos_embed", lambda x, n: None)])
    assert not m.has_hooks and "_hooks" not in vars(m.h[1])


def test_fwd_hooks_given_as_a_dict_is_refused_as_a_dict(on_numpy):
    """{name: fn} was iterated for its names, and the error quoted the first name as the bad (name, fn) pair."""
    m = _gpt2()
    with pytest.raises(InputError, match=r"got a dict \{'blocks.0.hook_resid_pre': .*list\(fwd_hooks.items\(\)\)"):
        m.run_with_hooks(IDS, {"blocks.0.hook_resid_pre": lambda x, n: None})
    assert not m.has_hooks


def test_a_hook_returning_the_wrong_shape_names_the_hook_and_both_shapes(model):
    def wrong(x, name):
        return np.zeros((2, 5, 3), np.float32)
    with pytest.raises(InputError) as e:
        model.run_with_hooks(IDS, [("blocks.0.hook_mlp_out", wrong)])
    msg = str(e.value)
    assert "hook wrong at blocks.0.hook_mlp_out" in msg and "(2, 5, 3)" in msg and "(2, 5, 16)" in msg
    with pytest.raises(InputError, match="returned 'oops'"):
        model.run_with_hooks(IDS, [("blocks.0.hook_resid_post", lambda x, n: "oops")])
    assert not model.has_hooks
    np.testing.assert_array_equal(model(IDS).numpy(), model(IDS).numpy())


def test_names_filter_keeps_only_the_requested_activations(on_numpy):
    m = _llama()
    _, one = m.run_with_cache(IDS, names_filter="blocks.1.hook_resid_post")
    assert list(one) == ["blocks.1.hook_resid_post"]
    _, some = m.run_with_cache(IDS, names_filter=["blocks.0.attn.hook_pattern", "hook_embed"])
    assert list(some) == ["hook_embed", "blocks.0.attn.hook_pattern"]   # forward order
    _, picked = m.run_with_cache(IDS, names_filter=lambda n: n.endswith("hook_resid_pre"))
    assert list(picked) == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    with pytest.raises(KeyError, match="was not cached.*names_filter"):
        picked["blocks.0.hook_resid_post"]
    with pytest.raises(InputError, match="names_filter must be"):
        m.run_with_cache(IDS, names_filter=3)
    # nothing cached is held by the model after
    assert not any("_hooks" in vars(mod) for mod in m.modules())


def test_a_hook_that_raises_leaves_the_model_usable(model):
    ref = model(IDS).numpy()
    signature = module_signature(model)

    def boom(x, name):
        raise RuntimeError("hook failed")
    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_hooks(IDS, [("blocks.1.attn.hook_pattern", boom), ("blocks.0.hook_resid_post", boom)])
    assert not model.has_hooks and not any("_hooks" in vars(m) for m in model.modules())
    assert same_signature(module_signature(model), signature)
    np.testing.assert_array_equal(model(IDS).numpy(), ref)


def test_hooks_are_part_of_the_replay_signature(on_numpy):
    # a step captured without hooks is never replayed with them (and the reverse)
    m = _gpt2()
    before = module_signature(m)
    with m.hooks([("blocks.0.hook_resid_post", lambda x, n: x)]):
        assert m.has_hooks and not same_signature(module_signature(m), before)
    assert same_signature(module_signature(m), before)


def test_nested_hook_blocks_each_remove_their_own(on_numpy):
    m = _gpt2()
    seen = []
    with m.hooks([("blocks.0.hook_resid_post", lambda x, n: seen.append("outer"))]):
        with m.hooks([("blocks.0.hook_resid_post", lambda x, n: seen.append("inner"))]):
            m(IDS)
        m(IDS)
    m(IDS)
    assert seen == ["outer", "inner", "outer"]


def test_gradients_through_a_hook_replacement_match_finite_differences(model):
    C = _width(model)
    rng = np.random.default_rng(3)
    steer0 = rng.normal(0, 0.5, C).astype(np.float32)
    targets = np.roll(IDS, -1, axis=1)

    def loss_of(steer):
        with model.hooks([("blocks.0.hook_resid_mid", lambda x, n: x + steer),
                          ("blocks.1.attn.hook_v", lambda x, n: x * 1.5)]):
            return model(IDS, targets=targets)[1]
    steer = lab.tensor(steer0, requires_grad=True)
    loss_of(steer).backward()
    grad = steer.grad.numpy()
    assert np.abs(grad).max() > 1e-4
    eps = 1e-2
    for j in rng.choice(C, 4, replace=False):
        e = np.zeros(C, np.float32)
        e[j] = eps
        fd = (loss_of(lab.tensor(steer0 + e)).item() - loss_of(lab.tensor(steer0 - e)).item()) / (2 * eps)
        # central differences of a float32 loss: the error is ~eps^2 curvature plus rounding / eps
        assert abs(fd - grad[j]) < 2e-3 + 2e-2 * abs(fd), (j, fd, grad[j])


def test_a_steering_vector_hook_trains(model):
    C = _width(model)
    weights = {k: v.copy() for k, v in model.state_dict().items()}
    steer = lab.tensor(np.zeros(C, np.float32), requires_grad=True)
    opt = AdamW([steer], lr=0.5, weight_decay=0.0)
    target = np.full_like(IDS, 3)
    losses = []
    with model.hooks([("blocks.1.hook_resid_post", lambda x, n: x + steer)]):
        for _ in range(20):
            opt.zero_grad()
            loss = model(IDS, targets=target)[1]
            loss.backward()
            opt.step()
            losses.append(loss.item())
        steered = model(IDS).numpy()
    # (a tiny model's tied head caps how low the loss goes: the prediction is what the vector can change)
    assert losses[-1] < losses[0] - 0.2, losses
    assert (steered.argmax(-1) == 3).all() and not (model(IDS).numpy().argmax(-1) == 3).all()
    assert all(np.array_equal(v, weights[k]) for k, v in model.state_dict().items())   # only the vector trained
    assert not model.has_hooks


def test_hooks_see_each_new_position_in_kv_cache_generation(model):
    seen = []
    prompt = [1, 5, 2]

    def record(x, name):
        seen.append(x.shape)
    steer = np.linspace(-2, 2, _width(model)).astype(np.float32)
    hooks = [("blocks.0.hook_resid_post", record), ("blocks.1.hook_resid_pre", lambda x, n: x + steer),
             ("blocks.0.attn.hook_pattern", lambda x, n: None)]
    with model.hooks(hooks):
        cached = lab.generate(model, prompt, 6, greedy=True)
        steps = list(seen)
        seen.clear()
        full = lab.generate(model, prompt, 6, greedy=True, use_cache=False)
    plain = lab.generate(model, prompt, 6, greedy=True)
    C = steps[0][-1]
    assert steps == [(1, 3, C)] + [(1, 1, C)] * 5   # the prefill, then one position per decode step
    assert list(cached) == list(full)               # the hooks act on the cached steps as on full forwards
    assert list(cached) != list(plain)              # (the steering changes what is generated)


def test_decode_runner_steps_run_the_hooks_eagerly(model):
    from lab.decode import DecodeRunner
    seen = []
    with model.hooks([("blocks.1.hook_resid_post", lambda x, n: seen.append(n))]):
        with DecodeRunner(model, 1) as runner:
            model.forward_cached(np.array([[1, 2]]), runner.cache, 0)
            for pos in range(2, 9):
                runner.step([3], pos)
            assert runner.replayed == 0
    assert len(seen) == 8


@pytest.mark.parametrize("enabled", [True, False])
def test_hooks_with_lora_adapters_on_or_off(model, enabled):
    lora.apply(model, r=2, alpha=4, targets="all-linear")
    rng = np.random.default_rng(5)
    model.load_state_dict({k: (rng.normal(0, 0.3, v.shape).astype(np.float32) if "lora_B" in k else v)
                           for k, v in model.state_dict().items()})
    model.use_adapter(enabled)
    logits_ref, hidden = model(IDS, return_hidden=True)
    logits, cache = model.run_with_cache(IDS)
    np.testing.assert_allclose(logits.numpy(), logits_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(cache["blocks.1.hook_resid_post"], hidden[2].numpy(), atol=1e-5)
    heads, proj = cache.stack_head_results(), _out_proj(model, 1)   # each head through the adapted projection
    bias = proj.bias.numpy() if proj.bias is not None else 0
    np.testing.assert_allclose(heads[len(heads) // 2:].sum(0) + bias, cache["blocks.1.hook_attn_out"], atol=1e-5)
    model.use_adapter(not enabled)
    other = model(IDS).numpy()
    assert np.abs(other - logits.numpy()).max() > 1e-4   # the switch matters, and the hooks saw this setting's


def test_head_results_biases_mlps_and_embeddings_sum_to_the_last_residual(model):
    _, cache = model.run_with_cache(IDS)
    L = _n_layers(model)
    heads, labels = cache.stack_head_results(return_labels=True)
    H = len(heads) // L
    assert heads.shape == (L * H,) + IDS.shape + (_width(model),) and labels[:H + 1] == [f"L0H{h}" for h in range(H)] + ["L1H0"]
    biases = [_out_proj(model, i).bias.numpy() if _out_proj(model, i).bias is not None else 0 for i in range(L)]
    for i in range(L):   # a layer's heads and its output bias make its attention output
        np.testing.assert_allclose(heads[i * H:(i + 1) * H].sum(0) + biases[i], cache[f"blocks.{i}.hook_attn_out"],
                                   atol=1e-5)
    embeds = [cache[n] for n in ("hook_embed", "hook_pos_embed") if n in cache]
    mlps = [cache[f"blocks.{i}.hook_mlp_out"] for i in range(L)]
    final = cache[f"blocks.{L - 1}.hook_resid_post"]
    np.testing.assert_allclose(sum(embeds) + heads.sum(0) + sum(biases) + sum(mlps), final, atol=1e-5)
    stack, names = cache.accumulated_resid(return_labels=True)
    assert names == [f"{i}_pre" for i in range(L)] + ["final_post"]
    np.testing.assert_array_equal(stack[-1], final)
    np.testing.assert_array_equal(stack[1], cache["blocks.1.hook_resid_pre"])
    assert cache.accumulated_resid(incl_mid=True).shape[0] == 2 * L + 1
    # the final norm as a linear map with the run's scale: the components' images and the bias make its output
    parts = np.concatenate([np.stack(embeds), heads, np.stack(mlps)]
                           + [np.broadcast_to(np.asarray(b, np.float32), final.shape)[None] for b in biases])
    norm = model._final_norm()
    bias = norm.bias.numpy() if getattr(norm, "bias", None) is not None else 0
    np.testing.assert_allclose(cache.apply_ln_to_stack(parts).sum(0) + bias, cache["ln_final.hook_normalized"],
                               atol=1e-5)
    np.testing.assert_allclose(cache.accumulated_resid(apply_ln=True)[-1], cache["ln_final.hook_normalized"],
                               atol=1e-5)
    with pytest.raises(InputError, match="trailing dims"):
        cache.apply_ln_to_stack(parts[:, :, :2])
    with pytest.raises(InputError, match="layer"):
        cache.stack_head_results(layer=L + 1)


def test_logit_lens_last_layer_is_the_models_prediction(model):
    logits = model(IDS).numpy()
    lens = lab.interp.logit_lens(model, IDS, k=3)
    L = _n_layers(model)
    assert lens.labels == ["embed"] + [f"L{i}" for i in range(L)]
    assert lens.top_ids.shape == lens.top_probs.shape == (L + 1,) + IDS.shape + (3,)
    assert lens.final_rank.shape == (L + 1,) + IDS.shape
    np.testing.assert_array_equal(lens.top_ids[-1, ..., 0], logits.argmax(-1))
    assert (lens.final_rank[-1] == 0).all()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(lens.top_probs[-1], -np.sort(-probs, -1)[..., :3], atol=1e-5)
    assert (np.diff(lens.top_probs, axis=-1) <= 0).all()
    _, cache = model.run_with_cache(IDS, names_filter=lambda n: "resid" in n)
    same = cache.logit_lens(k=3)
    np.testing.assert_array_equal(same.top_ids, lens.top_ids)
    for j in range(L + 1):   # each read-out's ranks and top-k from its full log-probabilities
        lp = lab.interp.layer_logits(model, cache, j)
        final = logits.argmax(-1)[..., None]
        np.testing.assert_array_equal(lens.final_rank[j], (lp > np.take_along_axis(lp, final, -1)).sum(-1))
        np.testing.assert_allclose(lens.top_probs[j], np.exp(np.take_along_axis(lp, lens.top_ids[j], -1)), atol=1e-6)
    np.testing.assert_allclose(np.exp(lab.interp.layer_logits(model, cache, -1)), probs, atol=1e-5)
    with pytest.raises(InputError, match="k must be an integer >= 1"):
        lab.interp.logit_lens(model, cache, k=0)
    _, partial = model.run_with_cache(IDS, names_filter="hook_embed")
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
        lab.interp.logit_lens(model, partial)
    with pytest.raises(InputError, match="another model"):
        lab.interp.logit_lens(FAMILIES["gpt2" if isinstance(model, lab.LlamaLM) else "llama"](), cache)


def test_logit_lens_refuses_token_ids_outside_the_vocabulary_naming_its_argument(on_numpy):
    """Ids the model has no embedding for were the embedding's IndexRangeError, naming no argument of the lens."""
    model = FAMILIES["gpt2"]()
    for f in (lambda t: lab.interp.logit_lens(model, t), lambda t: lab.interp.layer_logits(model, t, 0)):
        with pytest.raises(InputError, match=rf"tokens \(or an ActivationCache\): token id 99 is outside the "
                                             rf"model's vocabulary \(0..{VOCAB - 1}\)"):
            f(np.array([1, 99]))
        with pytest.raises(InputError, match="tokens .or an ActivationCache. must be integer token ids"):
            f("some text")


def test_cache_helpers_take_a_numpy_minus_one_as_every_layer(on_numpy):
    """layer=-1 means the whole stream; an np.int64(-1) (a layer index from numpy) was refused as out of 0..L."""
    model = FAMILIES["llama"]()
    _, cache = model.run_with_cache(IDS)
    np.testing.assert_array_equal(cache.accumulated_resid(np.int64(-1)), cache.accumulated_resid(-1))
    np.testing.assert_array_equal(cache.stack_head_results(np.int32(-1)), cache.stack_head_results(None))
    with pytest.raises(InputError, match="layer"):
        cache.accumulated_resid(True)


def test_hooked_gradients_with_gradient_checkpointing_equal_the_plain_ones(model):
    # a checkpointed block runs again in the backward, after run_with_hooks has taken the hooks off
    targets = np.roll(IDS, -1, axis=1)

    def grads(checkpointed):
        model.gradient_checkpointing_enable() if checkpointed else model.gradient_checkpointing_disable()
        model.train()
        for p in model.parameters():
            p.grad = None
        steer = lab.tensor(np.linspace(-1, 1, _width(model)).astype(np.float32), requires_grad=True)
        calls = []
        loss = model.run_with_hooks(IDS, [("blocks.0.hook_resid_mid", lambda x, n: calls.append(n) or x * 2 + steer)],
                                    targets=targets)[1]
        loss.backward()
        return [p.grad.numpy() for p in model.parameters()] + [steer.grad.numpy()], len(calls)
    plain, plain_calls = grads(False)
    checkpointed, calls = grads(True)
    assert calls == plain_calls == 1
    for a, b in zip(plain, checkpointed):
        np.testing.assert_array_equal(a, b)


def test_training_steps_under_hooks_run_every_hook(use_backend):
    # on wgpu a Trainer replays captured steps; while hooked each step is eager, so each runs the hook functions
    from lab.train import TrainConfig, Trainer
    model = _gpt2()
    ids = np.random.default_rng(0).integers(0, VOCAB, 400)
    trainer = Trainer(model, ids, ids, TrainConfig(steps=20, batch_size=2, warmup_steps=1))
    seen = []
    with model.hooks([("blocks.1.hook_mlp_out", lambda x, n: seen.append(n))]):
        for _ in range(6):
            trainer.train_step()
    assert len(seen) == 6
    if trainer.replay is not None:
        assert trainer.replay.replayed == 0 and trainer.replay.ready is None
    for _ in range(5):   # unhooked again: back to captures and replays (wgpu)
        trainer.train_step()
    assert len(seen) == 6
    if trainer.replay is not None:
        assert trainer.replay.replayed > 0


def test_run_with_cache_beside_a_training_thread_sees_only_its_own_forward(on_numpy):
    # a TrainingPanel trains in a thread; a notebook cell's run_with_cache must neither run its hooks in the
    # training steps nor cache their activations (it runs between two steps, as generation does)
    import threading
    from lab.train import TrainConfig, Trainer
    model = _gpt2()
    data = np.random.default_rng(0).integers(0, VOCAB, 400)
    trainer = Trainer(model, data, data, TrainConfig(steps=400, batch_size=4, warmup_steps=1))
    stop = threading.Event()

    def train():
        while not stop.is_set():
            trainer.train_step()
    thread = threading.Thread(target=train)
    thread.start()
    try:
        for _ in range(15):
            seen = []
            model.run_with_hooks(IDS, [("blocks.1.hook_mlp_out", lambda x, n: seen.append(x.shape))])
            _, cache = model.run_with_cache(IDS, names_filter="blocks.0.hook_resid_post")
            assert seen == [IDS.shape + (16,)]
            assert cache["blocks.0.hook_resid_post"].shape == IDS.shape + (16,)
    finally:
        stop.set()
        thread.join()
