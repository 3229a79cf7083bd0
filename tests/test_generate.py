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


def test_integral_float_top_k_samples_as_that_integer_single_and_batched(model):
    # top_k=2.0 passed the check, then numpy's partition raised TypeError on it (the device kernel took int(2.0))
    prompt = [1, 2, 3]
    np.testing.assert_array_equal(generate(model, prompt, 8, top_k=2.0, seed=4), generate(model, prompt, 8, top_k=2, seed=4))
    for a, b in zip(generate(model, [prompt, [5]], 8, top_k=2.0, seed=4), generate(model, [prompt, [5]], 8, top_k=2, seed=4)):
        np.testing.assert_array_equal(a, b)


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
    with pytest.raises(ValueError, match="temperature must be a finite number >= 1e-06, got 0"):
        generate(model, [1], 5, temperature=0)
    with pytest.raises(ValueError, match="top_p must be a finite number > 0 and <= 1, got 1.5"):
        generate(model, [1], 5, top_p=1.5)
    with pytest.raises(ValueError, match="longer than the model's block_size 16"):
        generate(model, list(range(17)), 5)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(model, "hello", 5)


def test_generate_refuses_float_token_ids(model):
    for prompt in ([1.0, 2.0], [1.7], np.array([3.5, 1])):  # never truncated to other ids
        with pytest.raises(ValueError, match="prompt token ids must be integers, got float64"):
            generate(model, prompt, 3, greedy=True)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 30\) for this model, got -1..4"):
        generate(model, [4, -1], 3, greedy=True)


def test_generate_refuses_2d_prompt(model):
    with pytest.raises(ValueError, match=r"1D sequence of token ids, got shape \(1, 2, 3\)"):
        generate(model, np.ones((1, 2, 3), dtype=np.int64), 3, greedy=True)
    # a list of id lists is a batch (tests/test_batched_generation.py), not one 6-token prompt flattened
    assert [len(r) for r in generate(model, [[1, 2, 3], [4, 5, 6]], 3, greedy=True, eos_token_id=[])] == [3, 3]
    with pytest.raises(ValueError, match=r"beam_search takes one prompt .* got a batch of 2"):
        beam_search(model, np.ones((2, 2), dtype=np.int64), 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number >= 1e-06, got nan"),
    ({"temperature": 1e-7}, "temperature must be a finite number >= 1e-06, got 1e-07 .use greedy=True"),
    ({"top_k": 2.5}, "top_k must be an integer >= 1, got 2.5"),
    ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
    ({"top_p": 0.0}, "top_p must be a finite number > 0 and <= 1, got 0.0"),
    ({"top_p": float("nan")}, "top_p must be a finite number > 0 and <= 1, got nan"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be a finite number > 0, got -1.0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 0, got 2.5"),
])
def test_generate_argument_errors_name_value_and_range(model, kwargs, message):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, [1], args.pop("max_new_tokens"), **args)


def test_generate_greedy_ignores_temperature(model):
    np.testing.assert_array_equal(generate(model, [1], 4, greedy=True, temperature=0.0),
                                  generate(model, [1], 4, greedy=True))


def test_generate_refuses_empty_stop_string(use_backend):
    from lab.data import CharTokenizer
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=4, n_layer=1, n_embd=16, n_head=2, block_size=16))
    for stop in ("", 3):
        with pytest.raises(ValueError, match=f"stop must be a non-empty string, got {stop!r}"):
            generate(m, "ab", 5, tokenizer=CharTokenizer("abc."), stop=stop)


def test_text_prompt_errors_speak_of_text(use_backend):
    """An empty text prompt said 'prompt must be a non-empty 1D sequence of token ids, got shape (0,)', and a
    character outside the vocabulary did not say it was the prompt's: both are said as text."""
    from lab.checks import InputError
    from lab.data import CharTokenizer
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=4, n_layer=1, n_embd=16, n_head=2, block_size=16))
    tok = CharTokenizer("abc.")
    for call in (generate, beam_search):
        with pytest.raises(InputError, match=r"^prompt is empty: the model needs some text") as info:
            call(m, "", 5, tokenizer=tok)
        assert "token ids" not in str(info.value) and "shape" not in str(info.value)
        with pytest.raises(InputError, match=r"^prompt 'ab\u2603': character '\u2603' is not in this tokenizer's "
                                             r"vocabulary of 4 characters"):
            call(m, "ab\u2603", 5, tokenizer=tok)


def test_extreme_repetition_penalty_samples_without_nan_or_warning(model):
    """repetition_penalty=1e-300 made a seen token's logit overflow to inf, the distribution NaN and
    rng.choice raise 'Probabilities contain NaN'; 1e308 warned 'overflow encountered in cast'. Past float64 a
    seen token's logit is +-inf, and the +inf ones share the probability."""
    import warnings
    from lab.generate import apply_repetition_penalty
    logits = np.array([1.0, -1.0, 2.0, 0.5], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = sample_distribution(apply_repetition_penalty(logits, np.array([0, 1, 0]), 1e-320))
        np.testing.assert_array_equal(tiny, [1.0, 0.0, 0.0, 0.0])   # the seen positive logit only
        huge = sample_distribution(apply_repetition_penalty(logits, np.array([0, 1]), 1e308))
        # the seen negative logit * 1e308 is -inf (probability 0), the seen positive one / 1e308 is 0.0
        np.testing.assert_allclose(huge, np.exp([0.0, -np.inf, 2.0, 0.5]) / np.exp([0.0, 2.0, 0.5]).sum())
        for penalty in (1e-320, 1e-300, 1e308):
            out = generate(model, [1, 2, 3], 6, repetition_penalty=penalty, seed=0)
            assert out.shape == (6,) and ((0 <= out) & (out < 30)).all()


TEXT = "héllo 日本語 🙂\n"


def _spelling_model(ids):
    """A real TransformerLM whose weights make greedy decoding emit `ids` in order: one-hot token embeddings
    (tied head), each position's embedding pointing at the next id, blocks whose output projections are zero."""
    vocab = 260
    cfg = replace(PRESETS["tiny"], vocab_size=vocab, n_layer=1, n_head=4, n_embd=264, block_size=len(ids), dropout=0.0)
    m = TransformerLM(cfg)
    sd = {k: v.copy() for k, v in m.state_dict().items()}
    sd["wte.weight"] = np.eye(vocab, cfg.n_embd, dtype=np.float32)
    sd["wpe.weight"] = np.zeros((len(ids), cfg.n_embd), np.float32)
    for p, nxt in enumerate(ids[1:]):
        sd["wpe.weight"][p, nxt] = 10.0
    for k in sd:
        if ".c_proj." in k:
            sd[k][...] = 0.0
    m.load_state_dict(sd)
    return m.eval()


def _bpe_and_ids():
    tok = lab.BPETokenizer.train(TEXT * 20, vocab_size=260)
    ids = [int(i) for i in tok.encode("\n")] + [int(i) for i in tok.encode(TEXT * 2)]  # the prompt, then TEXT
    split = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert split, "no token of this BPE splits a character: the test would prove nothing"
    return tok, ids


def test_streaming_never_shows_replacement_character(use_backend):
    tok, ids = _bpe_and_ids()
    m = _spelling_model(ids)
    pieces = []
    text = generate(m, "\n", len(ids) - 1, tokenizer=tok, greedy=True, on_token=lambda i, s: pieces.append(s))
    assert text == TEXT * 2
    assert "".join(pieces) == text and not any("\ufffd" in s for s in pieces)
    assert "" in pieces  # some tokens' bytes were held back until their character completed
    # cut inside a character: the held bytes are flushed at the end, as the full decode shows them
    n = next(n for n in range(1, len(ids)) if tok.decode(ids[1:n + 1]).endswith("\ufffd"))
    pieces = []
    cut = generate(m, "\n", n, tokenizer=tok, greedy=True, on_token=lambda i, s: pieces.append(s))
    assert "".join(pieces) == cut == tok.decode(ids[1:n + 1]) and cut.endswith("\ufffd")
    # a stop string ending inside a piece of several characters ("él" in "é" + "ll") still stops there
    seen = []
    stop = generate(m, "\n", len(ids) - 1, tokenizer=tok, greedy=True, stop="él", on_token=lambda i, s: seen.append(s))
    assert stop == "h" and "".join(seen) == "héll"


def test_cli_generate_prints_whole_characters(tmp_path):
    import os
    import subprocess
    import sys
    from lab.checkpoint import save_checkpoint
    tok, ids = _bpe_and_ids()
    save_checkpoint(tmp_path / "ck", _spelling_model(ids), tok)
    r = subprocess.run([sys.executable, "-m", "lab", "generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "\n",
                        "--greedy", "--max-new-tokens", str(len(ids) - 1), "--backend", "numpy"],
                       capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode("utf-8") == "\n" + TEXT * 2 + "\n"


def test_generate_refuses_wrong_model_tokenizer_seed_and_callback_up_front(model):
    """Misused arguments surfaced deep inside: tokenizer='x' as str.encode's 'unknown encoding: ab', seed=-1 or
    1.5 as numpy's SeedSequence errors, on_token=5 as a TypeError after the first token was made, model=None as
    an AttributeError, prompt=None as 'got shape ()'. Each is one InputError naming the argument; and
    max_new_tokens=1e3 (integral) generates as 1000, not TypeError from range()."""
    from lab.checks import InputError
    from lab.data import CharTokenizer
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,;")   # 30 characters: the fixture's vocabulary
    made = []
    cases = [(dict(tokenizer="x"), "^tokenizer must be a lab tokenizer"), (dict(seed=-1), "^seed must be an integer >= 0"),
             (dict(seed=1.5), "^seed must be an integer"), (dict(on_token=5), "^on_token must be a function")]
    for kw, message in cases:
        with pytest.raises(InputError, match=message):
            generate(model, "ab", 3, **{"tokenizer": tok, **kw})
    for prompt in (None, 5, b"ab"):
        with pytest.raises(InputError, match="^prompt must be text .*or a 1-D sequence of token ids"):
            generate(model, prompt, 3, tokenizer=tok, on_token=lambda *a: made.append(a))
    with pytest.raises(InputError, match="^model must be a lab language model"):
        generate(None, [1], 3)
    for kw in (dict(use_cache="no"), dict(greedy="yes"), dict(adapter="yes")):   # "no" was a true value
        with pytest.raises(InputError, match=f"^{next(iter(kw))} must be True"):
            generate(model, [1], 3, **kw)
    assert made == []
    assert len(generate(model, [1], 1e1, greedy=True)) == 10


def test_generate_with_a_model_without_kv_cache_recomputes(use_backend):
    """generate(ProNeuralLM, ...) failed with AttributeError 'new_cache' unless use_cache=False was passed."""
    from lab.models.proneural import ProNeuralConfig, ProNeuralLM
    lab.manual_seed(0)
    m = ProNeuralLM(ProNeuralConfig(vocab_size=7, block_size=8)).eval()
    np.testing.assert_array_equal(generate(m, [1, 2], 12, greedy=True), generate(m, [1, 2], 12, greedy=True,
                                                                                  use_cache=False))
