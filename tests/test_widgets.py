"""The panels' Python side: traits and messages, as the browser would send them."""
import time
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer

pytest.importorskip("anywidget")
from lab.widgets import (AttentionHeatmap, EdgeDiagnosticsPanel, GenerationPanel, LogitLensPanel,  # noqa: E402
                         PatchingPanel, PlanEstimator, TrainingPanel)


@pytest.fixture(scope="module")
def data():
    text = load_corpus()[:60_000]
    tok = CharTokenizer.from_text(text)
    return tok, *train_val_split(tok.encode(text))


def _trainer(data, steps=30, **kw):
    tok, tr, va = data
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16))
    return Trainer(m, tr, va, TrainConfig(**{"steps": steps, "batch_size": 4, "log_every": 1, "eval_every": 10, **kw}))


def _send(widget, **content):
    widget._on_message(widget, content, [])


def test_training_panel_runs_and_fills_its_traits(data, numpy_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    t = _trainer(data)
    panel = TrainingPanel(t, tokenizer=data[0], sample_every=10, max_updates_per_s=1000)
    updates = []
    panel.observe(lambda c: updates.append(c), names="history")
    assert panel.run(wait=True)
    assert panel.status == "done" and panel.step == 30 and panel.total_steps == 30
    assert len(panel.history) == 30 and panel.history[-1]["val_loss"] is not None
    assert panel.history[-1]["loss"] < panel.history[0]["loss"]
    assert panel.sample and panel.tokens_per_s > 0 and len(updates) >= 10
    bundle = panel._repr_mimebundle_()
    data_ = bundle[0] if isinstance(bundle, tuple) else bundle
    # what nbval compares holds no run-dependent numbers; the loss curves travel as an image
    assert data_["text/plain"] == "TrainingPanel()"
    n = t.model.num_parameters()
    assert data_["text/html"] == f'<div class="lab-static"><b>TrainingPanel</b>: 30 steps of {n:,} parameters</div>'
    assert data_["image/png"].startswith("iVBOR")


def test_training_panel_updates_are_throttled(data, numpy_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    panel = TrainingPanel(_trainer(data, steps=40), max_updates_per_s=2)
    updates = []
    panel.observe(lambda c: updates.append(c), names="history")
    t0 = time.perf_counter()
    panel.run(wait=True)
    elapsed = time.perf_counter() - t0
    assert len(updates) <= 2 * elapsed + 2 and len(panel.history) == 40  # the last state always arrives


def test_stop_pause_and_double_start_from_messages(data, numpy_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    t = _trainer(data, steps=100_000)
    panel = TrainingPanel(t)
    seen = []
    t.callbacks.append(lambda r: seen.append(r["step"]))
    _send(panel, cmd="start")
    while len(seen) < 3:
        time.sleep(0.01)
    _send(panel, cmd="start")
    assert panel.error == "training is already running"
    _send(panel, cmd="pause")
    time.sleep(0.2)
    paused_at = t.step_num
    time.sleep(0.3)
    assert panel.status == "paused" and t.step_num <= paused_at + 1
    _send(panel, cmd="resume")
    time.sleep(0.2)
    assert t.step_num > paused_at
    asked_at = t.step_num
    _send(panel, cmd="stop")
    panel.wait(10)
    assert panel.status == "stopped" and t.step_num <= asked_at + 1  # stops within one step
    _send(panel, cmd="set", values={"lr": "-1"})
    assert "lr must be a finite number > 0" in panel.error
    _send(panel, cmd="set", values={"lr": "0.002", "batch_size": "6", "steps": "50"})
    assert panel.hparams["lr"] == 0.002 and t.cfg.batch_size == 6 and panel.total_steps == 50
    _send(panel, cmd="explode")
    assert "unknown command" in panel.error


def test_attention_heatmap_ships_the_models_weights_as_bytes(data, use_backend):
    tok = data[0]
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, block_size=16))
    text = "In the beginning God created"
    w = AttentionHeatmap(m, text, tok)
    T = 16  # cropped to block_size, the last tokens
    assert w.tokens == list(text[-16:]) and (w.n_layer, w.n_head) == (2, 4)
    arr = np.frombuffer(w.weights, dtype=np.float32).reshape(2, 4, T, T)
    with lab.no_grad():
        _, att = m.eval()(tok.encode(text[-16:])[None], return_attention=True)
    np.testing.assert_allclose(arr[1, 3], att[1].numpy()[0, 3], rtol=1e-6)
    np.testing.assert_allclose(arr.sum(-1), 1, rtol=1e-5)
    w.layer, w.head = 7, -2
    assert (w.layer, w.head) == (1, 0)  # clamped to what exists
    with pytest.raises(ValueError, match="non-empty text"):
        AttentionHeatmap(m, "", tok)


def _gguf_llama(tmp_path, heads=6, kv_heads=2):
    """A small Llama model and its byte-level BPE tokenizer, both from one GGUF file (tests/ggufs.py)."""
    pytest.importorskip("gguf")
    from ggufs import hf_tensors, write_gguf
    path = write_gguf(tmp_path / "m.gguf", hf_tensors(hidden=8 * heads, heads=heads, kv_heads=kv_heads),
                      heads=heads, kv_heads=kv_heads)
    return path, lab.from_pretrained(path), lab.load_tokenizer(path)


def test_attention_heatmap_shows_each_query_head_of_a_gqa_model_under_its_kv_head(tmp_path, use_backend):
    torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
    path, model, tok = _gguf_llama(tmp_path)   # 6 query heads reading 2 key-value heads: 3 each
    text = "hi hi é hi"
    w = AttentionHeatmap(model, text, tok, head=5)
    ids = tok.encode(text)
    T = len(ids)
    assert (w.n_layer, w.n_head, w.n_kv_head, w.head) == (2, 6, 2, 5)
    assert [w.kv_head(h) for h in range(6)] == [0, 0, 0, 1, 1, 1]   # transformers' repeat_kv order
    with pytest.raises(ValueError, match=r"head must be an integer >= 0 and <= 5, got 6"):
        w.kv_head(6)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               attn_implementation="eager",
                                                               torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = theirs(torch.tensor(ids[None], dtype=torch.long), output_attentions=True).attentions
    arr = np.frombuffer(w.weights, dtype=np.float32).reshape(2, 6, T, T)
    for layer in range(2):   # (float32 softmax of scores that differ in summation order)
        np.testing.assert_allclose(arr[layer], want[layer][0].numpy(), atol=1e-5, rtol=0)
    assert w._static_html() == ("<b>AttentionHeatmap</b>: 2 layers x 6 query heads (2 key-value heads, each shared "
                                f"by 3) over {T} tokens, showing layer 0, head 5")
    mqa = lab.LlamaLM(lab.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=12, num_attention_heads=3,
                                      num_key_value_heads=1))
    assert "3 query heads (one key-value head shared by all)" in AttentionHeatmap(mqa, text, tok)._static_html()


def test_attention_heatmap_labels_tokens_that_split_a_character_with_their_bytes(tmp_path, numpy_backend,
                                                                                   monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    _, model, tok = _gguf_llama(tmp_path, heads=4, kv_heads=4)
    w = AttentionHeatmap(model, "hi é\n😀", tok)   # no merges beyond "hi": é and 😀 arrive byte by byte
    assert w.tokens == ["hi", " ", "<0xC3>", "<0xA9>", "\n", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert w.n_kv_head == w.n_head == 4 and "key-value" not in w._static_html()
    char = CharTokenizer.from_text("aé😀")   # a tokenizer of whole characters shows them
    assert AttentionHeatmap(model, "é😀a", char).tokens == ["é", "😀", "a"]


def test_attention_heatmap_keeps_the_last_max_tokens_and_says_so(tmp_path, numpy_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    _, model, tok = _gguf_llama(tmp_path)   # its block is 128 positions: max_tokens bounds the L x H x T x T weights
    text = " ".join(["hi"] * 100)
    w = AttentionHeatmap(model, text, tok, max_tokens=7)
    assert w.tokens == [" hi"] * 7 and len(w.weights) == 2 * 6 * 7 * 7 * 4
    assert "over the last 7 of 100 tokens" in w._static_html()
    assert len(AttentionHeatmap(model, text * 2, tok).tokens) == 128   # the model's block when it is the smaller


def test_plan_estimator_recomputes_on_every_change():
    w = PlanEstimator(preset="tiny", batch=12, tokens=1e6, device="m1")
    first = dict(w.result)
    assert first["fits"] and first["params"] > 0
    w.update(batch=24)
    assert w.result["step_time_s"] > first["step_time_s"] and w.result["memory"]["total"] > first["memory"]["total"]
    w._on_message(w, {"cmd": "set", "values": {"mode": "lora", "lora_rank": 4}}, [])
    assert w.result["trainable_params"] < w.result["params"] / 10
    w.update(preset="shakespeare-char")
    assert w.form["n_embd"] == 384 and w.result["params"] > 10_000_000
    w.update(n_embd=512)
    assert w.form["preset"] == "custom"
    w.update(batch="-3")
    assert "batch must be an integer >= 1" in w.error
    w.update(bogus=1)
    assert "unknown field" in w.error


def test_generation_panel_streams_and_compares_base_and_adapter(data, use_backend):
    from lab import lora
    from lab.generate import generate
    tok = data[0]
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16))
    p = GenerationPanel(m, tok, prompt="And ")
    assert not p.has_adapter
    outputs = []
    p.observe(lambda c: outputs.append(c["new"]), names="output")
    p.max_tokens = 20
    p.generate(seed=3)
    assert p.output == generate(m, "And ", 20, tokenizer=tok, temperature=0.8, seed=3)
    lora.apply(m, r=2)
    for _, a in lora.adapters(m):
        a.lora_B.data = a.lora_B.backend.from_numpy(np.full(a.lora_B.shape, 0.3, dtype=np.float32))
    p2 = GenerationPanel(m, tok, prompt="And ")
    p2.adapter_mode, p2.max_tokens, p2.temperature = "both", 20, 0.5
    p2.generate(seed=1)
    assert p2.has_adapter and p2.output and p2.base_output and p2.output != p2.base_output
    p2.prompt = ""
    p2.generate()
    assert p2.error == "enter a prompt first"
    p2.prompt, p2.top_p = "And", 1.5
    p2.adapter_mode = "adapter"
    p2.generate()
    assert "top_p must be a finite number > 0 and <= 1, got 1.5" in p2.error and not p2.running


def test_generation_panel_runs_both_sides_with_the_controls_it_was_sent(data, use_backend, monkeypatch):
    # the base pass read the prompt and the controls again: typed into during the adapter's pass, they changed it
    from lab import lora
    from lab.widgets import generation
    tok = data[0]
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16))
    lora.apply(m, r=2)   # (B = 0: the adapter changes nothing, so both sides of one run are the same text)
    p = GenerationPanel(m, tok, prompt="And ")
    p.adapter_mode, p.max_tokens = "both", 8
    real = generation.generate

    def typed_meanwhile(*args, **kwargs):
        out = real(*args, **kwargs)
        p.prompt, p.temperature, p.max_tokens = "The ", 3.0, 2   # as the browser sets them while the run goes on
        return out
    monkeypatch.setattr(generation, "generate", typed_meanwhile)
    p.generate(seed=3)
    assert p.output == p.base_output == real(m, "And ", 8, tokenizer=tok, temperature=0.8, seed=3), p.error


def test_edge_diagnostics_panel_follows_the_monitor(data, numpy_backend, monkeypatch):
    from lab.engine import backend as B
    from lab.diagnostics import DiagnosticsMonitor
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    t = _trainer(data, steps=20, log_every=5)
    mon = DiagnosticsMonitor(t, every=10, snapshot_every=5, power_iters=2)
    panel = EdgeDiagnosticsPanel(mon)
    t.run(progress=False)
    assert [r["step"] for r in panel.reports] == [10, 20]
    assert panel.reports[-1]["recommendation"] and panel.surface_png.startswith("iVBOR")  # a PNG
    assert panel.surface_summary["edge_band_fraction"] == 0.0
    import json
    json.dumps(panel.reports)  # plain JSON for the browser (no NaN, no numpy scalars)


def test_edge_diagnostics_panel_keeps_every_monitor_report_beside_reports_given(data, numpy_backend, monkeypatch):
    """Reports given (reports=, add_reports) beside a monitor's made the panel skip as many of the monitor's new
    ones: it took the monitor's reports from its own count on."""
    from lab.engine import backend as B
    from lab.diagnostics import DiagnosticsMonitor
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    t = _trainer(data, steps=30, log_every=5)
    mon = DiagnosticsMonitor(t, every=10, snapshot_every=5, power_iters=1, fisher_examples=1)
    panel = EdgeDiagnosticsPanel(mon, reports=[{"step": 0, "sharpness": 1.0}], surface=False)
    t.run(progress=False)
    panel.add_reports([{"step": 100}])
    assert [r["step"] for r in mon.reports] == [10, 20, 30]
    assert [r["step"] for r in panel.reports] == [0, 10, 20, 30, 100]


def test_preset_switch_rebuilds_the_model_between_runs(numpy_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    panel = TrainingPanel.for_preset("tiny", steps=2, batch_size=2)
    assert panel.presets == sorted(PRESETS) and panel.hparams["preset"] == "tiny"
    data_vocab = panel.trainer.model.config.vocab_size
    panel.run(wait=True)
    assert panel.history
    _send(panel, cmd="set", values={"preset": "shakespeare-char"})
    assert panel.error == "" and panel.hparams["preset"] == "shakespeare-char"
    assert panel.trainer.model.config.n_embd == 384 and panel.history == [] and panel.status == "idle"
    assert panel.hparams["parameters"] == panel.trainer.model.num_parameters()
    _send(panel, cmd="set", values={"preset": "llama-tiny"})   # a preset of another family builds that family
    assert panel.error == "" and isinstance(panel.trainer.model, lab.LlamaLM)
    assert panel.trainer.model.config.vocab_size == data_vocab and panel.run(wait=True) and panel.history
    _send(panel, cmd="set", values={"preset": "huge"})
    assert "preset must be one of" in panel.error and "'huge'" in panel.error
    given = TrainingPanel(panel.trainer)
    _send(given, cmd="set", values={"preset": "tiny"})
    assert "TrainingPanel.for_preset" in given.error


PANEL_FILES = {TrainingPanel: "training_panel.js", AttentionHeatmap: "attention_heatmap.js",
               PlanEstimator: "plan_estimator.js", GenerationPanel: "generation_panel.js",
               EdgeDiagnosticsPanel: "edge_diagnostics.js", LogitLensPanel: "logit_lens.js", PatchingPanel: "patching.js"}


def _data_imports(source):
    """{names imported: the module's source} for each import from a data: URL in `source`."""
    import base64
    import re
    return {tuple(n.strip() for n in names.split(",")): base64.b64decode(data).decode("utf-8") for names, data in
            re.findall(r'import \{([^}]*)\} from "data:text/javascript;base64,([A-Za-z0-9+/=]*)"', source)}


@pytest.mark.parametrize("panel", list(PANEL_FILES), ids=lambda p: p.__name__)
def test_each_panels_module_imports_the_shared_helpers_instead_of_a_pasted_copy(panel):
    import re
    from lab.widgets.base import asset
    path, common = asset(PANEL_FILES[panel]), asset("common.js").read_text(encoding="utf-8")
    helpers = re.findall(r"^export function (\w+)", common, re.M)
    assert panel._esm.path == path   # the file itself, which anywidget watches under ANYWIDGET_HMR=1
    assert panel._css._path == asset("panels.css")   # anywidget reads and watches the stylesheet itself
    assert 'from "./common.js"' in path.read_text(encoding="utf-8")   # a plain ES module on disk
    served = str(panel._esm)
    imports = _data_imports(served)
    assert len(imports) == 1 and list(imports.values()) == [common]   # common.js whole, as its own module
    (names,) = imports
    outside = re.sub(r'"data:[^"]*"', '""', served)
    assert not any(f"function {h}(" in outside for h in helpers), "a helper was pasted into the panel's module"
    used = {h for h in helpers if re.search(rf"\b{h}\(", outside)}
    assert used and used <= set(names) <= set(helpers), (used, names)
    if panel is PlanEstimator:   # what an instance sends the browser is the same linked module
        assert panel()._esm == served


def test_every_panel_is_checked_for_a_linked_module():
    from lab.widgets.base import Panel
    assert {c for c in Panel.__subclasses__() if c.__module__.startswith("lab.")} == set(PANEL_FILES)


def test_a_panel_module_that_cannot_be_linked_is_refused_naming_the_import(tmp_path):
    import re
    from lab.widgets.base import linked_source
    (tmp_path / "a.js").write_text('import { b } from "./b.js";\nexport const a = 1;\n')
    (tmp_path / "b.js").write_text('import { a } from "./a.js";\nexport const b = 2;\n')
    with pytest.raises(ValueError, match=r"in a circle: a.js -> b.js -> a.js"):
        linked_source(tmp_path / "a.js")
    for spec in ("./missing.js", "../common.js", "lodash", "./sub/x.js"):
        (tmp_path / "p.js").write_text(f'import {{ x }} from "{spec}";\nexport default {{}};\n')
        with pytest.raises(ValueError, match=rf"p.js: cannot link import '{re.escape(spec)}'.*beside it"):
            linked_source(tmp_path / "p.js")
    (tmp_path / "u.js").write_text('import * as d3 from "https://example.invalid/d3.js";\nexport * from "./b2.js";\n')
    (tmp_path / "b2.js").write_text("export const b2 = 2;\n")
    linked = linked_source(tmp_path / "u.js")
    assert '"https://example.invalid/d3.js"' in linked and 'export * from "data:text/javascript;base64,' in linked


def _wait_for(condition, write, attempts=20):
    # the watcher starts in its thread: write again until a change is seen
    for _ in range(attempts):
        write()
        deadline = time.time() + 1.0
        while time.time() < deadline:
            if condition():
                return True
            time.sleep(0.02)
    return False


def test_anywidget_hmr_resends_a_panel_when_its_file_or_a_helper_it_imports_changes(tmp_path, monkeypatch):
    pytest.importorskip("watchfiles")
    from lab.widgets.base import Panel, PanelModule
    (tmp_path / "common.js").write_text("export function el() { return 1; }\n")
    (tmp_path / "panel.js").write_text('import { el } from "./common.js";\nexport default { render() { el(); } };\n')
    (tmp_path / "other.js").write_text("export const unrelated = 1;\n")
    assert not PanelModule(tmp_path / "panel.js")._background_thread   # without ANYWIDGET_HMR=1: no watcher
    monkeypatch.setenv("ANYWIDGET_HMR", "1")

    class Hot(Panel):
        _esm = PanelModule(tmp_path / "panel.js")

    try:
        assert Hot._esm.path == tmp_path / "panel.js" and Hot._esm._background_thread
        panel, sent = Hot(), []
        Hot._esm.changed.connect(sent.append)
        assert _wait_for(lambda: "return 2" in "".join(_data_imports(panel._esm).values()),
                         lambda: (tmp_path / "common.js").write_text("export function el() { return 2; }\n"))
        assert _wait_for(lambda: "render(v)" in panel._esm, lambda: (tmp_path / "panel.js").write_text(
            'import { el } from "./common.js";\nexport default { render(v) { el(); } };\n'))
        n = len(sent)
        (tmp_path / "other.js").write_text("export const unrelated = 2;\n")   # not imported: nothing is re-sent
        time.sleep(1.0)
        assert len(sent) == n and sent[-1] == panel._esm
    finally:
        Hot._esm.stop_thread()
    # an installed package's copies are never watched
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "panel.js").write_text("export default {};\n")
    assert not PanelModule(tmp_path / "site-packages" / "panel.js")._background_thread


def test_generation_panel_chat_keeps_each_sides_conversation_and_streams_replies(tmp_path, use_backend):
    from test_chat import _tokenizer
    from lab import lora
    tok = _tokenizer(tmp_path)
    lab.manual_seed(0)
    m = lab.LlamaLM(replace(lab.models.PRESETS["llama-tiny"], vocab_size=tok.vocab_size, max_position_embeddings=96))
    lora.apply(m, r=2, targets="all-linear")
    for _, a in lora.adapters(m):   # the adapter changes the replies: the two conversations differ
        a.lora_B.data = a.lora_B.backend.from_numpy(np.full(a.lora_B.shape, 0.3, dtype=np.float32))
    p = GenerationPanel(m, tok, chat=True)
    p.adapter_mode, p.max_tokens, p.temperature = "both", 6, 0.7
    streamed = []
    p.observe(lambda c: streamed.append(c["new"]), names="output")
    p.prompt = "hi"
    p.generate(seed=1)
    assert p.prompt == "" and p.error == "" and not p.running
    user = {"role": "user", "content": "hi"}
    adapter_reply = lab.chat(m, tok, [user], 6, temperature=0.7, seed=1, adapter=True)
    base_reply = lab.chat(m, tok, [user], 6, temperature=0.7, seed=1, adapter=False)
    assert p.history == [user, {"role": "assistant", "content": adapter_reply}]
    assert p.base_history == [user, {"role": "assistant", "content": base_reply}] and adapter_reply != base_reply
    assert p.output == "" and all(adapter_reply.startswith(s) for s in streamed)   # streamed, then a turn
    p.prompt = "more"
    p.generate(seed=2)   # the second turn continues each side's own answers
    turns = p.history[:2] + [{"role": "user", "content": "more"}]
    assert p.history == turns + [{"role": "assistant",
                                  "content": lab.chat(m, tok, turns, 6, temperature=0.7, seed=2, adapter=True)}]
    assert len(p.base_history) == 4 and p.base_history[1]["content"] == base_reply
    assert "<b>user</b>: more" in p._static_html()
    p.beams, p.prompt = 2, "x"
    p.generate()
    assert "does not chat: set beams to 1" in p.error and len(p.history) == 4 and p.prompt == "x"
    p.beams, p.top_p = 1, 1.5
    p.generate()   # refused by chat: the user's turn it would have answered is not kept
    assert "top_p must be" in p.error and len(p.history) == 4 and len(p.base_history) == 4
    p.top_p, p.prompt = 1.0, "a longer message than the model can hold with the turns before it"
    p.generate()
    import re
    assert re.search(r"the conversation is 1\d\d tokens in the chat template, more than the model's block_size 96: "
                     r"drop earlier turns \(a panel's Clear", p.error), p.error
    assert len(p.history) == 4
    p._on_message(p, {"cmd": "clear"}, [])   # the panel's Clear button
    assert p.history == [] and p.base_history == [] and p.error == ""
    p.prompt = ""
    p.generate()
    assert p.error == "enter a message first"
    from lab.checks import InputError
    with pytest.raises(InputError, match=r"chat=True\) needs a tokenizer with a chat template"):
        GenerationPanel(m, CharTokenizer.from_text("abc"), chat=True)
    with pytest.raises(ValueError, match="chat must be a boolean, got 'yes'"):
        GenerationPanel(m, tok, chat="yes")
    plain = GenerationPanel(m, CharTokenizer.from_text("abc"))
    with pytest.raises(InputError, match=r"chat=True\) needs a tokenizer with a chat template"):
        plain.chat = True
    assert plain.chat is False
