import os
import subprocess
import sys

import pytest

import lab
from lab.engine import backend as B


def _run(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_auto_prefers_numpy_when_the_only_adapter_is_a_cpu(monkeypatch):
    import lab.engine.wgpu.device as W
    monkeypatch.setattr(W, "list_adapters", lambda: [{"device": "llvmpipe", "adapter_type": "CPU", "backend_type": "Vulkan"}])
    assert B._auto_choice()[0] == "numpy"
    assert "CPU adapter" in B._auto_choice()[1]
    monkeypatch.setattr(W, "list_adapters", lambda: [
        {"device": "llvmpipe", "adapter_type": "CPU", "backend_type": "Vulkan"},
        {"device": "Some GPU", "adapter_type": "DiscreteGPU", "backend_type": "Vulkan"}])
    name, reason = B._auto_choice()
    assert name == "wgpu" and "Some GPU" in reason


def test_env_variable_selects_backend_and_says_why(wgpu_backend):
    r = _run("import lab; print(lab.get_backend().name)", LAB_BACKEND="numpy")
    assert r.stdout.strip() == "numpy" and "using numpy (requested)" in r.stderr
    r = _run("import lab; print(lab.get_backend().name)", LAB_BACKEND="wgpu")
    assert r.stdout.strip() == "wgpu" and "using wgpu on" in r.stderr


def test_wgpu_without_adapter_explains_how_to_install_one(monkeypatch):
    import lab.engine.wgpu.device as W
    from lab.engine.wgpu import WgpuBackend
    monkeypatch.setattr(W, "list_adapters", lambda: [])
    monkeypatch.setattr(WgpuBackend, "_instance", None)
    with pytest.raises(RuntimeError, match="mesa-vulkan-drivers"):
        WgpuBackend.instance()


def test_device_reports_real_limits_and_features(wgpu_backend):
    info = lab.device()
    assert info["device"] and info["adapter_type"] in ("DiscreteGPU", "IntegratedGPU", "VirtualGPU", "CPU")
    # the device got the adapter's limits, not WebGPU's defaults (128 MiB per binding, 256 MiB per buffer)
    import lab.engine.wgpu.device as W
    adapter = W.list_adapters()[0]["_adapter"]
    for key in ("max-buffer-size", "max-storage-buffer-binding-size"):
        assert info["limits"][key] == adapter.limits[key]
    assert set(info["features"]) <= {"shader-f16", "timestamp-query", "subgroup"}
