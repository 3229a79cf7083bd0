"""The panels in a real browser: JupyterLab on loopback with a token, a notebook that shows every panel, driven by
Playwright through Debian's Chromium. Screenshots of every widget go to $LAB_SCREENSHOTS (default
browser-screenshots/), whose path the test prints."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jupyter_harness import CHROMIUM, ROOT, jupyterlab, notebook_page, write_notebook  # noqa: E402

REQUIRED = os.environ.get("LAB_REQUIRE_BROWSER") == "1"

if not Path(CHROMIUM).exists() and not REQUIRED:
    pytest.skip("chromium is not installed (LAB_REQUIRE_BROWSER=1 makes this an error)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api") if not REQUIRED else __import__("playwright.sync_api").sync_api

CELLS = [
    """import numpy as np, lab
from dataclasses import replace
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, TransformerLM
from lab.train import Trainer, TrainConfig
from lab.widgets import TrainingPanel, AttentionHeatmap, PlanEstimator, GenerationPanel, EdgeDiagnosticsPanel
lab.set_backend("numpy"); lab.manual_seed(0)
text = load_corpus()[:200_000]; tok = CharTokenizer.from_text(text); tr, va = train_val_split(tok.encode(text))
model = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, block_size=32))
trainer = Trainer(model, tr, va, TrainConfig(steps=100_000, batch_size=8, log_every=2, eval_every=20))""",
    "panel = TrainingPanel(trainer, tokenizer=tok, sample_every=10, preset='tiny (2 layers)'); panel",
    "heat = AttentionHeatmap(model, 'In the beginning God created the heaven', tok); heat",
    # grouped-query attention: 6 query heads reading 2 key-value heads
    """gqa = lab.LlamaLM(lab.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=24, num_attention_heads=6,
                                    num_key_value_heads=2, max_position_embeddings=32))
AttentionHeatmap(gqa, 'And God said', tok)""",
    "PlanEstimator(preset='tiny', batch=12, tokens=1e6, device='m1')",
    "GenerationPanel(model, tok, prompt='And God said')",
    # chat mode: a byte-level tokenizer with a chat template, a small Llama with LoRA adapters, both side by side
    """from tokenizers import Tokenizer, decoders, models as tkm, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from lab import lora
bl = Tokenizer(tkm.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
bl.pre_tokenizer, bl.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
fast = PreTrainedTokenizerFast(tokenizer_object=bl, eos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}<|im_end|>\\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
fast.save_pretrained("chat-tok"); chat_tok = lab.load_tokenizer("chat-tok")
talker = lora.apply(lab.LlamaLM(replace(PRESETS["llama-tiny"], vocab_size=chat_tok.vocab_size, max_position_embeddings=512)),
                    r=2, targets="all-linear")
GenerationPanel(talker, chat_tok, chat=True, adapter_mode="both", max_tokens=12)""",
    """from lab.diagnostics import DiagnosticsMonitor
small = Trainer(model, tr, va, TrainConfig(steps=20, batch_size=4, log_every=5, eval_every=20))
mon = DiagnosticsMonitor(small, every=10, snapshot_every=5, power_iters=2)
small.run(progress=False)
EdgeDiagnosticsPanel(mon)""",
    # a panel hot-reloaded from its files: its module and the helper module it imports live in hot/
    """import os, pathlib
from lab.widgets.base import Panel, PanelModule
hot = pathlib.Path("hot"); hot.mkdir(exist_ok=True)
(hot / "common.js").write_text('export function label() { return "helper 1"; }\\n')
(hot / "hot.js").write_text('import { label } from "./common.js";\\n'
                            'export default { render({ el }) { el.innerHTML = `<b class="lab-hot">${label()}</b>`; } };\\n')
os.environ["ANYWIDGET_HMR"] = "1"
class HotPanel(Panel):
    _esm = PanelModule(hot / "hot.js")
del os.environ["ANYWIDGET_HMR"]
HotPanel()""",
]


@pytest.fixture(scope="module")
def jupyterlab_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab-browser")
    write_notebook(work / "panels.ipynb", CELLS)
    with jupyterlab(work) as (url, token, _):
        yield url, token, work


@pytest.fixture(scope="module")
def page(jupyterlab_server):
    url, token, _ = jupyterlab_server
    shots = Path(os.environ.get("LAB_SCREENSHOTS", ROOT / "browser-screenshots")).resolve()
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nwidget screenshots: {shots}")
    with notebook_page(playwright_api, url, token, "panels.ipynb") as pg:
        pg.shots = shots
        yield pg


def _shot(page, selector, name):
    node = page.locator(selector).first
    node.scroll_into_view_if_needed()
    node.screenshot(path=str(page.shots / f"{name}.png"))


def test_training_panel_plots_and_stop_stops_training(page):
    page.wait_for_selector(".lab-training .lab-start", timeout=120_000)
    page.click(".lab-training .lab-start")
    page.wait_for_function("document.querySelector('.lab-training .lab-badge').dataset.status === 'running'", timeout=30_000)
    page.wait_for_function("+document.querySelector('.lab-training canvas.lab-chart').dataset.points >= 6", timeout=60_000)
    page.wait_for_function("document.querySelector('.lab-training .lab-sample').textContent.length > 20", timeout=60_000)
    _shot(page, ".lab-training", "training_panel")
    page.click(".lab-training .lab-stop")
    page.wait_for_function("document.querySelector('.lab-training .lab-badge').dataset.status === 'stopped'", timeout=30_000)
    points = int(page.locator(".lab-training canvas.lab-chart").get_attribute("data-points"))
    time.sleep(1.5)
    assert int(page.locator(".lab-training canvas.lab-chart").get_attribute("data-points")) == points, "still training"


MHA, GQA = ".lab-attention:not(:has(.lab-kv-group))", ".lab-attention:has(.lab-kv-group)"


def test_heatmap_has_every_cell_and_a_thumbnail_switches_the_head(page):
    page.wait_for_selector(f"{MHA} canvas.lab-heatmap[data-cells]", timeout=120_000)
    cells = int(page.locator(f"{MHA} canvas.lab-heatmap").get_attribute("data-cells"))
    assert cells == 32 * 32  # the text is cropped to block_size 32
    assert page.locator(f"{MHA} canvas.lab-heat-thumb").count() == 2 * 4
    page.click(f"{MHA} canvas.lab-heat-thumb[data-layer='1'][data-head='2']")
    page.wait_for_function(f"(() => {{ const c = document.querySelector('{MHA} canvas.lab-heatmap');"
                           " return c.dataset.layer === '1' && c.dataset.head === '2'; })()", timeout=10_000)
    box = page.locator(f"{MHA} canvas.lab-heatmap").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.8)
    page.wait_for_function(f"document.querySelector('{MHA} .lab-tooltip').textContent.includes('query')")
    _shot(page, MHA, "attention_heatmap")


def test_gqa_heatmap_groups_the_query_heads_under_their_kv_head(page):
    page.wait_for_selector(f"{GQA} canvas.lab-heatmap[data-cells]", timeout=120_000)
    assert page.locator(f"{GQA} .lab-kv-group").all_text_contents() == ["kv head 0: heads 0–2", "kv head 1: heads 3–5"]
    assert page.locator(f"{GQA} canvas.lab-heat-thumb").count() == 2 * 6
    assert page.locator(f"{GQA} select.lab-head option").all_text_contents() == [
        "0 (kv 0)", "1 (kv 0)", "2 (kv 0)", "3 (kv 1)", "4 (kv 1)", "5 (kv 1)"]
    thumb = f"{GQA} canvas.lab-heat-thumb[data-layer='1'][data-head='4']"
    assert page.locator(thumb).get_attribute("title") == "layer 1, head 4, reads kv head 1 with heads 3–5"
    page.click(thumb)
    page.wait_for_function(f"(() => {{ const c = document.querySelector('{GQA} canvas.lab-heatmap');"
                           " return c.dataset.layer === '1' && c.dataset.head === '4'; })()", timeout=10_000)
    _shot(page, GQA, "attention_heatmap_gqa")


def test_plan_shows_numbers_and_recomputes(page):
    page.wait_for_selector(".lab-plan .lab-predicted-time", timeout=120_000)
    assert any(ch.isdigit() for ch in page.locator(".lab-plan .lab-predicted-time").inner_text())
    before = page.locator(".lab-plan .lab-step-time").inner_text()
    page.fill(".lab-plan .lab-input-batch", "48")
    # a fixed token budget: 4x the batch is 4x fewer steps, each slower; the step time must change
    page.wait_for_function(f"document.querySelector('.lab-plan .lab-step-time').textContent !== {json.dumps(before)}",
                           timeout=10_000)
    assert page.locator(".lab-plan .lab-membar .lab-bar").count() >= 5
    _shot(page, ".lab-plan", "plan_estimator")


def test_generation_streams_text(page):
    page.wait_for_selector(".lab-generation .lab-generate", timeout=120_000)
    page.click(".lab-generation .lab-generate")
    page.wait_for_function("document.querySelector('.lab-generation .lab-output').textContent.length > 'And God said'.length + 20",
                           timeout=60_000)
    _shot(page, ".lab-generation", "generation_panel")


def test_generation_stop_button_ends_a_long_generation(page):
    """max tokens 10000 and Generate, then Stop: the run ends (Generate enabled again) and the text made stays."""
    gen = ".lab-generation:not(.lab-generation-chat)"   # (the page also holds a panel in chat mode)
    page.wait_for_selector(f"{gen} .lab-generate:not([disabled])", timeout=120_000)
    page.fill(f"{gen} .lab-input-max_tokens", "10000")
    page.dispatch_event(f"{gen} .lab-input-max_tokens", "change")
    page.click(f"{gen} .lab-generate")
    page.wait_for_selector(f"{gen} .lab-stop:not([disabled])", timeout=30_000)
    page.wait_for_function(f"document.querySelector('{gen} .lab-output').textContent.length > 'And God said'.length + 5",
                           timeout=60_000)
    page.click(f"{gen} .lab-stop")
    page.wait_for_selector(f"{gen} .lab-generate:not([disabled])", timeout=30_000)
    assert page.locator(f"{gen} .lab-stop").is_disabled()
    text = page.locator(f"{gen} .lab-output").inner_text()
    assert len("And God said") < len(text) < len("And God said") + 10_000
    assert page.locator(f"{gen} .lab-error").inner_text() == ""


def test_generation_chat_mode_keeps_both_conversations_and_clears(page):
    """Two messages in chat mode with base and adapter side by side: each column shows its user and assistant turns
    (streamed, then kept), the message box empties on Send; Clear starts a new conversation."""
    chat = ".lab-generation-chat"
    page.wait_for_selector(f"{chat} .lab-generate:not([disabled])", timeout=120_000)
    assert page.locator(f"{chat} .lab-generate").inner_text() == "Send"
    for n, message in ((4, "hello"), (8, "and then?")):
        page.fill(f"{chat} .lab-prompt", message)
        page.click(f"{chat} .lab-generate")
        page.wait_for_function(f"document.querySelectorAll('{chat} .lab-turn').length === {n} && "
                               f"!document.querySelector('{chat} .lab-generate').disabled", timeout=60_000)
        assert page.locator(f"{chat} .lab-turn-user").nth(n // 2 - 1).inner_text() == f"user: {message}"
        assert page.locator(f"{chat} .lab-prompt").input_value() == ""
    assert page.locator(f"{chat} .lab-caption").all_inner_texts() == ["with adapter", "base"]
    assert page.locator(f"{chat} .lab-error").inner_text() == ""
    _shot(page, chat, "generation_panel_chat")
    page.click(f"{chat} .lab-clear")
    page.wait_for_function(f"document.querySelectorAll('{chat} .lab-turn').length === 0", timeout=30_000)


def test_edge_diagnostics_show_reports_and_the_surface(page):
    page.wait_for_selector(".lab-edge .lab-latest table", timeout=180_000)
    assert "sharpness" in page.locator(".lab-edge .lab-latest").inner_text()
    assert int(page.locator(".lab-edge canvas.lab-chart").get_attribute("data-points")) >= 2
    page.wait_for_function("document.querySelector('.lab-edge img.lab-surface').naturalWidth > 100", timeout=30_000)
    _shot(page, ".lab-edge", "edge_diagnostics")


def test_anywidget_hmr_rerenders_a_panel_when_its_file_or_an_imported_helper_is_saved(page, jupyterlab_server):
    hot, text = jupyterlab_server[2] / "hot", "document.querySelector('.lab-hot')?.textContent"
    page.wait_for_function(f"{text} === 'helper 1'", timeout=120_000)
    (hot / "common.js").write_text('export function label() { return "helper 2"; }\n')
    page.wait_for_function(f"{text} === 'helper 2'", timeout=30_000)
    (hot / "hot.js").write_text('import { label } from "./common.js";\nexport default { render({ el }) {\n'
                                '  el.innerHTML = `<b class="lab-hot">panel 2, ${label()}</b>`; } };\n')
    page.wait_for_function(f"{text} === 'panel 2, helper 2'", timeout=30_000)
