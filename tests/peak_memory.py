"""Memory measured for tests. load_memory: loading a model, in a fresh process on the numpy backend (parameter
bytes, growth of the peak resident size during from_pretrained, growth of the resident size it leaves), each growth
over the process after importing what the load uses (lab, its readers, the backend chosen). peak_bytes: a step's
peak inside this process, on either backend."""
import os
import subprocess
import sys
import tracemalloc

import pytest

_CODE = """
import sys
def status(key):   # VmHWM, not ru_maxrss: that keeps the peak of the process this one was forked from (pytest's)
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))
import lab, numpy, gguf, gguf.quants, tokenizers, safetensors
lab.engine.backend.get_backend()
base = status('VmRSS')   # (not the peak: an import's passing peak would hide the load's)
model = lab.from_pretrained(sys.argv[1])
params = sum(p.data.nbytes for p in model.parameters())
print(params, status('VmHWM') - base, status('VmRSS') - base)
"""


def load_memory(name_or_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status: Linux")
    out = subprocess.run([sys.executable, "-c", _CODE, str(name_or_path)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "LAB_BACKEND": "numpy"})
    assert out.returncode == 0, out.stderr
    return tuple(int(v) for v in out.stdout.split())


def peak_bytes(backend, run, setup=lambda: None):
    """Peak bytes allocated while run(setup()) runs, beyond what was allocated before setup: the wgpu runtime's own
    count (synced first, so every dispatch recorded has run and freed what it frees), numpy's arrays as tracemalloc
    traces them. setup's passing peak is not counted, what it leaves allocated is (a model resident in the step)."""
    wgpu = backend.name == "wgpu"
    if wgpu:
        backend.sync(wait=True)
        base = backend.stats()["bytes_in_use"]
    else:
        tracemalloc.start()
    try:
        made = setup()
        if wgpu:
            backend.sync(wait=True)
            backend.reset_peak()
        else:
            tracemalloc.reset_peak()
        run(made)
        if wgpu:
            backend.sync(wait=True)
            return backend.stats()["peak_bytes_in_use"] - base
        return tracemalloc.get_traced_memory()[1]
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
