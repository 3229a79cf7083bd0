"""Soak test of the training panel: a TrainingPanel streaming updates to JupyterLab in Chromium for N minutes.
Every 15 s it records the browser's responsiveness (animation-frame latency, and a Pause -> Resume round trip
through the kernel once a minute), the browser's JS heap and DOM size, and the kernel process's resident memory.

    python benchmarks/panel_soak.py --minutes 30 --out benchmarks/panel-soak-30min.json
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "browser"))
from jupyter_harness import jupyterlab, notebook_page, write_notebook  # noqa: E402

CELLS = [
    """import lab
from dataclasses import replace
from lab.data import char_dataset
from lab.models import PRESETS, TransformerLM
from lab.train import Trainer, TrainConfig
from lab.widgets import TrainingPanel
lab.set_backend("numpy"); lab.manual_seed(0)
tok, tr, va = char_dataset()
model = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, block_size=32))
trainer = Trainer(model, tr, va, TrainConfig(steps=10**9, batch_size=8, log_every=1, eval_every=200))""",
    "panel = TrainingPanel(trainer, tokenizer=tok, sample_every=100, max_updates_per_s=10); panel",
]

FRAME_LATENCY = """() => new Promise(resolve => { const t = performance.now();
    requestAnimationFrame(() => setTimeout(() => resolve(performance.now() - t), 0)); })"""


def kernel_rss_mb(server_pid):
    """Resident memory of the ipykernel child of the Jupyter server (from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server_pid and b"ipykernel" in cmd:
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--out", default="bench-results/panel-soak.json")
    args = ap.parse_args()
    from playwright import sync_api
    work = Path(tempfile.mkdtemp(prefix="lab-soak-"))
    write_notebook(work / "soak.ipynb", CELLS)
    samples = []
    with jupyterlab(work) as (url, token, server), notebook_page(sync_api, url, token, "soak.ipynb") as page:
        page.wait_for_selector(".lab-training .lab-start", timeout=120_000)
        page.click(".lab-training .lab-start")
        page.wait_for_function("document.querySelector('.lab-training .lab-badge').dataset.status === 'running'",
                               timeout=60_000)
        t0 = time.time()
        next_roundtrip = t0
        while time.time() - t0 < args.minutes * 60:
            s = {"t_s": round(time.time() - t0, 1), "frame_ms": page.evaluate(FRAME_LATENCY),
                 "js_heap_mb": page.evaluate("performance.memory.usedJSHeapSize") / 2 ** 20,
                 "dom_nodes": page.evaluate("document.getElementsByTagName('*').length"),
                 "kernel_rss_mb": kernel_rss_mb(server.pid),
                 "points": int(page.locator(".lab-training canvas.lab-chart").get_attribute("data-points") or 0)}
            if time.time() >= next_roundtrip:  # a click whose effect needs the kernel: Pause, then Resume
                start = time.perf_counter()
                page.click(".lab-training .lab-pause")
                page.wait_for_function("document.querySelector('.lab-training .lab-badge').dataset.status === 'paused'",
                                       timeout=60_000)
                s["pause_roundtrip_ms"] = (time.perf_counter() - start) * 1e3
                page.click(".lab-training .lab-resume")
                page.wait_for_function("document.querySelector('.lab-training .lab-badge').dataset.status === 'running'",
                                       timeout=60_000)
                next_roundtrip += 60
            samples.append(s)
            print(json.dumps(s), flush=True)
            time.sleep(15)
        steps = page.locator(".lab-training .lab-stats").inner_text()
        page.click(".lab-training .lab-stop")
    first = [s for s in samples if s["t_s"] >= 60][:4] or samples[:4]   # after the first minute's warm-up
    last = samples[-4:]
    mean = lambda rows, k: statistics.mean(r[k] for r in rows if r.get(k) is not None)  # noqa: E731
    summary = {
        "minutes": args.minutes, "samples": len(samples), "steps_shown": steps,
        "kernel_rss_mb_after_1min": mean(first, "kernel_rss_mb"), "kernel_rss_mb_at_end": mean(last, "kernel_rss_mb"),
        "js_heap_mb_after_1min": mean(first, "js_heap_mb"), "js_heap_mb_at_end": mean(last, "js_heap_mb"),
        "dom_nodes_after_1min": mean(first, "dom_nodes"), "dom_nodes_at_end": mean(last, "dom_nodes"),
        "frame_ms_median": statistics.median(s["frame_ms"] for s in samples),
        "frame_ms_max": max(s["frame_ms"] for s in samples),
        "pause_roundtrip_ms_median": statistics.median(s["pause_roundtrip_ms"] for s in samples if "pause_roundtrip_ms" in s),
        "pause_roundtrip_ms_max": max(s["pause_roundtrip_ms"] for s in samples if "pause_roundtrip_ms" in s),
    }
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
