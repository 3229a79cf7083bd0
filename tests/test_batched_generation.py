"""Batched generation (issue #22 item 3): prompts left-padded into one KV cache, each row as it is alone."""
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.checks import InputError
from lab.models import PRESETS, TransformerLM
from lab.plan.estimator import DoesNotFitError

PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8], [9, 7, 9, 3, 2, 3, 8, 4, 6]]


def _sharpened(model, scale=6.0):
    """Weights scaled up so greedy choices are far from ties (std 0.02 logits are nearly flat)."""
    model.load_state_dict({k: v * scale if v.ndim > 1 else v
                           for k, v in model.state_dict().items()})
    return model


def _model(family, **extra):
    lab.manual_seed(0)
    if family == "gpt":
        cfg = replace(PRESETS["tiny"], **{"vocab_size": 30, "n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 24,
                                           **extra})
        return _sharpened(TransformerLM(cfg).eval())
    cfg = lab.LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24, **extra)
    return _sharpened(lab.LlamaLM(cfg).eval())


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_batch_of_prompts_generates_what_each_prompt_generates_alone(use_backend, family):
    model = _model(family)
    alone = [lab.generate(model, p, 10, greedy=True, eos_token_id=[]) for p in PROMPTS]
    batch = lab.generate(model, PROMPTS, 10, greedy=True, eos_token_id=[])
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    for a, b in zip(alone, batch):
        np.testing.assert_array_equal(a, b)
    # the same rows as a left-padded 2-D array with its attention mask, and with per-row lengths
    T = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), T), dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(PROMPTS):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    for kw in ({"attention_mask": mask}, {"lengths": mask.sum(1)}):
        for a, b in zip(alone, lab.generate(model, ids, 10, greedy=True, eos_token_id=[], **kw)):
            np.testing.assert_array_equal(a, b)
    torch = pytest.importorskip("torch")   # a tokenizer's input_ids / attention_mask as torch tensors: the same batch
    for a, b in zip(alone, lab.generate(model, torch.tensor(ids), 10, greedy=True, eos_token_id=[],
                                        attention_mask=torch.tensor(mask))):
        np.testing.assert_array_equal(a, b)


def test_a_sampled_batch_draws_the_same_tokens_with_and_without_the_cache_past_block_size(use_backend):
    # on wgpu the batch's tokens were drawn on the device with the cache, by the host's generator without it and
    # past block_size: one seed, two different texts (a lone prompt drew on the device on every path)
    model = _model("llama")
    kw = dict(seed=7, temperature=2.0, eos_token_id=[])   # (hot: sharpened logits would draw their argmax)
    cached = lab.generate(model, PROMPTS[:2], 20, **kw)   # 7 + 20 tokens: past block_size 24
    for a, b in zip(cached, lab.generate(model, PROMPTS[:2], 20, use_cache=False, **kw)):
        np.testing.assert_array_equal(a, b)
    assert len({tuple(cached[0][-5:])} | {tuple(lab.generate(model, PROMPTS[:2], 20, **{**kw, "seed": 8})[0][-5:])}) == 2


def test_a_lone_prompts_kv_cache_that_cannot_fit_is_refused_before_it_is_allocated(use_backend, monkeypatch):
    # a batch's and a beam search's cache were checked, a lone prompt's not: block_size slots per layer (Llama 3.2's
    # 131072) went to the allocator, a MemoryError, or an out-of-memory kill of the kernel where it fits virtually
    from dataclasses import replace as changed
    from lab.plan import profiles
    model = _model("llama")   # its cache: 2 layers x keys and values of 2 x 24 x 8 float32, 3 KiB each
    real = profiles.limits_profile
    monkeypatch.setattr(profiles, "limits_profile", lambda backend: changed(real(backend), memory_bytes=16 * 1024))
    for kw in ({"greedy": True}, {"seed": 0}):
        with pytest.raises(DoesNotFitError, match=r"a KV cache for a batch of 1 does not fit .* \(5 slots a row\): "
                                                  r".*\(a shorter prompt or fewer new tokens, or use_cache=False\)"):
            lab.generate(model, [1, 2, 3], 2, **kw)
    assert len(lab.generate(model, [1, 2, 3], 2, greedy=True, use_cache=False)) == 2


def test_a_lone_prompt_and_a_beam_search_cache_only_the_slots_they_fill(use_backend, monkeypatch):
    # the cache was block_size slots whatever the run (Llama 3.2's 131072: 8.6 GB for its 1B model's one row);
    # now the prompt and the new tokens, at most block_size, with the tokens of the full recompute
    model = _model("llama")   # block_size 24
    made, real = [], model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda batch, length=None: made.append((batch, length)) or real(batch, length))
    for prompt, n in (([1, 2, 3], 5), (PROMPTS[0], 30)):   # 8 slots; 37 tokens: 24 slots, then the window slides
        for kw in ({"greedy": True}, {"seed": 3}):
            np.testing.assert_array_equal(lab.generate(model, prompt, n, eos_token_id=[], **kw),
                                          lab.generate(model, prompt, n, eos_token_id=[], use_cache=False, **kw))
        np.testing.assert_array_equal(lab.beam_search(model, prompt, n, num_beams=2, eos_token_id=[]),
                                      lab.beam_search(model, prompt, n, num_beams=2, eos_token_id=[], use_cache=False))
    assert made == [(1, 8), (1, 8), (2, 8), (1, 8), (1, 24), (1, 24), (2, 24), (1, 24)]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_cache_shorter_than_block_size_refuses_tokens_past_its_slots(use_backend, family):
    # new_cache(batch, length) for one generation: a prefill or step past its length wrote outside the array
    # (numpy's strided write corrupted the heap; the process aborted)
    model = _model(family)   # block_size 24
    cache = model.new_cache(1, 4)
    with lab.no_grad():
        with pytest.raises(InputError, match=r"tokens \(1, 6\) at slots 0\.\.5 do not fit the cache's 4 slots"):
            model.forward_cached(np.arange(6, dtype=np.int32)[None], cache, 0)
        model.forward_cached(np.arange(4, dtype=np.int32)[None], cache, 0)   # its four slots: fine
        with pytest.raises(InputError, match=r"at slots 4\.\.4 do not fit the cache's 4 slots"):
            model.forward_cached(np.array([[1]], np.int32), cache, 4)


def test_each_row_of_a_batch_stops_at_its_own_eos_and_stop_string(use_backend):
    model = _model("gpt")
    tok = lab.CharTokenizer("abcdefghijklmnopqrstuvwxyz .,")
    prompts = ["the cat", "a", "dog sat. "]
    free = [lab.generate(model, p, 12, greedy=True, tokenizer=tok, eos_token_id=[]) for p in prompts]
    stop = free[0][3:5]   # a stop string row 0 reaches after 3 characters; others may reach it anywhere or never
    alone = [lab.generate(model, p, 12, greedy=True, tokenizer=tok, stop=stop, eos_token_id=[]) for p in prompts]
    assert lab.generate(model, prompts, 12, greedy=True, tokenizer=tok, stop=stop, eos_token_id=[]) == alone
    assert alone[0] == free[0][:free[0].find(stop)]
    eos = tok.encode(free[1][2])[0]   # row 1 ends at its third token or before
    alone = [lab.generate(model, p, 12, greedy=True, tokenizer=tok, eos_token_id=eos) for p in prompts]
    assert lab.generate(model, prompts, 12, greedy=True, tokenizer=tok, eos_token_id=eos) == alone
    assert alone[1] == free[1][:free[1].find(free[1][2])]
    seen = []
    lab.generate(model, prompts, 3, greedy=True, tokenizer=tok, eos_token_id=[],
                 on_token=lambda row, i, piece: seen.append((row, piece)))
    assert sorted(seen) == sorted((r, c) for r, text in enumerate(free) for c in text[:3])


def test_bad_batches_are_one_clear_error(use_backend):
    model = _model("llama")
    tok = lab.CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    with pytest.raises(InputError, match=r"prompts mix text \(prompts\[0\]\) and token ids \(prompts\[1\]\)"):
        lab.generate(model, ["ab", [1, 2]], 2, tokenizer=tok)
    with pytest.raises(InputError, match=r"prompts\[1\]: prompt is empty"):
        lab.generate(model, [[1, 2], []], 2)
    with pytest.raises(InputError, match=r"prompts\[1\]: prompt is empty"):
        lab.generate(model, ["ab", ""], 2, tokenizer=tok)
    with pytest.raises(InputError, match=r"prompts\[1\]: prompt must be text .* got None"):
        lab.generate(model, [[1, 2], None], 2)
    with pytest.raises(InputError, match=r"prompts\[0\]: prompt token ids must be in \[0, 30\)"):
        lab.generate(model, [[1, 99], [2]], 2)
    with pytest.raises(InputError, match="attention_mask must be left padding"):
        lab.generate(model, np.ones((2, 3), dtype=np.int64), 2, attention_mask=[[1, 1, 0], [1, 1, 1]])
    with pytest.raises(InputError, match=r"lengths must be 2 integers in \[0, 3\]"):
        lab.generate(model, np.ones((2, 3), dtype=np.int64), 2, lengths=[1, 4])
    with pytest.raises(DoesNotFitError, match=r"KV cache for a batch of 10000000 does not fit .* at most \d+ rows fit"):
        lab.generate(model, [[1]] * 10_000_000, 2)


def test_odd_batches_and_callbacks_are_refused_in_one_clear_error_before_a_token(use_backend):
    # each was a raw error from numpy or a TypeError at the first token, or named the wrong thing
    model = _model("gpt")
    with pytest.raises(InputError, match=r"a batch of no rows \(shape \(0, 4\)\)"):   # numpy's zero-size min()
        lab.generate(model, np.zeros((0, 4), dtype=np.int64), 2)
    with pytest.raises(InputError, match=r"attention_mask must hold only 0 and 1, got \[0.5, 2.0\]"):   # not 'shape'
        lab.generate(model, np.ones((2, 3), dtype=np.int64), 2, attention_mask=[[0.5, 1, 1], [2, 1, 1]])
    with pytest.raises(InputError, match=r"beam_search takes one prompt .* a batch of 2"):   # numpy's ragged array
        lab.beam_search(model, [[1, 2], [3]], 2, num_beams=2)
    with pytest.raises(InputError, match=r"prompts\[0\]: prompt must be a 1-D sequence of token ids, got \[\[1, 2\], "):
        lab.generate(model, [[[1, 2], [3]]], 2)   # a ragged row
    # an EOS id as a 0-d array (numpy's scalar of an id) is one id; a 2-D one names what it got
    stop_at = int(lab.generate(model, [1, 2], 1, greedy=True, eos_token_id=[])[0])
    assert lab.generate(model, [1, 2], 3, greedy=True, eos_token_id=np.array(stop_at)).size == 0   # (TypeError)
    with pytest.raises(InputError, match=r"eos_token_id must be an integer >= 0 and <= 29, got \[1, 2\]"):
        lab.generate(model, [1, 2], 3, eos_token_id=np.array([[1, 2]]))
    # a lone prompt's on_token(id, text) for a batch's on_token(row, id, text), and the other way round
    with pytest.raises(InputError, match=r"on_token must be a function on_token\(row, id, text\), got <function"):
        lab.generate(model, [[1, 2], [3]], 2, on_token=lambda i, text: None)
    with pytest.raises(InputError, match=r"on_token must be a function on_token\(id, text\), got <function"):
        lab.generate(model, [1, 2], 2, on_token=lambda row, i, text: None)
    seen = []
    lab.generate(model, [[1, 2], [3]], 2, eos_token_id=[], on_token=lambda *a, **k: seen.append(a))   # (any arity)
    assert len(seen) == 4
    for call in (lambda: lab.generate(model, [1, 2], 2, should_stop=3),
                 lambda: lab.generate(model, [[1, 2], [3]], 2, should_stop=True),
                 lambda: lab.beam_search(model, [1, 2], 2, num_beams=2, should_stop="yes")):
        with pytest.raises(InputError, match="should_stop must be a function returning True to stop"):
            call()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_beam_search_on_the_kv_cache_finds_the_beams_of_the_full_recompute(use_backend, family):
    model = _model(family)
    for prompt, kw in (([3, 1, 4], {}), ([5, 9, 2, 6, 5], {"length_penalty": 0.0}),
                       ([2], {"eos_token_id": 7, "length_penalty": 2.0}),
                       ([4, 4], {"eos_token_id": 7, "early_stopping": False}),
                       ([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], {})):   # past block_size 24
        full = lab.beam_search(model, prompt, 8, num_beams=3, use_cache=False, num_return_sequences=3, **kw)
        cached = lab.beam_search(model, prompt, 8, num_beams=3, num_return_sequences=3, **kw)
        assert len(cached) == 3
        for a, b in zip(full, cached):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(lab.beam_search(model, prompt, 8, num_beams=3, **kw), cached[0])


def test_a_tokenizer_that_is_not_the_models_is_one_clear_error(use_backend):
    model = _model("gpt")   # 30 tokens
    big = lab.CharTokenizer("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")   # 52: 'A'..'Z' are ids 0..25
    # refused even where the prompt's ids happen to fit the model's table (it generated from them silently)
    for call in (lambda: lab.generate(model, "ABC", 3, tokenizer=big, greedy=True),
                 lambda: lab.generate(model, ["ABC", "xyz"], 3, tokenizer=big, greedy=True),
                 lambda: lab.beam_search(model, "ABC", 3, tokenizer=big, num_beams=2)):
        with pytest.raises(InputError, match=r"^the tokenizer has 52 tokens but the model's vocab_size is 30: give "
                                             r"the tokenizer the model was trained with$"):
            call()
    small = lab.CharTokenizer("abcdefghij")   # fewer tokens than the model (a padded table is allowed) ...
    flat = dict(temperature=100.0, seed=0, eos_token_id=[])   # (near uniform: ids past 9 come soon)
    made = lab.generate(model, small.encode("abc"), 8, **flat)
    assert made.max() >= 10   # ... but this model makes ids it lacks: CharTokenizer's IndexError before
    with pytest.raises(InputError, match=rf"the model made token id {made[made >= 10][0]}, which the tokenizer of 10 "
                                         r"tokens does not have"):
        lab.generate(model, "abc", 8, tokenizer=small, **flat)
    with pytest.raises(InputError, match=r"the model made token id \d+, which the tokenizer of 10 tokens"):
        lab.generate(model, ["abc", "j"], 8, tokenizer=small, **flat)


def test_nan_logits_are_the_samplers_one_error_on_every_path(use_backend):
    # the host's greedy took a NaN's index and went on (numpy, and rows recomputed past the cache on wgpu), its
    # sampling raised numpy's 'Probabilities contain NaN', beam search ranked NaN beams
    model = _model("gpt")
    state = model.state_dict()
    wte = state["wte.weight"].copy()
    wte[5] = np.nan   # (the tied head: token 5's logit is NaN in every row)
    model.load_state_dict({**state, "wte.weight": wte})
    for prompt, row in (([1, 2], 0), ([[1, 2], [3]], 0)):
        for kw in ({"greedy": True}, {"seed": 1}, {"greedy": True, "use_cache": False}, {"seed": 1, "use_cache": False}):
            with pytest.raises(ValueError, match=rf"^sampling: the logits of row {row} hold NaN \(or, sampling, only "
                                                 r"-inf\): no token can be drawn from them$"):
                lab.generate(model, prompt, 3, eos_token_id=[], **kw)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=r"^sampling: the logits of row 0 hold NaN"):
            lab.beam_search(model, [1, 2], 3, num_beams=2, use_cache=use_cache)


def test_beam_search_ranks_beams_under_an_extreme_length_penalty_without_overflow(use_backend):
    # score / n ** length_penalty in Python overflowed (OverflowError) for |length_penalty| ~ 1e300 at n >= 2
    model = _model("gpt")
    for lp in (1e300, -1e300, 1e3):
        for early in (True, False):
            kw = dict(num_beams=3, num_return_sequences=3, eos_token_id=7, length_penalty=lp, early_stopping=early)
            cached = lab.beam_search(model, [4, 4], 6, **kw)
            assert [c.tolist() for c in cached] == [f.tolist() for f in
                                                    lab.beam_search(model, [4, 4], 6, use_cache=False, **kw)]
            if lp < 0:   # the shortest beams first, as n ** -inf says
                assert [len(c) for c in cached] == sorted(len(c) for c in cached)


def test_beam_search_and_a_padded_batch_match_transformers_on_a_small_llama(use_backend):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_llama import hf_model, lab_model
    hf = hf_model("gqa3-llama3-headdim")
    model = lab_model(hf)
    prompt = np.array([[4, 11, 30, 2]])
    want = hf.generate(torch.tensor(prompt), max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True,
                       num_return_sequences=1, attention_mask=torch.ones(1, 4, dtype=torch.long),
                       pad_token_id=0)[0, 4:].numpy()
    np.testing.assert_array_equal(lab.beam_search(model, prompt[0], 6, num_beams=3), want)
    # ended beams set aside, as transformers' early_stopping=False: the two best, with and without an EOS
    for p, eos, lp in (([[4, 11, 30, 2]], 7, 1.0), ([[4, 11, 30, 2]], 7, 2.0), ([[9, 1, 0, 4]], 4, 0.0),
                       ([[9, 1, 0, 4]], 5, 1.0)):
        want = hf.generate(torch.tensor(p), max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=False,
                           num_return_sequences=2, length_penalty=lp, eos_token_id=eos, pad_token_id=0,
                           attention_mask=torch.ones(1, 4, dtype=torch.long))[:, 4:].tolist()
        want = [r[:r.index(eos)] if eos in r else r for r in want]   # (transformers pads after the EOS)
        got = lab.beam_search(model, p[0], 6, num_beams=3, early_stopping=False, num_return_sequences=2,
                              length_penalty=lp, eos_token_id=eos)
        assert [g.tolist() for g in got] == want
    # greedy on a left-padded batch, transformers' attention mask and position ids from it
    ids = torch.tensor([[0, 0, 5, 9], [4, 11, 30, 2]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 4:].numpy()
    got = lab.generate(model, ids.numpy(), 6, greedy=True, attention_mask=mask.numpy())
    np.testing.assert_array_equal(np.stack(got), want)


def test_bad_beam_searches_are_one_clear_error(use_backend):
    model = _model("gpt")
    with pytest.raises(InputError, match="num_beams 31 is larger than the model's vocabulary of 30 tokens"):
        lab.beam_search(model, [1, 2], 3, num_beams=31)
    with pytest.raises(InputError, match="num_return_sequences 4 is more than num_beams 3"):
        lab.beam_search(model, [1, 2], 3, num_beams=3, num_return_sequences=4)
    with pytest.raises(InputError, match="use_cache must be True or False"):
        lab.beam_search(model, [1, 2], 3, num_beams=2, use_cache="no")


def test_a_search_whose_every_candidate_ends_returns_empty_beams(use_backend):
    model = _model("gpt")
    every = list(range(30))
    for early_stopping in (True, False):
        got = lab.beam_search(model, [1, 2], 4, num_beams=3, eos_token_id=every, num_return_sequences=2,
                              early_stopping=early_stopping)
        assert [g.tolist() for g in got] == [[], []]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_row_of_padding_alone_is_one_clear_error(use_backend, family):
    """forward_cached with a pad covering a row's every slot ran: that row attended to masked slots only and
    its logits were noise, without a word. A step's pad may exceed its one token: the cache holds the row's own."""
    model = _model(family)
    with lab.no_grad():
        for pad in ([0, 3], [0, 9]):
            with pytest.raises(InputError, match=r"leaves row 1 no token of its own: .* each row's padding must be "
                                                 r"fewer than pos \+ T = 3 slots"):
                model.forward_cached(np.ones((2, 3), np.int32), model.new_cache(2), 0, pad=pad)
        cache = model.new_cache(2)
        model.forward_cached(np.ones((2, 3), np.int32), cache, 0, pad=[0, 2])
        assert np.isfinite(model.forward_cached(np.ones((2, 1), np.int32), cache, 3, pad=[0, 2]).numpy()).all()
        with pytest.raises(InputError, match=r"pos \+ T = 4 slots"):
            model.forward_cached(np.ones((2, 1), np.int32), cache, 3, pad=[0, 4])
