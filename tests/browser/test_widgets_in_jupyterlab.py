"""The panels in a real browser: JupyterLab on loopback with a token, a notebook that shows every panel, driven by
Playwright through Debian's Chromium. Screenshots of every widget go to $LAB_SCREENSHOTS (default
browser-screenshots/), whose path the test prints."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("LAB_REQUIRE_BROWSER") == "1"
ROOT = Path(__file__).resolve().parents[2]

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
    "PlanEstimator(preset='tiny', batch=12, tokens=1e6, device='m1')",
    "GenerationPanel(model, tok, prompt='And God said')",
    """from lab.diagnostics import DiagnosticsMonitor
small = Trainer(model, tr, va, TrainConfig(steps=20, batch_size=4, log_every=5, eval_every=20))
mon = DiagnosticsMonitor(small, every=10, snapshot_every=5, power_iters=2)
small.run(progress=False)
EdgeDiagnosticsPanel(mon)""",
]


def _notebook(path):
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}},
          "cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": src,
                     "id": f"c{i}"} for i, src in enumerate(CELLS)]}
    path.write_text(json.dumps(nb))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab-browser")
    _notebook(work / "panels.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    settings = work / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               JUPYTER_CONFIG_DIR=str(work / "cfg"), JUPYTERLAB_SETTINGS_DIR=str(work / "settings"))
    log = open(work / "jupyterlab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                             f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
                             "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
                             "--ServerApp.port_retries=0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"JupyterLab did not start; log: {(work / 'jupyterlab.log').read_text()[-2000:]}")
    yield url, token
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def page(jupyterlab):
    url, token = jupyterlab
    shots = Path(os.environ.get("LAB_SCREENSHOTS", ROOT / "browser-screenshots")).resolve()
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nwidget screenshots: {shots}")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        pg = browser.new_page(viewport={"width": 1200, "height": 1400})
        pg.goto(f"{url}/lab/tree/panels.ipynb?token={token}")
        pg.wait_for_selector(".jp-Notebook", timeout=60_000)
        pg.wait_for_function("window.jupyterapp && window.jupyterapp.serviceManager", timeout=60_000)
        time.sleep(2)  # let the kernel connect before running every cell
        pg.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        pg.shots = shots
        yield pg
        browser.close()


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


def test_heatmap_has_every_cell_and_a_thumbnail_switches_the_head(page):
    page.wait_for_selector(".lab-attention canvas.lab-heatmap[data-cells]", timeout=120_000)
    cells = int(page.locator(".lab-attention canvas.lab-heatmap").get_attribute("data-cells"))
    assert cells == 32 * 32  # the text is cropped to block_size 32
    assert page.locator(".lab-attention canvas.lab-heat-thumb").count() == 2 * 4
    page.click(".lab-attention canvas.lab-heat-thumb[data-layer='1'][data-head='2']")
    page.wait_for_function("(() => { const c = document.querySelector('.lab-attention canvas.lab-heatmap');"
                           " return c.dataset.layer === '1' && c.dataset.head === '2'; })()", timeout=10_000)
    box = page.locator(".lab-attention canvas.lab-heatmap").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.8)
    page.wait_for_function("document.querySelector('.lab-attention .lab-tooltip').textContent.includes('query')")
    _shot(page, ".lab-attention", "attention_heatmap")


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


def test_edge_diagnostics_show_reports_and_the_surface(page):
    page.wait_for_selector(".lab-edge .lab-latest table", timeout=180_000)
    assert "sharpness" in page.locator(".lab-edge .lab-latest").inner_text()
    assert int(page.locator(".lab-edge canvas.lab-chart").get_attribute("data-points")) >= 2
    page.wait_for_function("document.querySelector('.lab-edge img.lab-surface').naturalWidth > 100", timeout=30_000)
    _shot(page, ".lab-edge", "edge_diagnostics")
