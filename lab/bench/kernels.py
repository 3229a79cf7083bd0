"""Kernel benchmark: matmul GFLOP/s and elementwise / layernorm GB/s on a lab backend, side by side with numpy
(and PyTorch when importable) in the same run, reported as ratios.

GPU timing: each round's launches are recorded and submitted together, then one small readback waits for them
all, so the submit + readback latency is amortized; the best of several rounds is kept, and the first call of
each op (pipeline compile, buffer creation) is excluded as warm-up.
"""
import platform

import numpy as np

from ..engine import ops as F
from ..engine import quant
from ..engine.backend import backend_instance
from ..engine.tensor import Tensor, no_grad, tensor
from .timing import best_seconds, write_result

MATMUL_SIZES = (256, 512, 1024, 2048, 4096)
# The matmuls of one shakespeare-char training step (batch 64 x 256 = 16384 positions, 384 dims): forward
# (qkv, MLP up, MLP down), the input gradient (B transposed) and a weight gradient (A transposed, K = 16384).
MODEL_SHAPES = (("qkv", 16384, 384, 1152, False, False), ("mlp up", 16384, 384, 1536, False, False),
                ("mlp down", 16384, 1536, 384, False, False), ("dX mlp up", 16384, 1536, 384, False, True),
                ("dW mlp up", 384, 16384, 1536, True, False))
# SmolLM2-135M's linear layers (in, out) at batch 8 x 512 tokens: the float32 product x @ W^T beside the same
# product with W packed (q4_1, the shipped GGUF's; int8) and, for q4_1, the input gradient g @ W.
QUANT_TOKENS = 4096
QUANT_SHAPES = (("q_proj", 576, 576), ("k_proj", 576, 192), ("up_proj", 576, 1536), ("down_proj", 1536, 576))


def _lab_timer(backend, fn, *arrays):
    ts = [tensor(a, backend=backend) for a in arrays]
    box = {}

    def run():
        with no_grad():
            box["out"] = fn(*ts)

    def finish():
        out = box["out"]
        backend.sync()
        if backend.name == "wgpu":  # a 4-byte readback waits until every submitted dispatch has finished
            backend.queue.read_buffer(out.data.buffer, 0, 4)
    return run, finish


def _torch_timer(fn_name, arrays):
    try:
        import torch
    except ImportError:
        return None, None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
    ts = [torch.from_numpy(a).to(dev) for a in arrays]
    fns = {
        "matmul": lambda a, b: a @ b,
        "matmul_ta": lambda a, b: a.T @ b,
        "matmul_tb": lambda a, b: a @ b.T,
        "add": lambda a, b: a + b,
        "layernorm": lambda x, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b),
    }
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    return (lambda: fns[fn_name](*ts)), sync, dev


def run_kernels(backend_name, sizes=MATMUL_SIZES, out_path=None, budget_s=0.5, print_fn=print, model_shapes=False):
    backend = backend_instance(backend_name)
    numpy_b = backend_instance("numpy")
    rng = np.random.default_rng(0)
    rows = []
    torch_dev = None

    def measure(label, fn_lab, fn_name, arrays, work, unit):
        nonlocal torch_dev
        t_lab = best_seconds(*_lab_timer(backend, fn_lab, *arrays), budget=budget_s)
        t_np = best_seconds(*_lab_timer(numpy_b, fn_lab, *arrays), budget=budget_s)
        row = {"op": label, "unit": unit, "lab": work / t_lab / 1e9, "numpy": work / t_np / 1e9}
        tt = _torch_timer(fn_name, arrays)
        if tt[0] is not None:
            torch_run, torch_sync, torch_dev = tt
            t_torch = best_seconds(torch_run, torch_sync, budget=budget_s)
            row["torch"] = work / t_torch / 1e9
        row["lab/numpy"] = row["lab"] / row["numpy"]
        if "torch" in row:
            row["lab/torch"] = row["lab"] / row["torch"]
        rows.append(row)
        line = f"{label:<32} {unit:<7} lab {row['lab']:>10.1f}   numpy {row['numpy']:>9.1f} ({row['lab/numpy']:>6.2f}x)"
        if "torch" in row:
            line += f"   torch-{torch_dev} {row['torch']:>10.1f} ({row['lab/torch']:>5.2f}x)"
        print_fn(line)

    info = {"backend": backend.name}
    if backend.name == "wgpu":
        info["device"] = backend.device_info["device"]
    print_fn(f"kernel benchmark: lab backend {backend.name}"
             + (f" on {info['device']}" if "device" in info else "") + f"; host {platform.processor() or platform.machine()}")
    for n in sizes:
        a = rng.standard_normal((n, n)).astype(np.float32)
        b = rng.standard_normal((n, n)).astype(np.float32)
        measure(f"matmul {n}x{n}x{n}", lambda x, y: x @ y, "matmul", [a, b], 2.0 * n ** 3, "GFLOP/s")
    for name, M, K, N, ta, tb in (MODEL_SHAPES if model_shapes else ()):
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        measure(f"{name} {M}x{K}x{N}", lambda x, y, ta=ta, tb=tb: F.matmul(x, y, transpose_a=ta, transpose_b=tb),
                "matmul_ta" if ta else "matmul_tb" if tb else "matmul", [a, b], 2.0 * M * N * K, "GFLOP/s")
    for name, n_in, n_out in (QUANT_SHAPES if model_shapes else ()):
        x = rng.standard_normal((QUANT_TOKENS, n_in)).astype(np.float32)
        w = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        work = 2.0 * QUANT_TOKENS * n_in * n_out
        shape = f"{QUANT_TOKENS}x{n_in}x{n_out}"
        measure(f"{name} f32 {shape}", lambda x, w: F.matmul(x, w, transpose_b=True), "matmul_tb", [x, w], work,
                "GFLOP/s")
        for kind, transpose in (("q4_1", False), ("q4_1", True), ("int8", False)):
            packed = quant.quantize(w, kind)
            handles = {b.name: b.upload_quantized(packed) for b in (backend, numpy_b)}

            def product(t, _, transpose=transpose, handles=handles):   # (the float weight is torch's operand only)
                return Tensor(t.backend.quantized_matmul(t.data, handles[t.backend.name], transpose), t.backend)
            a = rng.standard_normal((QUANT_TOKENS, n_out)).astype(np.float32) if transpose else x
            # torch multiplies the dequantized float32 weight: the product a packed one stands in for
            measure(f"{name} {kind}{' dX' if transpose else ''} {shape}", product,
                    "matmul" if transpose else "matmul_tb", [a, quant.dequantize(packed)], work, "GFLOP/s")
    n = 1 << 22
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    measure(f"add {n} floats", lambda x, y: x + y, "add", [a, b], 3 * 4 * n, "GB/s")
    x = rng.standard_normal((16384, 384)).astype(np.float32)
    w = rng.standard_normal(384).astype(np.float32)
    bias = rng.standard_normal(384).astype(np.float32)
    measure("layernorm 16384x384", lambda x, w, b: F.layer_norm(x, w, b), "layernorm", [x, w, bias],
            2 * 4 * x.size, "GB/s")
    result = {"suite": "kernels", **info, "torch_device": torch_dev, "rows": rows}
    if out_path:
        write_result(out_path, result, print_fn)
    return result
