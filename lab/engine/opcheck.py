"""Forward and backward checks of every op, shared by lab.selftest() and tests/test_ops.py.

Each case runs an op on a backend and compares with the numpy backend (forward values and gradients, float32),
and checks the numpy backend's gradients against float64 central finite differences on the smallest shapes.
Gradients are taken of  sum(op(x) * R)  with a fixed random R, so every output element matters.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from . import ops as F
from .backend import backend_instance, get_backend
from .tensor import tensor


@dataclass
class Case:
    name: str
    fn: object                      # fn(*tensors) -> tensor
    shapes: list                    # list of input-spec tuples; the first is small enough for finite differences
    kinds: tuple = ()               # per input: "normal" (default), "positive", "index:V", "target:V"
    fwd_tol: float = 1e-5           # relative to the output's scale
    bwd_tol: float = 1e-3
    fd: bool = True
    note: str = ""
    grads: tuple = field(default=())  # per input: whether to check its gradient (default: all float inputs)


def _x(*s):
    return s


CASES = [
    Case("add", lambda a, b: a + b, [(_x(3, 5), _x(3, 5)), (_x(4, 1, 7), _x(5, 1)), (_x(1,), _x(2, 3)), (_x(333, 257), _x(257,))]),
    Case("sub", lambda a, b: a - b, [(_x(3, 5), _x(5,)), (_x(2, 1, 3), _x(1, 4, 1))]),
    Case("mul", lambda a, b: a * b, [(_x(3, 5), _x(3, 1)), (_x(7,), _x(7,)), (_x(1,), _x(1,))]),
    Case("div", lambda a, b: a / b, [(_x(3, 5), _x(3, 5)), (_x(2, 3, 4), _x(4,))], kinds=("normal", "positive")),
    Case("maximum", lambda a, b: a.maximum(b), [(_x(4, 6), _x(4, 6)), (_x(3, 5), _x(5,))]),
    Case("add_scalar", lambda a: a + 2.5, [(_x(3, 7),)]),
    Case("mul_scalar", lambda a: a * -1.75, [(_x(3, 7),), (_x(1,),)]),
    Case("rsub_scalar", lambda a: 3.0 - a, [(_x(5,),)]),
    Case("rdiv_scalar", lambda a: 2.0 / a, [(_x(2, 5),)], kinds=("positive",)),
    Case("pow_int", lambda a: a ** 3, [(_x(2, 5),)]),
    Case("pow_frac", lambda a: a ** 0.5, [(_x(2, 5),)], kinds=("positive",)),
    Case("neg", lambda a: -a, [(_x(3, 4),)]),
    Case("exp", lambda a: a.exp(), [(_x(3, 4),), (_x(1000, 3),)]),
    Case("log", lambda a: a.log(), [(_x(3, 4),)], kinds=("positive",)),
    Case("sqrt", lambda a: a.sqrt(), [(_x(3, 4),)], kinds=("positive",)),
    Case("tanh", lambda a: a.tanh(), [(_x(3, 4),), (_x(513,),)]),
    Case("relu", lambda a: a.relu(), [(_x(3, 4),), (_x(70001,),)]),
    Case("gelu", lambda a: a.gelu(), [(_x(3, 4),), (_x(2, 129, 5),)]),
    Case("sum_axis", lambda a: a.sum(axis=1), [(_x(3, 5, 2),), (_x(2, 1111, 3),)], fwd_tol=1e-4),
    Case("sum_all", lambda a: a.sum(), [(_x(3, 5),), (_x(3001,),)], fwd_tol=1e-4),
    Case("sum_keepdims", lambda a: a.sum(axis=(0, 2), keepdims=True), [(_x(3, 4, 2),)]),
    Case("mean", lambda a: a.mean(axis=-1), [(_x(3, 5),), (_x(7, 1025),)], fwd_tol=1e-4),
    Case("max", lambda a: a.max(axis=1), [(_x(3, 5, 2),), (_x(4, 300),)]),
    Case("reshape", lambda a: a.reshape(5, -1) * 1.0, [(_x(3, 5),)]),
    Case("transpose", lambda a: a.transpose(0, 2), [(_x(2, 3, 4),), (_x(65, 3, 67),)]),
    Case("permute", lambda a: a.permute(2, 0, 1), [(_x(2, 3, 4),)]),
    Case("slice", lambda a: a[1:, ::2], [(_x(4, 5),), (_x(3, 1),)]),
    Case("index", lambda a: a[:, 2, None], [(_x(3, 5),)]),
    Case("concat", lambda a, b: F.concat([a, b], axis=1), [(_x(2, 3), _x(2, 4)), (_x(3, 1, 2), _x(3, 5, 2))]),
    Case("split", lambda a: F.split(a, [1, 3], axis=1)[1] * 2.0, [(_x(2, 4),)]),
    Case("matmul", lambda a, b: a @ b, [(_x(5, 7), _x(7, 3)), (_x(1, 1), _x(1, 1)), (_x(65, 67), _x(67, 70)),
                                        (_x(130, 17), _x(17, 129))]),
    Case("matmul_large_k", lambda a, b: a @ b, [(_x(3, 4), _x(4, 2)), (_x(9, 1100), _x(1100, 5))], fwd_tol=1e-4),
    Case("matmul_trans_a", lambda a, b: F.matmul(a, b, transpose_a=True), [(_x(7, 5), _x(7, 3)), (_x(67, 65), _x(67, 3))]),
    Case("matmul_trans_b", lambda a, b: F.matmul(a, b, transpose_b=True), [(_x(5, 7), _x(3, 7)), (_x(33, 67), _x(65, 67))]),
    Case("matmul_trans_ab", lambda a, b: F.matmul(a, b, True, True), [(_x(7, 5), _x(3, 7))]),
    Case("matmul_batched", lambda a, b: a @ b, [(_x(2, 3, 5, 4), _x(2, 3, 4, 6)), (_x(3, 66, 9), _x(3, 9, 65))]),
    Case("matmul_broadcast", lambda a, b: a @ b, [(_x(2, 3, 4), _x(4, 5)), (_x(4, 3), _x(2, 3, 5))]),
    Case("softmax", lambda a: a.softmax(), [(_x(3, 6),), (_x(2, 1000),), (_x(4, 1),)]),
    Case("softmax_causal", lambda a: F.softmax(a, scale=0.5, causal=True), [(_x(2, 5, 5),), (_x(3, 67, 67),)]),
    Case("log_softmax", lambda a: a.log_softmax(), [(_x(3, 6),), (_x(5, 777),)]),
    Case("layer_norm", lambda x, w, b: F.layer_norm(x, w, b), [(_x(3, 5, 7), _x(7,), _x(7,)), (_x(9, 1000), _x(1000,), _x(1000,)),
                                                               (_x(300, 3), _x(3,), _x(3,))], fwd_tol=1e-4),
    Case("layer_norm_nobias", lambda x, w: F.layer_norm(x, w, None), [(_x(4, 6), _x(6,))], fwd_tol=1e-4),
    Case("layer_norm_residual", lambda x, w, b: x * 1.5 + F.layer_norm(x, w, b), [(_x(3, 5, 7), _x(7,), _x(7,)),
                                                                                 (_x(9, 1000), _x(1000,), _x(1000,))],
         fwd_tol=1e-4, note="x's gradient from its other use is added inside the LayerNorm's backward"),
    Case("add_layer_norm", lambda x, y, w, b: (lambda s, h: s + h.tanh())(*F.add_layer_norm(x, y, w, b)),
         [(_x(3, 5, 7), _x(3, 5, 7), _x(7,), _x(7,)), (_x(9, 1000), _x(9, 1000), _x(1000,), _x(1000,)),
          (_x(300, 3), _x(300, 3), _x(3,), _x(3,))], fwd_tol=1e-4,
         note="a residual add and the LayerNorm after it in one kernel, the sum also used (as a block's stream)"),
    Case("rms_norm", lambda x, w: F.rms_norm(x, w), [(_x(3, 5, 6), _x(6,)), (_x(2, 1000), _x(1000,)), (_x(300, 13), _x(13,))],
         fwd_tol=1e-4),
    Case("rms_norm_residual", lambda x, w: x * 1.5 + F.rms_norm(x, w), [(_x(3, 5, 10), _x(10,)), (_x(9, 1000), _x(1000,))],
         fwd_tol=1e-4, note="x's gradient from its other use is added inside the RMSNorm's backward"),
    Case("add_rms_norm", lambda x, y, w: (lambda s, h: s + h.tanh())(*F.add_rms_norm(x, y, w)),
         [(_x(3, 5, 7), _x(3, 5, 7), _x(7,)), (_x(9, 1000), _x(9, 1000), _x(1000,)), (_x(1, 1, 6), _x(1, 1, 6), _x(6,))],
         fwd_tol=1e-4, note="a Llama layer's residual add and the RMSNorm after it in one kernel, the sum also used"),
    Case("swiglu", lambda g, u: F.swiglu(g, u), [(_x(3, 7), _x(3, 7)), (_x(2, 129, 5), _x(2, 129, 5)), (_x(70001,), _x(70001,))]),
    Case("rotary", lambda x, c, s: F.rotary(x, c, s, 2),
         [(_x(2, 2, 3, 5, 6), _x(8, 6), _x(8, 6)), (_x(1, 1, 1, 10), _x(3, 10), _x(3, 10)), (_x(2, 3, 33, 64), _x(40, 64), _x(40, 64))],
         grads=(True, False, False), note="(B, Hkv, G, T, D) at positions 2..T+1 of the tables; any tables, so the "
                                          "backward is checked as the rotation's transpose"),
    Case("rotary_heads", lambda x, c, s: F.rotary(x, c, s, 1, heads=3),
         [(_x(2, 5, 18), _x(7, 6), _x(7, 6)), (_x(1, 1, 30), _x(2, 10), _x(2, 10)), (_x(2, 33, 192), _x(40, 64), _x(40, 64))],
         grads=(True, False, False), note="the packed projection (B, T, 3 * D) in, its heads (B, 3, T, D) out"),
    Case("embedding", lambda i, w: F.embedding(i, w), [(_x(2, 5), _x(7, 4)), (_x(300,), _x(65, 33))], kinds=("index:0", "normal")),
    Case("cross_entropy", lambda x, t: F.cross_entropy(x, t), [(_x(6, 9), _x(6)), (_x(2, 50, 65), _x(2, 50)), (_x(7, 3001), _x(7))],
         kinds=("normal", "target:-1"), fwd_tol=1e-5),
    Case("dropout", lambda a: F.dropout(a, 0.3, seed=1234), [(_x(4, 9),), (_x(3001,),)]),
    Case("lora_add", lambda y, x, a, b: F.lora_add(y, x, a, b, 2.0),
         [(_x(3, 4, 5), _x(3, 4, 6), _x(2, 6), _x(5, 2)), (_x(300, 67), _x(300, 33), _x(8, 33), _x(67, 8)),
          (_x(1, 1), _x(1, 1), _x(1, 1), _x(1, 1)), (_x(2, 40, 48), _x(2, 40, 36), _x(4, 36), _x(48, 4))], fwd_tol=1e-5),
    Case("attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [(_x(2, 2, 5, 3),) * 3, (_x(1, 3, 33, 8),) * 3]),
    Case("linear", lambda x, w, b: F.linear(x, w, b),
         [(_x(2, 3, 4), _x(4, 5), _x(5,)), (_x(2, 64, 32), _x(32, 128), _x(128,)), (_x(130, 48), _x(48, 72), _x(72,))],
         note="the second shape takes the aligned kernel with the bias fused into its stores"),
    Case("linear_no_bias", lambda x, w: F.linear(x, w), [(_x(3, 4), _x(4, 2)), (_x(64, 16), _x(16, 64))]),
    Case("linear_gelu", lambda x, w, b: F.linear(x, w, b, activation="gelu"),
         [(_x(2, 3, 4), _x(4, 5), _x(5,)), (_x(2, 64, 32), _x(32, 128), _x(128,)), (_x(128, 48), _x(48, 128), _x(128,))],
         note="the last two shapes take the aligned kernel with bias and GELU applied in its stores"),
    Case("self_attention", lambda qkv: F.causal_self_attention(qkv, 2), [(_x(2, 5, 12),), (_x(3, 33, 48),),
                                                                          (_x(2, 64, 384),), (_x(1, 96, 384),)],
         note="heads a multiple of 4 (all but the first): attention.wgsl's fused kernels on wgpu with "
              "LAB_FLASH_ATTENTION=1"),
    Case("self_attention_gqa", lambda qkv: F.causal_self_attention(qkv, 4, n_kv_head=2), [(_x(1, 5, 32),),
                                                                                          (_x(2, 37, 256),)],
         note="4 query heads on 2 key-value heads (Llama's grouped-query attention), heads of 4 and 32"),
]


def _make_inputs(case, spec, rng):
    arrays = []
    for k, shape in enumerate(spec):
        kind = case.kinds[k] if k < len(case.kinds) else "normal"
        if kind == "positive":
            arrays.append(rng.uniform(0.5, 2.0, size=shape))
        elif kind.startswith("index"):
            V = spec[k + 1][0]
            arrays.append(rng.integers(0, V, size=shape).astype(np.int32))
        elif kind.startswith("target"):
            V = spec[0][-1]
            t = rng.integers(0, V, size=shape).astype(np.int32)
            t.reshape(-1)[0] = -100  # one ignored row
            arrays.append(t)
        else:
            arrays.append(rng.standard_normal(shape))
    return arrays


def _run(case, arrays, backend, dtype, weights=None):
    """Returns (output, grads, loss) where loss = sum(output * weights)."""
    ts = []
    for k, a in enumerate(arrays):
        if a.dtype.kind == "f":
            ts.append(tensor(a.astype(dtype), requires_grad=_checks_grad(case, k), dtype=np.dtype(dtype).name,
                             backend=backend))
        else:
            ts.append(tensor(a, backend=backend))
    out = case.fn(*ts)
    if weights is None:
        return out.numpy(), None, None
    w = tensor(weights.astype(dtype), dtype=np.dtype(dtype).name, backend=backend)
    loss = (out * w).sum()
    loss.backward()
    grads = [t.grad.numpy() if t.grad is not None else np.zeros(t.shape) for k, t in enumerate(ts)
             if t.dtype != "int32" and _checks_grad(case, k)]
    return out.numpy(), grads, loss.item()


def _checks_grad(case, k):
    """Whether input k's gradient is taken and checked (Case.grads; all by default). An input left out is a
    constant, as rotary's tables are: a fused op may differentiate only what a model trains."""
    return case.grads[k] if k < len(case.grads) else True


def _rel_err(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return math.inf
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-6)
    return float(np.max(np.abs(got - ref))) / scale if ref.size else 0.0


def check_case(case, backend, spec_index=None, fd_eps=1e-6):
    """Run one case on `backend`; returns a dict of worst relative errors and whether each passed."""
    reference = backend_instance("numpy")
    specs = case.shapes if spec_index is None else [case.shapes[spec_index]]
    worst = {"fwd": 0.0, "bwd": 0.0, "fd": 0.0}
    for k, spec in enumerate(specs):
        rng = np.random.default_rng(1000 + 17 * k + len(case.name))
        arrays = _make_inputs(case, spec, rng)
        out_ref = _run(case, arrays, reference, np.float32)[0]
        weights = rng.standard_normal(out_ref.shape)
        out_ref, g_ref, _ = _run(case, arrays, reference, np.float32, weights)
        if backend is not reference:
            out, g, _ = _run(case, arrays, backend, np.float32, weights)
            worst["fwd"] = max(worst["fwd"], _rel_err(out, out_ref))
            for gi, gr in zip(g, g_ref):
                worst["bwd"] = max(worst["bwd"], _rel_err(gi, gr))
        if case.fd and (spec_index == 0 or (spec_index is None and k == 0)):
            worst["fd"] = max(worst["fd"], _finite_difference_error(case, arrays, weights, fd_eps))
    worst["ok"] = worst["fwd"] <= case.fwd_tol and worst["bwd"] <= case.bwd_tol and worst["fd"] <= 1e-3
    return worst


def _finite_difference_error(case, arrays, weights, eps):
    """Analytic float64 gradients of the numpy backend vs central differences."""
    ref = backend_instance("numpy")
    _, grads, _ = _run(case, arrays, ref, np.float64, weights)
    worst, gi = 0.0, 0
    for k, a in enumerate(arrays):
        if a.dtype.kind != "f" or not _checks_grad(case, k):
            continue
        fd = np.zeros_like(a)
        for i in range(a.size):
            orig = a.flat[i]
            a.flat[i] = orig + eps
            plus = _loss64(case, arrays, weights)
            a.flat[i] = orig - eps
            minus = _loss64(case, arrays, weights)
            a.flat[i] = orig
            fd.flat[i] = (plus - minus) / (2 * eps)
        worst = max(worst, _rel_err(grads[gi], fd))
        gi += 1
    return worst


def _loss64(case, arrays, weights):
    out = _run(case, arrays, backend_instance("numpy"), np.float64)[0]
    return float(np.sum(out * weights))


def selftest(backend=None, verbose=True):
    b = backend_instance(backend) if backend is not None else get_backend()
    failed = []
    for case in CASES:
        r = check_case(case, b)
        if verbose:
            status = "ok  " if r["ok"] else "FAIL"
            print(f"{status} {case.name:<18} fwd {r['fwd']:.1e}  bwd {r['bwd']:.1e}  finite-diff {r['fd']:.1e}"
                  f"  ({b.name})")
        if not r["ok"]:
            failed.append(case.name)
    if verbose:
        print(f"selftest on {b.name}: {len(CASES) - len(failed)} of {len(CASES)} ops passed")
    if failed:
        raise AssertionError(f"selftest on {b.name}: these ops failed: {', '.join(failed)}")
    return True
