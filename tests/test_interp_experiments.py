"""lab.interp's experiments (activation patching, direct logit attribution, induction scores) on tiny models whose
answers are known by construction: the identities patching must satisfy, the final norm's bias as the only part of
a logit difference no component writes, and a hand-built induction head."""
import numpy as np
import pytest

import lab
from lab.checks import InputError
from lab.interp import experiments
from lab.interp import activation_patching, direct_logit_attribution, induction_scores

V, T = 11, 7


def randomized(model, seed=0):
    """The model with weights large enough that logit differences stand well above float32 rounding (the default
    init's 0.02 makes them ~1e-3); norm gains stay near 1, norm biases random."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in model.state_dict().items():
        norm = any(k in name for k in ("ln_", "norm", "layernorm")) and name.endswith("weight")
        state[name] = (1 + 0.1 * rng.standard_normal(value.shape) if norm
                       else 0.5 * rng.standard_normal(value.shape)).astype(np.float32)
    model.load_state_dict(state)
    return model.eval()


def tiny(family):
    if family == "gpt2":
        return randomized(lab.TransformerLM(lab.TransformerConfig(vocab_size=V, block_size=8, n_layer=2, n_head=4,
                                                                  n_embd=32)))
    # grouped-query attention and an untied head: the head's own columns are the unembedding
    return randomized(lab.LlamaLM(lab.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=8, tie_word_embeddings=False)))


def prompts(p=2):
    """A clean prompt and a corrupted one differing at position p only."""
    clean = np.array([[1, 4, 2, 8, 5, 7, 3]])
    corrupted = clean.copy()
    corrupted[0, p] = 9
    return clean, corrupted


def answers(model, clean, corrupted):
    """answer: the clean run's top prediction at the last position; wrong: the corrupted run's (else the
    second best), so the two runs' differences are far apart."""
    with lab.no_grad():
        a, b = model(clean).numpy()[0, -1], model(corrupted).numpy()[0, -1]
    answer = int(a.argmax())
    wrong = int(b.argmax()) if b.argmax() != answer else int(np.argsort(a)[-2])
    return answer, wrong


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_patching_the_changed_position_or_the_last_residual_restores_the_clean_run(use_backend, family, monkeypatch):
    model = tiny(family)
    p = 2
    clean, corrupted = prompts(p)
    answer, wrong = answers(model, clean, corrupted)
    with lab.no_grad():
        clean_last = model(clean).numpy()[:, -1]
    # the prompts differ at p alone: layer 0's input there is the whole difference; elsewhere it is the same
    first = activation_patching(model, clean, corrupted, answer, wrong, hook="resid_pre")
    assert first.values.shape == (2, T) and first.labels == ["L0", "L1"] and first.positions == list(range(T))
    expected = np.zeros(T)
    expected[p] = 1
    # (tolerance: a patched batch of T rows rounds its matmuls apart from the single clean row, ~1e-6 relative)
    np.testing.assert_allclose(first.values[0], expected, atol=1e-4)
    np.testing.assert_allclose(first.patched_logits(0, p), clean_last, rtol=1e-4, atol=1e-4)
    assert abs(first.clean_diff - first.corrupted_diff) > 0.1
    # the cells split over several forwards (3 copies of the prompt each, across layers) give the same values
    monkeypatch.setattr(experiments, "_PATCH_BYTES", 3 * 4 * T * V)
    split = activation_patching(model, clean, corrupted, answer, wrong, hook="resid_pre")
    np.testing.assert_allclose(split.values, first.values, rtol=1e-4, atol=1e-4)   # (batch-size rounding)
    monkeypatch.undo()
    # the last layer's output at the last position is all the last logits read
    last = activation_patching(model, clean, corrupted, answer, wrong, hook="resid_post")
    expected = np.zeros(T)
    expected[-1] = 1
    np.testing.assert_allclose(last.values[-1], expected, atol=1e-4)
    np.testing.assert_allclose(last.patched_logits(-1, -1), clean_last, rtol=1e-4, atol=1e-4)
    # positions before the changed one carry the same activations in both runs at every layer and hook
    for hook in ("attn_out", "mlp_out"):
        some = activation_patching(model, clean, corrupted, answer, wrong, hook=hook, positions=[0, 1, -1])
        assert some.positions == [0, 1, T - 1] and some.values.shape == (2, 3)
        np.testing.assert_allclose(some.values[:, :2], 0, atol=1e-4)


def test_patching_prompts_the_model_cannot_tell_apart_is_one_clear_error():
    model = tiny("gpt2")
    clean, _ = prompts()
    with pytest.raises(InputError, match="same logit difference"):
        activation_patching(model, clean, clean.copy(), 1, 2)
    with pytest.raises(InputError, match="wrong_id 3 is answer_id itself"):   # both differences would be 0
        activation_patching(model, *prompts(), 3, 3)


@pytest.mark.parametrize("args, kwargs, message", [
    ((np.zeros((1, 7), int), np.zeros((1, 6), int), 1, 2), {}, r"clean_tokens \(1, 7\) and corrupted_tokens \(1, 6\)"),
    ((*prompts(), V, 2), {}, r"answer_id must be an integer >= 0 and <= 10, got 11"),
    ((*prompts(), 1, -1), {}, r"wrong_id must be an integer >= 0 and <= 10, got -1"),
    ((*prompts(), 1, 2), {"hook": "resid_mid"}, r"hook must be one of \['resid_pre', 'attn_out', 'mlp_out', "),
    ((*prompts(), 1, 2), {"positions": [7]}, r"positions must be an integer >= -7 and <= 6, got 7"),
    ((*prompts(), 1, 2), {"positions": []}, r"positions must be a non-empty list"),
    ((np.array([[1, 2, 99]]), np.array([[1, 2, 3]]), 1, 2), {}, r"clean_tokens: token id 99 is outside .*0\.\.10"),
    ((np.array([[1.0, 2.0]]), np.array([[1, 2]]), 1, 2), {}, r"clean_tokens must be integer token ids"),
    (([[1, 2, 3], [1, 2]], [[1, 2, 3], [1, 2, 4]], 1, 2), {}, r"clean_tokens must be integer token ids"),
    ((*prompts(), 1, 2), {"hook": ["resid_pre"]}, r"hook must be one of"),
    ((*prompts(), 1, None), {}, r"wrong_id must be an integer >= 0 and <= 10, got None"),
])
def test_patching_refuses_bad_input_with_one_clear_error(args, kwargs, message):
    with pytest.raises(InputError, match=message):
        activation_patching(tiny("gpt2"), *args, **kwargs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_attribution_leaves_only_the_final_norms_bias_unattributed(use_backend, family):
    model = tiny(family)
    tokens = np.array([[1, 4, 2, 8, 5, 7, 3], [2, 2, 6, 0, 1, 9, 10]])
    answer, wrong = [3, 5], [7, 7]
    dla = direct_logit_attribution(model, tokens, answer, wrong, pos=-2)
    with lab.no_grad():
        logits = model(tokens).numpy()[:, -2]
    diff = np.mean(logits[[0, 1], answer] - logits[[0, 1], wrong])
    assert dla.heads.shape == (2, 4) and np.asarray(dla).shape == (2, 4) and dla.mlp.shape == (2,)
    assert dla.labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    assert dla.logit_diff == pytest.approx(diff, rel=1e-5, abs=1e-5)
    # every component's share sums to the difference but for the final norm's bias (LayerNorm's; RMSNorm has none)
    if family == "gpt2":
        W = model.wte.weight.numpy()
        bias_term = np.mean((W[answer] - W[wrong]) @ model.ln_f.bias.numpy())
        assert abs(bias_term) > 0.1          # (the randomized bias makes it a real part of the difference)
    else:
        bias_term = 0.0
    scale = float(1 + abs(diff) + np.abs(dla.heads).sum() + np.abs(dla.mlp).sum())   # float32 sums of many terms
    assert dla.rest == pytest.approx(bias_term, abs=1e-5 * scale)
    assert dla.total() == pytest.approx(diff, abs=1e-5 * scale)
    # with no wrong id, the answer's own logit
    alone = direct_logit_attribution(model, tokens[:1], 3)
    assert alone.logit_diff == pytest.approx(float(model(tokens[:1]).numpy()[0, -1, 3]), rel=1e-5, abs=1e-5)


def test_logit_attribution_refuses_bad_input_with_one_clear_error():
    model = tiny("llama")
    with pytest.raises(InputError, match=r"answer_id must be a token id or one token id per row \(2 rows\)"):
        direct_logit_attribution(model, np.zeros((2, 3), int), [1, 2, 3])
    with pytest.raises(InputError, match=r"pos must be an integer >= -3 and <= 2, got 3"):
        direct_logit_attribution(model, np.zeros((2, 3), int), 1, pos=3)
    # every head's share of a token's logit minus its own is 0: nothing to attribute (rows differing are fine)
    with pytest.raises(InputError, match=r"wrong_id \[1, 2\] is answer_id itself"):
        direct_logit_attribution(model, np.zeros((2, 3), int), [1, 2], [1, 2])
    assert direct_logit_attribution(model, np.zeros((2, 3), int), [1, 2], [1, 3]).heads.shape == (2, 4)


def induction_model(V=8, C=32, block=16):
    """A 2-layer, 2-head GPT-2 with an induction circuit set by hand: residual dims 0..V-1 hold the token, V..V+15
    the position, the last V the previous token. Layer 0 head 0 attends from each position to the one before (by
    position) and copies its token into the previous-token dims; layer 1 head 0's query is the token, its key the
    previous token, so it attends to the token after an earlier occurrence of the current one. The other heads,
    the MLPs and every bias are zero."""
    model = lab.TransformerLM(lab.TransformerConfig(vocab_size=V, block_size=block, n_layer=2, n_head=2, n_embd=C))
    state = {k: (np.ones_like(v) if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else np.zeros_like(v))
             for k, v in model.state_dict().items()}
    D, prev, lam = C // 2, C - V, 3.0
    state["wte.weight"][:, :V] = np.eye(V)
    state["wpe.weight"][:, V:V + block] = np.eye(block)
    a0 = state["h.0.attn.c_attn.weight"]                     # (C, 3C): q | k | v, head h at columns h*D..
    for p in range(1, block):
        a0[V + p, p - 1] = lam                                # query of position p: "p - 1"
    for p in range(block):
        a0[V + p, C + p] = lam                                # key of position p: "p"
    a0[np.arange(V), 2 * C + np.arange(V)] = 1                # value: the token
    state["h.0.attn.c_proj.weight"][np.arange(V), prev + np.arange(V)] = 1   # into the previous-token dims
    a1 = state["h.1.attn.c_attn.weight"]
    a1[np.arange(V), np.arange(V)] = lam                      # query: the token
    a1[prev + np.arange(V), C + np.arange(V)] = lam           # key: the previous token
    model.load_state_dict(state)
    return model.eval()


def test_induction_scores_find_a_hand_built_induction_head(use_backend):
    model = induction_model()
    scores = induction_scores(model, seq_len=6, batch=3, seed=1, bos=0)   # 1 + 2 * 6 tokens <= 16
    assert scores.shape == (2, 2)
    assert np.unravel_index(scores.argmax(), scores.shape) == (1, 0)
    assert scores[1, 0] > 0.9          # nearly all its attention on the token after the previous occurrence
    # the previous-token head looks one back, never seq_len - 1 back; the zero heads spread attention evenly
    assert scores[0, 0] < 0.05 and scores[0, 1] < 0.2 and scores[1, 1] < 0.2


def test_induction_scores_refuse_sequences_that_do_not_fit():
    model = induction_model()
    with pytest.raises(InputError, match=r"seq_len must be at most 7 .* got 8"):
        induction_scores(model, seq_len=8, bos=0)       # 7 distinct tokens besides bos
    with pytest.raises(InputError, match=r"seq_len must be at most 8 .*block_size 16\), got 9"):
        induction_scores(model, seq_len=9)
    with pytest.raises(InputError, match=r"seq_len must be an integer >= 2, got 1"):
        induction_scores(model, seq_len=1)
    with pytest.raises(InputError, match=r"bos must be an integer >= 0 and <= 7, got 8"):
        induction_scores(model, bos=8)
    with pytest.raises(InputError, match=r"seed must be an integer >= 0, got 'x'"):
        induction_scores(model, seq_len=3, seed="x")


def test_experiments_refuse_a_model_without_hook_points():
    model = lab.ProNeuralLM(lab.ProNeuralConfig(vocab_size=V))
    for run in (lambda: activation_patching(model, *prompts(), 1, 2), lambda: induction_scores(model),
                lambda: direct_logit_attribution(model, [[1, 2]], 1)):
        with pytest.raises(InputError, match=r"need a model with hook points \(TransformerLM, LlamaLM\), got"):
            run()


def test_induction_scores_without_a_bos_token_score_the_repeat(use_backend):
    # (the GPT-2 family has no bos_token_id: "auto" puts none; the hand-built head needs none to find the repeat)
    scores = induction_scores(induction_model(), seq_len=5, batch=2, seed=3)
    assert scores.shape == (2, 2) and scores[1, 0] > 0.8 and scores[1, 0] == scores.max()


def test_patching_a_model_with_non_finite_logits_is_one_clear_error():
    model = tiny("gpt2")
    model.ln_f.weight.data[0] = np.nan      # (numpy backend: the parameter's array itself)
    with pytest.raises(InputError, match=r"logit differences are not finite \(clean nan, corrupted nan\)"):
        activation_patching(model, *prompts(), 1, 2)


def test_logit_attribution_reads_the_head_through_its_lora_adapter(use_backend):
    from lab import lora
    model = tiny("llama")                                   # an untied head: lm_head's own columns unembed
    lora.apply(model, r=2, alpha=4, targets=["lm_head"])
    B = model.lm_head.lora_B
    B.data = B.backend.from_numpy(np.random.default_rng(1).standard_normal(B.shape).astype(np.float32))
    tokens = np.array([[1, 4, 2, 8, 5, 7, 3]])
    for on in (True, False):
        with lora.adapter_enabled(model, on):
            dla = direct_logit_attribution(model, tokens, 3, 7)
            diff = model(tokens).numpy()[0, -1]
        # RMSNorm has no bias: the components account for the whole difference, the adapter's share included
        assert dla.logit_diff == pytest.approx(float(diff[3] - diff[7]), rel=1e-5, abs=1e-5)
        assert abs(dla.rest) < 1e-4 * (1 + np.abs(dla.heads).sum() + np.abs(dla.mlp).sum()), (on, dla.rest)
