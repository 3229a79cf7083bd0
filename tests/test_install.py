"""`pip install .` into a fresh virtual environment gives a working lab, kernels included, from any directory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("LAB_SKIP_INSTALL_TEST") == "1", reason="LAB_SKIP_INSTALL_TEST=1")
def test_wheel_install_in_fresh_venv_runs_selftest(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import lab, pathlib; lab.selftest(backend='wgpu', verbose=False); "
            "from lab.engine.kernels import kernel_dir; print(kernel_dir()); "
            "from lab.widgets import TrainingPanel as P; print(P._esm.path); assert 'base64,' in str(P._esm)")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=elsewhere, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    kernels, panel = r.stdout.splitlines()[-2:]
    assert str(venv) in kernels, f"kernels must load from the installed package, got {r.stdout}"
    assert str(venv) in panel, f"the panels' modules (linked to common.js) must load from the installed package, " \
                               f"got {r.stdout}"
