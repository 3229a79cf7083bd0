"""JupyterLab on loopback with a random token, and Debian's Chromium driven by Playwright: shared by the browser
tests and benchmarks/panel_soak.py."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]


def write_notebook(path, cells):
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}},
          "cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": src,
                     "id": f"c{i}"} for i, src in enumerate(cells)]}
    path.write_text(json.dumps(nb))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def jupyterlab(work):
    """A JupyterLab server rooted at `work`, listening on 127.0.0.1 only, with a fresh token: yields (url, token,
    process)."""
    port, token = free_port(), secrets.token_hex(16)
    settings = work / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               JUPYTER_CONFIG_DIR=str(work / "cfg"), JUPYTERLAB_SETTINGS_DIR=str(work / "settings"))
    log = open(work / "jupyterlab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                             f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
                             "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
                             "--ServerApp.port_retries=0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"JupyterLab did not start; log: {(work / 'jupyterlab.log').read_text()[-2000:]}")
        yield url, token, proc
    finally:
        proc.terminate()
        proc.wait(20)


@contextmanager
def notebook_page(playwright_api, url, token, notebook, viewport=(1200, 1400)):
    """Chromium with `notebook` open in JupyterLab and all its cells run: yields the Playwright page."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic", "--enable-precise-memory-info"])
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        page.goto(f"{url}/lab/tree/{notebook}?token={token}")
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        page.wait_for_function("window.jupyterapp && window.jupyterapp.serviceManager", timeout=60_000)
        time.sleep(2)  # let the kernel connect before running every cell
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        try:
            yield page
        finally:
            browser.close()
