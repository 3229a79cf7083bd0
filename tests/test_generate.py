from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.generate import beam_search, generate, sample_distribution
from lab.models import PRESETS, TransformerLM


@pytest.fixture
def model(use_backend):
    lab.manual_seed(0)
    return TransformerLM(replace(PRESETS["tiny"], vocab_size=30, n_layer=2, n_embd=32, n_head=4, block_size=16)).eval()


def test_kv_cache_matches_full_recompute(model):
    seq = np.random.default_rng(1).integers(0, 30, 13).astype(np.int32)
    with lab.no_grad():
        full = model(seq[None]).numpy()[0]
        cache = model.new_cache(1)
        inc = [model.forward_cached(seq[None, :5], cache, 0).numpy()[0]]
        for t in range(5, 13):
            inc.append(model.forward_cached(seq[None, t:t + 1], cache, t).numpy()[0])
    np.testing.assert_allclose(np.concatenate(inc), full, atol=1e-4)


def test_cached_and_uncached_generation_agree_past_block_size(model):
    prompt = np.arange(6)
    a = generate(model, prompt, 25, greedy=True)  # 31 tokens: the window slides past block_size 16
    b = generate(model, prompt, 25, greedy=True, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 25


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompt = [1, 2, 3]
    assert (generate(model, prompt, 10, seed=5) == generate(model, prompt, 10, seed=5)).all()
    np.testing.assert_array_equal(generate(model, prompt, 10, top_k=1, seed=1), generate(model, prompt, 10, greedy=True))


def test_filters_keep_the_right_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    np.testing.assert_allclose(sample_distribution(logits, top_k=2), [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(sample_distribution(logits, top_p=0.8), [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(sample_distribution(logits, top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    p = sample_distribution(logits, temperature=100.0)
    assert p.max() - p.min() < 0.02  # high temperature flattens


def test_repetition_penalty_discourages_repeats(model):
    plain = generate(model, [1], 30, greedy=True)
    penalized = generate(model, [1], 30, greedy=True, repetition_penalty=5.0)
    assert len(set(penalized.tolist())) > len(set(plain.tolist()))


def test_streaming_callback_and_stop_string(use_backend):
    from lab.data import CharTokenizer
    tok = CharTokenizer("abc.")
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=4, n_layer=1, n_embd=16, n_head=2, block_size=16)).eval()
    seen = []
    text = generate(m, "ab", 40, tokenizer=tok, on_token=lambda i, s: seen.append(s), seed=3)
    assert "".join(seen) == text and len(seen) == 40
    stop = text[5:7]
    cut = generate(m, "ab", 40, tokenizer=tok, stop=stop, seed=3)
    assert cut == text[:text.index(stop)]  # stops where the stop string first completes, and cuts it off


def test_beam_search_beats_or_ties_greedy_in_log_probability(model):
    def logprob(seq, start):
        with lab.no_grad():
            logits = model(np.asarray(seq)[None]).numpy()[0].astype(np.float64)
        lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        return sum(lp[t - 1, seq[t]] for t in range(start, len(seq)))
    prompt = [3, 4]
    g = list(generate(model, prompt, 6, greedy=True))
    b = list(beam_search(model, prompt, 6, num_beams=4))
    assert logprob(prompt + b, 2) >= logprob(prompt + g, 2) - 1e-9


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, [1], 5, temperature=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(model, [1], 5, top_p=1.5)
    with pytest.raises(ValueError, match="longer than the model's block_size 16"):
        generate(model, list(range(17)), 5)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(model, "hello", 5)
