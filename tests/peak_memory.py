"""Memory of loading a model, measured in a fresh process on the numpy backend: (parameter bytes, growth of the
peak resident size during from_pretrained, growth of the resident size it leaves), each growth over the process
after importing what the load uses (lab, its readers, the backend chosen)."""
import os
import subprocess
import sys

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
