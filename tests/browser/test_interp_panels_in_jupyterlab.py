"""Issue #24's panels in a real browser (the harness of test_widgets_in_jupyterlab.py): the logit lens, activation
patching, and the attention heatmap of a cached hook_pattern, on a small model on the numpy backend. Screenshots go
to $LAB_SCREENSHOTS (default browser-screenshots/)."""
import os
import sys
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
from lab.data import CharTokenizer
from lab.models import PRESETS, TransformerLM
from lab.widgets import AttentionHeatmap, LogitLensPanel, PatchingPanel
lab.set_backend("numpy"); lab.manual_seed(0)
text = "the cat sat on the mat. a dog ran to the big red barn!"
tok = CharTokenizer.from_text(text)
model = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=32))""",
    "PatchingPanel(model, tok, 'the cat sat', 'the dog sat', 'o', 'a', hook='resid_post', wait=True)",
    """prompt = 'the cat sat on the mat'
_, cache = model.run_with_cache(np.array([tok.encode(prompt)]), names_filter=lambda n: n.endswith('hook_pattern'))
AttentionHeatmap(cache, prompt, tok, hook='blocks.1.attn.hook_pattern')""",
    "LogitLensPanel(model, tok, 'the cat sat on')",
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab-interp-browser")
    write_notebook(work / "interp.ipynb", CELLS)
    shots = Path(os.environ.get("LAB_SCREENSHOTS", ROOT / "browser-screenshots")).resolve()
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nwidget screenshots: {shots}")
    with jupyterlab(work) as (url, token, _), notebook_page(playwright_api, url, token, "interp.ipynb") as pg:
        pg.shots = shots
        yield pg


def _shot(page, selector, name):
    node = page.locator(selector).first
    node.scroll_into_view_if_needed()
    node.screenshot(path=str(page.shots / f"{name}.png"))


def test_logit_lens_grid_has_a_cell_per_layer_and_position_hover_lists_the_top_k_and_run_reruns(page):
    lens = ".lab-logit-lens"
    page.wait_for_selector(f"{lens} .lab-grid[data-cells]", timeout=120_000)
    assert page.locator(f"{lens} .lab-grid").get_attribute("data-cells") == str(3 * len("the cat sat on"))
    assert page.locator(f"{lens} .lab-grid-row").all_inner_texts() == ["embed", "L0", "L1"]
    page.hover(f"{lens} .lab-cell[data-row='2'][data-pos='4']")
    page.wait_for_function(f"document.querySelector('{lens} .lab-tooltip').textContent.includes('final prediction ranks 1')")
    assert page.locator(f"{lens} .lab-tooltip tr").count() == 5
    _shot(page, lens, "logit_lens_panel")
    page.fill(f"{lens} .lab-prompt", "a dog")
    page.click(f"{lens} .lab-run")
    page.wait_for_function(f"document.querySelector('{lens} .lab-grid').dataset.cells === '{3 * 5}'", timeout=60_000)
    assert page.locator(f"{lens} .lab-grid-head").all_inner_texts() == list("a␣dog")   # a space shown as ␣
    page.fill(f"{lens} .lab-prompt", "")
    page.click(f"{lens} .lab-run")
    page.wait_for_function(f"document.querySelector('{lens} .lab-error').textContent.includes('non-empty prompt')",
                           timeout=30_000)
    assert page.locator(f"{lens} .lab-grid").get_attribute("data-cells") == str(3 * 5)   # the last result stays


def test_patching_heatmap_click_shows_the_patched_runs_prediction(page):
    patch = ".lab-patching"
    page.wait_for_selector(f"{patch} .lab-grid[data-cells='{2 * 11}']", timeout=120_000)
    # the last layer's residual at the last position carries the whole answer: patching it restores the clean run
    last = f"{patch} .lab-cell[data-row='1'][data-pos='10']"
    assert page.locator(last).inner_text() == "1.00"
    page.click(last)
    page.wait_for_selector(f"{patch} .lab-top-cell", timeout=30_000)
    assert "selected" in page.locator(last).get_attribute("class")
    clean = page.locator(f"{patch} .lab-top-clean td:first-child").all_inner_texts()
    assert page.locator(f"{patch} .lab-top-cell td:first-child").all_inner_texts() == clean
    page.hover(f"{patch} .lab-cell[data-row='0'][data-pos='4']")
    page.wait_for_function(f"document.querySelector('{patch} .lab-tooltip').textContent.includes('(corrupted \"d\")')")
    _shot(page, patch, "patching_panel")
    page.fill(f"{patch} .lab-input-corrupted", "a dog")
    page.click(f"{patch} .lab-run")
    page.wait_for_function(f"document.querySelector('{patch} .lab-error').textContent.includes('as many tokens')",
                           timeout=30_000)
    page.fill(f"{patch} .lab-input-corrupted", "the dog sat")
    page.select_option(f"{patch} select.lab-hook", "attn_out")
    page.click(f"{patch} .lab-run")
    page.wait_for_selector(f"{patch} .lab-top-cell", state="detached", timeout=60_000)   # a new result: no cell
    page.wait_for_selector(f"{patch} .lab-run:not([disabled])", timeout=60_000)
    assert page.locator(f"{patch} .lab-error").inner_text() == ""
    assert "restored by patching attn_out" in page.locator(f"{patch} .lab-shown").inner_text()
    assert page.locator(f"{patch} .lab-stop").is_disabled()   # Stop only while a run is going


def test_heatmap_of_a_cached_pattern_picks_its_layer_and_token_hover_shades_the_attended_tokens(page):
    heat = ".lab-attention"
    page.wait_for_selector(f"{heat} canvas.lab-heatmap[data-cells]", timeout=120_000)
    assert page.locator(f"{heat} select.lab-layer option").all_inner_texts() == ["1"]
    assert page.locator(f"{heat} canvas.lab-heat-thumb").count() == 2
    assert page.locator(f"{heat} canvas.lab-heatmap").get_attribute("data-layer") == "1"
    page.click(f"{heat} canvas.lab-heat-thumb[data-head='1']")
    page.wait_for_function(f"document.querySelector('{heat} canvas.lab-heatmap').dataset.head === '1'", timeout=10_000)
    page.hover(f"{heat} .lab-token[data-pos='8']")
    page.wait_for_function(f"document.querySelector('{heat} .lab-tooltip').textContent.includes('query 8')")
    # causal: position 8 pays attention to tokens 0..8 only
    shaded = page.evaluate(f"[...document.querySelectorAll('{heat} .lab-token')].map(s => s.style.background !== '' "
                           "&& !s.style.background.endsWith(', 0)'))")
    assert not any(shaded[9:]) and any(shaded[:9])
    assert "lab-token-query" in page.locator(f"{heat} .lab-token[data-pos='8']").get_attribute("class")
    _shot(page, heat, "attention_heatmap_cache")
