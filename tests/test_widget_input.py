"""Malformed or out-of-range input from the browser: every panel shows an error and the kernel carries on;
a training panel runs one training at a time."""
import threading
from dataclasses import replace

import pytest

import lab
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer

pytest.importorskip("anywidget")
from lab.widgets import AttentionHeatmap, GenerationPanel, PlanEstimator, TrainingPanel  # noqa: E402

BAD_MESSAGES = ["not an object", 42, None, {"cmd": "no-such-command"}, {"cmd": "set", "values": "batch=3"},
                {"cmd": "set", "values": {"batch_size": -3}}, {"cmd": "set", "values": {"lr": "fast"}},
                {"cmd": "set", "values": {"nonexistent": 1}}, {"cmd": "set", "values": {"steps": "ten"}}]


@pytest.fixture(scope="module")
def setup():
    text = load_corpus()[:20_000]
    tok = CharTokenizer.from_text(text)
    tr, va = train_val_split(tok.encode(text))
    lab.manual_seed(0)
    model = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2,
                                  block_size=16))
    return model, tok, tr, va


def _send(panel, content):
    panel._on_message(panel, content, [])


@pytest.mark.parametrize("content", BAD_MESSAGES, ids=[repr(m)[:30] for m in BAD_MESSAGES])
def test_training_panel_bad_messages_show_an_error(setup, numpy_backend, content):
    model, tok, tr, va = setup
    with lab.engine.backend.using_backend(numpy_backend):
        panel = TrainingPanel(Trainer(model, tr, va, TrainConfig(steps=5, batch_size=2)), tokenizer=tok)
    hparams = dict(panel.hparams)
    _send(panel, content)  # must not raise
    assert panel.error, f"no error shown for {content!r}"
    assert panel.hparams == hparams and panel.trainer.cfg.batch_size == 2  # nothing half-applied


def test_start_twice_runs_one_training(setup, numpy_backend):
    model, tok, tr, va = setup
    with lab.engine.backend.using_backend(numpy_backend):
        trainer = Trainer(model, tr, va, TrainConfig(steps=10_000, batch_size=2, eval_every=10**6))
        panel = TrainingPanel(trainer, tokenizer=tok, sample_every=10**6)
        def training_threads():
            return [th for th in threading.enumerate() if th.name == "lab-training"]
        _send(panel, {"cmd": "start"})
        _send(panel, {"cmd": "start"})
        _send(panel, {"cmd": "start"})
        assert len(training_threads()) == 1
        assert panel.error == "training is already running"
        _send(panel, {"cmd": "stop"})  # at once: a Stop right after Start must not be lost
        panel.wait(30)
        assert panel.status == "stopped" and not training_threads()
        assert trainer.step_num < 10_000


@pytest.mark.parametrize("state", [{"temperature": "hot"}, {"max_tokens": "many"}, {"top_k": 1.5},
                                   {"prompt": 12}, {"beams": None}])
def test_generation_panel_refuses_bad_trait_values(setup, numpy_backend, state):
    model, tok, _, _ = setup
    panel = GenerationPanel(model, tok, prompt="And")
    before = {k: getattr(panel, k) for k in state}
    panel.set_state(state)  # as the browser's comm message would
    assert panel.error.startswith("invalid value from the panel")
    assert {k: getattr(panel, k) for k in state} == before


@pytest.mark.parametrize("settings,message", [({"prompt": ""}, "enter a prompt"), ({"temperature": -1.0}, "temperature"),
                                              ({"max_tokens": -5}, "max_new_tokens"), ({"top_p": 3.0}, "top_p"),
                                              ({"prompt": "\u2603 unknown"}, "not in this tokenizer")])
def test_generation_panel_bad_settings_show_an_error(setup, numpy_backend, settings, message):
    model, tok, _, _ = setup
    with lab.engine.backend.using_backend(numpy_backend):
        panel = GenerationPanel(model, tok, prompt="And")
        for k, v in settings.items():
            setattr(panel, k, v)
        panel.generate(wait=True)
    assert message in panel.error and not panel.running
    with lab.engine.backend.using_backend(numpy_backend):  # and the panel still works afterwards
        panel.prompt, panel.temperature, panel.max_tokens, panel.top_p = "And", 0.8, 5, 1.0
        panel.generate(wait=True, seed=0)
    assert panel.error == "" and len(panel.output) == 5


@pytest.mark.parametrize("content", [{"cmd": "set", "values": {"batch": -1}}, {"cmd": "set", "values": {"batch": "abc"}},
                                     {"cmd": "set", "values": {"tokens": "lots"}}, {"cmd": "set", "values": [1, 2]},
                                     {"cmd": "set", "values": {"n_head": 0}}, "garbage", {"cmd": "explode"}])
def test_plan_panel_bad_input_shows_an_error(content):
    panel = PlanEstimator()
    _send(panel, content)
    assert panel.error


def test_attention_panel_clamps_out_of_range_and_refuses_non_numbers(setup, numpy_backend):
    model, tok, _, _ = setup
    with lab.engine.backend.using_backend(numpy_backend):
        panel = AttentionHeatmap(model, "And God said", tok)
    panel.set_state({"layer": 99, "head": -1})  # out of range: clamped to the model's layers and heads
    assert panel.layer == 0 and panel.head == 0 and panel.error == ""
    panel.set_state({"head": "second"})        # not a number: refused, shown
    assert panel.error.startswith("invalid value from the panel") and panel.head == 0
