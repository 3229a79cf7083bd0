"""The interpretability panels' Python side (issue #24): LogitLensPanel, PatchingPanel and AttentionHeatmap from an
ActivationCache, their traits and binary buffers from tiny models, and bad input from Python and from the browser."""
from dataclasses import replace

import numpy as np
import pytest

import lab
import lab.interp.experiments
from lab.data import CharTokenizer
from lab.models import PRESETS, TransformerLM

pytest.importorskip("anywidget")
from lab.widgets import AttentionHeatmap, LogitLensPanel, PatchingPanel  # noqa: E402

TEXT = "the cat sat on the mat. a dog ran to the big red barn!"


@pytest.fixture
def numpy_active(numpy_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_text(TEXT)


def _gpt(tok, seed=0):
    lab.manual_seed(seed)
    return TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2,
                                 block_size=16))


def _llama(tok, seed=0):
    lab.manual_seed(seed)
    return lab.LlamaLM(lab.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=16))


def _send(widget, **content):
    widget._on_message(widget, content, [])


def _softmax(z):
    z = np.exp(z - z.max())
    return z / z.sum()


@pytest.mark.parametrize("family", [_gpt, _llama])
def test_logit_lens_panel_holds_each_layers_top_tokens_and_the_last_row_is_the_models_prediction(tok, family,
                                                                                                  use_backend):
    model, prompt = family(tok), "the cat sa"
    panel = LogitLensPanel(model, tok, prompt, k=3)
    ids, probs, rank = panel.arrays()
    T = len(prompt)
    assert panel.labels == ["embed", "L0", "L1"] and panel.tokens == list(prompt)
    assert ids.shape == probs.shape == (3, T, 3) and rank.shape == (3, T)
    want = lab.interp.logit_lens(model, np.asarray([tok.encode(prompt)], np.int32), k=3)
    np.testing.assert_array_equal(ids, want.top_ids[:, 0])
    np.testing.assert_array_equal(probs, want.top_probs[:, 0])
    np.testing.assert_array_equal(rank, want.final_rank[:, 0])
    with lab.no_grad():
        logits = model(np.asarray([tok.encode(prompt)], np.int32)).numpy()[0]
    np.testing.assert_array_equal(ids[-1, :, 0], logits.argmax(-1))    # the lens' last row is the model's output
    assert (rank[-1] == 0).all()
    np.testing.assert_allclose(probs[-1, :, 0], [_softmax(row).max() for row in logits], rtol=1e-4)
    assert (np.diff(probs, axis=-1) <= 0).all()                          # the top-k in order
    assert {panel.vocab[str(i)] for i in ids.ravel()} <= set(TEXT)       # every shown id has its text
    bundle = panel._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert data["text/html"] == ('<div class="lab-static"><b>LogitLensPanel</b>: top-3 of 3 rows (embed, L0 ... L1) x '
                                 f'{T} positions</div>')
    assert data["image/png"].startswith("iVBOR")


def test_logit_lens_panel_runs_a_prompt_typed_in_the_panel_and_shows_bad_ones_there(tok, numpy_active):
    model = _gpt(tok)
    panel = LogitLensPanel(model, tok, "the cat")
    panel.set_state({"prompt": "a dog ran"})
    _send(panel, cmd="run")
    panel.wait(60)
    assert not panel.running and panel.error == "" and panel.tokens == list("a dog ran")
    np.testing.assert_array_equal(panel.arrays()[0],
                                  lab.interp.logit_lens(model, np.asarray([tok.encode("a dog ran")]), k=5).top_ids[:, 0])
    before = panel.top_ids
    for prompt, message in (("", "needs a non-empty prompt text"),
                            ("the cat sat on the mat", "the prompt is 22 tokens, more than the 16 allowed")):
        panel.set_state({"prompt": prompt})
        _send(panel, cmd="run")
        panel.wait(60)
        assert message in panel.error and panel.top_ids == before   # the last result stays
    panel.set_state({"top_ids": b"x"})    # an output: the browser may not set it
    assert "cannot be set from the panel" in panel.error and panel.top_ids == before


def test_logit_lens_panel_from_a_cache_equals_the_one_from_its_prompt(tok, numpy_active):
    model, prompt = _gpt(tok), "a big barn"
    ids = np.asarray([tok.encode(prompt)], np.int32)
    _, cache = model.run_with_cache(ids)
    panel = LogitLensPanel(model, tok, cache, tokens=ids)
    direct = LogitLensPanel(model, tok, prompt)
    assert panel.tokens == direct.tokens and panel.labels == direct.labels
    for a, b in zip(panel.arrays(), direct.arrays()):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    with pytest.raises(ValueError, match="the cache holds 10 positions but the tokens given are 3"):
        LogitLensPanel(model, tok, cache, tokens="abc")
    with pytest.raises(ValueError, match="another model"):
        LogitLensPanel(_gpt(tok, seed=1), tok, cache, tokens=ids)


def test_logit_lens_panel_refuses_bad_arguments_with_one_clear_error(tok, numpy_active):
    model = _gpt(tok)
    for args, kwargs, message in (
            ((model, tok, ""), {}, "needs a non-empty prompt text"),
            ((model, tok, 42), {}, "needs a prompt text or an ActivationCache"),
            ((model, tok, "the cat"), {"k": 0}, "k must be an integer >= 1"),
            ((model, tok, "the cat"), {"max_tokens": -1}, "max_tokens must be an integer >= 1"),
            (("model", tok, "the cat"), {}, "needs a lab language model"),
            ((model, "tok", "the cat"), {}, "needs a tokenizer with encode"),
            ((model, tok, "the cat"), {"tokens": [1, 2]}, "tokens= and batch= go with a cache"),
    ):
        with pytest.raises(ValueError, match=message):
            LogitLensPanel(*args, **kwargs)


@pytest.mark.parametrize("family", [_gpt, _llama])
def test_patching_panel_shows_the_experiments_heatmap_and_a_clicked_cells_patched_prediction(tok, family,
                                                                                             use_backend):
    model = family(tok)
    clean, corrupted = "the cat sat", "the dog sat"
    panel = PatchingPanel(model, tok, clean, corrupted, "o", "a", hook="resid_post", k=4, wait=True)
    assert panel.error == "" and not panel.running and panel.shown_hook == "resid_post"
    want = lab.interp.experiments.activation_patching(model, np.asarray([tok.encode(clean)]), np.asarray([tok.encode(corrupted)]),
                                          tok.encode("o")[0], tok.encode("a")[0], hook="resid_post")
    values = np.frombuffer(panel.values, np.float32).reshape(2, len(clean))
    np.testing.assert_allclose(values, want.values, rtol=1e-5, atol=1e-6)
    assert panel.labels == want.labels and panel.tokens == list(clean) and panel.corrupted_tokens == list(corrupted)
    assert panel.clean_diff == pytest.approx(want.clean_diff) and panel.corrupted_diff == pytest.approx(want.corrupted_diff)
    assert values[-1, -1] == pytest.approx(1, abs=1e-4)   # the last position's last residual is the whole answer
    assert len(panel.clean_top) == len(panel.corrupted_top) == 4
    _send(panel, cmd="cell", layer=1, pos=len(clean) - 1)
    assert panel.error == "" and panel.cell == [1, len(clean) - 1]
    # by construction that patch makes the corrupted run predict exactly what the clean run does
    assert [t for t, _ in panel.cell_top] == [t for t, _ in panel.clean_top]
    np.testing.assert_allclose([p for _, p in panel.cell_top], [p for _, p in panel.clean_top], rtol=1e-4)
    _send(panel, cmd="cell", layer=0, pos=2)
    with lab.no_grad():
        probs = _softmax(np.asarray(want.patched_logits(0, 2), np.float64)[0])
    assert [t for t, _ in panel.cell_top] == [tok.decode([i]) for i in np.argsort(-probs, kind="stable")[:4]]
    bundle = panel._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert data["text/html"].startswith('<div class="lab-static"><b>PatchingPanel</b>: patching resid_post from '
                                        '<code>the cat sat</code>')
    assert data["image/png"].startswith("iVBOR")


def test_patching_panel_refuses_bad_input_from_python_and_shows_it_from_the_browser(tok, numpy_active):
    model = _gpt(tok)
    good = dict(clean="the cat sat", corrupted="the dog sat", answer="o", wrong="a")
    for change, message in (
            ({"corrupted": "a dog sat"}, r"must be as many tokens .*: 11 \[.*\] != 9 \[.*\]"),
            ({"answer": "on"}, r"the answer must be one token, got 'on' = 2 tokens"),
            ({"wrong": "o"}, "the answer and wrong tokens must differ, both are 'o'"),
            ({"answer": 10_000}, rf"answer token id must be an integer >= 0 and <= {tok.vocab_size - 1}, got 10000"),
            ({"clean": ""}, "needs a non-empty clean prompt text"),
            ({"clean": None}, "clean must be a unicode string, got None"),
            ({"clean": "the cat sat on the mat", "corrupted": "the dog sat on the mat"},
             "the clean prompt is 22 tokens, more than the 16 allowed"),
            ({"hook": "z"}, r"hook must be one of \['attn_out', 'mlp_out', 'resid_post', 'resid_pre'\], got 'z'"),
    ):
        with pytest.raises(ValueError, match=message):
            PatchingPanel(model, tok, **{**good, **change}, wait=True)
    panel = PatchingPanel(model, tok, **good, wait=True)
    values = panel.values
    by_id = PatchingPanel(model, tok, good["clean"], good["corrupted"], int(tok.encode("o")[0]), "a", wait=True)
    assert by_id.answer == "o" and by_id.values == values   # an id is shown as its token and used as given
    _send(panel, cmd="cell", layer=2, pos=0)
    assert "layer must be an integer >= 0 and <= 1, got 2" in panel.error and panel.cell == []
    _send(panel, cmd="cell", layer=0, pos="x")
    assert "pos must be an integer" in panel.error
    panel.set_state({"hook": "bogus"})
    assert "hook" in panel.error and panel.hook == "resid_pre"
    panel.set_state({"hook": "attn_out"})   # chosen, not yet run: the heatmap still says what it shows
    assert panel.shown_hook == "resid_pre" and "patching resid_pre from" in panel._static_html()
    panel.set_state({"corrupted": "the"})
    _send(panel, cmd="run")
    assert "must be as many tokens" in panel.error and panel.values == values and not panel.running
    panel.set_state({"corrupted": "the cat sat"})   # the model cannot tell identical prompts apart
    _send(panel, cmd="run")
    panel.wait(60)
    assert "same logit difference" in panel.error and panel.values == values and not panel.running
    panel.set_state({"corrupted": "the dog sat", "hook": "mlp_out"})
    _send(panel, cmd="run")
    panel.wait(60)
    assert panel.error == "" and panel.values != values and panel.cell == [] and panel.shown_hook == "mlp_out"


def test_patching_panel_stop_ends_the_run_and_keeps_the_last_heatmap(tok, numpy_active):
    model = _gpt(tok)
    panel = PatchingPanel(model, tok, "the cat sat", "the dog sat", "o", "a", wait=True)
    values, forwards = panel.values, []

    def stop_in_the_second_forward(activation, name):   # (as a Stop click lands while the experiment runs)
        forwards.append(name)
        if len(forwards) == 2:
            _send(panel, cmd="stop")
    panel.set_state({"hook": "mlp_out"})
    with model.hooks([("hook_embed", stop_in_the_second_forward)]):
        assert not panel.run(wait=True)
    assert len(forwards) == 2 and panel.error == "stopped: the heatmap is the previous run's"
    assert panel.values == values and panel.shown_hook == "resid_pre" and not panel.running
    assert not model.has_hooks   # the stop's own hook is gone with the run
    panel._stop.set()   # a Stop left over from an ended run does not stop the next one
    assert panel.run(wait=True) and panel.error == "" and panel.shown_hook == "mlp_out" and panel.values != values


@pytest.mark.parametrize("family", [_gpt, _llama])
def test_attention_heatmap_from_a_cache_shows_each_cached_pattern_with_its_layer(tok, family, use_backend):
    model, prompt = family(tok), "the cat sat"
    ids = np.asarray([tok.encode(prompt)], np.int32)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    with lab.no_grad():
        _, att = model(ids, return_attention=True)
    w = AttentionHeatmap(cache, prompt, tok)
    H = w.n_head
    assert w.layers == [0, 1] and w.tokens == list(prompt) and (w.layer, w.head) == (0, 0)
    arr = np.frombuffer(w.weights, np.float32).reshape(2, H, len(prompt), len(prompt))
    for layer in range(2):
        np.testing.assert_allclose(arr[layer], att[layer].numpy()[0], atol=1e-6)
    one = AttentionHeatmap(cache, ids, tok, hook="blocks.1.attn.hook_pattern", head=H - 1)
    assert one.layers == [1] and one.layer == 1 and one.head == H - 1 and one.n_layer == 1
    np.testing.assert_array_equal(np.frombuffer(one.weights, np.float32).reshape(1, H, 11, 11), arr[1:])
    one.layer = 0   # not cached: the nearest that is
    assert one.layer == 1
    assert one._static_html().startswith("<b>AttentionHeatmap</b>: layer 1 x ")
    assert one._static_png().startswith("iVBOR")
    labels = AttentionHeatmap(cache, list("THE CAT SAT"), hook=["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_pattern",
                                                                "blocks.1.attn.hook_pattern"])
    assert labels.tokens == list("THE CAT SAT") and labels.layers == [0, 1]   # in layer order, once each
    np.testing.assert_array_equal(np.frombuffer(labels.weights, np.float32), arr.ravel())
    cropped = AttentionHeatmap(cache, prompt, tok, max_tokens=4)
    assert cropped.tokens == list(" sat") and "the last 4 of 11 tokens" in cropped._static_html()
    np.testing.assert_array_equal(np.frombuffer(cropped.weights, np.float32).reshape(2, H, 4, 4), arr[:, :, -4:, -4:])


def test_attention_heatmap_from_a_cache_refuses_what_it_cannot_show(tok, numpy_active):
    model, prompt = _gpt(tok), "the cat"
    ids = np.asarray([tok.encode(prompt)] * 2, np.int32)
    _, cache = model.run_with_cache(ids, names_filter=["blocks.1.attn.hook_pattern", "blocks.0.hook_resid_pre"])
    for args, kwargs, message in (
            ((cache, prompt, tok), {"hook": "blocks.0.attn.hook_pattern"},
             r"'blocks.0.attn.hook_pattern' is not in the cache; cached patterns: \['blocks.1.attn.hook_pattern'\]"),
            ((cache, prompt, tok), {"hook": "blocks.0.hook_resid_pre"}, "hook must be a blocks.{i}.attn.hook_pattern"),
            ((cache, prompt, tok), {"hook": []}, "hook must be a blocks"),
            ((cache, prompt, tok), {"batch": 2}, "batch must be an integer >= 0 and <= 1, got 2"),
            ((cache, "the ca", tok), {}, "the cache holds 7 positions but the tokens given are 6"),
            ((cache, prompt, None), {}, "needs a tokenizer"),
            ((cache, [1.5, 2.5], tok), {}, "tokens must be the text or the token ids"),
    ):
        with pytest.raises(ValueError, match=message):
            AttentionHeatmap(*args, **kwargs)
    _, no_patterns = model.run_with_cache(ids, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="the cache holds no attention pattern"):
        AttentionHeatmap(no_patterns, prompt, tok)
    with pytest.raises(ValueError, match="hook= and batch= pick from an ActivationCache"):
        AttentionHeatmap(model, prompt, tok, hook="blocks.1.attn.hook_pattern")
    second = AttentionHeatmap(cache, prompt, tok, batch=1)
    np.testing.assert_array_equal(np.frombuffer(second.weights, np.float32).reshape(1, 2, 7, 7),
                                  cache["blocks.1.attn.hook_pattern"][1:])


def test_panels_are_exported_from_lab():
    assert lab.LogitLensPanel is LogitLensPanel and lab.PatchingPanel is PatchingPanel
    assert lab.AttentionHeatmap is AttentionHeatmap
    with pytest.raises(AttributeError, match="no attribute 'NoSuchPanel'"):
        lab.NoSuchPanel
