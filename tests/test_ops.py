"""Every op on the wgpu backend against the numpy reference, forward and backward, and the reference's own
gradients against float64 central finite differences. The cases (shapes: odd sizes, size 1, shapes beyond one
64x64 matmul tile, K > 1024, rows longer than a workgroup) live in lab/engine/opcheck.py so that
lab.selftest() runs exactly the same checks."""
import numpy as np
import pytest

from lab.engine.opcheck import CASES, check_case

CASE_SPECS = [(c, k) for c in CASES for k in range(len(c.shapes))]


@pytest.mark.parametrize("case,spec", CASE_SPECS, ids=[f"{c.name}-{k}" for c, k in CASE_SPECS])
def test_wgpu_matches_numpy(case, spec, wgpu_backend):
    r = check_case(case, wgpu_backend, spec_index=spec)
    # forward: 1e-5 of the output's scale (1e-4 for long reductions and K > 1024); gradients: 1e-3
    assert r["fwd"] <= case.fwd_tol, f"{case.name} {case.shapes[spec]}: forward error {r['fwd']:.2e}"
    assert r["bwd"] <= case.bwd_tol, f"{case.name} {case.shapes[spec]}: gradient error {r['bwd']:.2e}"


@pytest.mark.parametrize("case", [c for c in CASES if c.fd], ids=[c.name for c in CASES if c.fd])
def test_reference_gradients_match_finite_differences(case, numpy_backend):
    r = check_case(case, numpy_backend, spec_index=0)
    assert r["fd"] <= 1e-3, f"{case.name}: analytic vs finite-difference gradient error {r['fd']:.2e}"


def test_a_wrong_kernel_would_be_caught(wgpu_backend, monkeypatch):
    """The check itself must fail when a backend computes the wrong thing (here: gelu swapped for relu)."""
    case = next(c for c in CASES if c.name == "gelu")
    real = wgpu_backend.unary
    monkeypatch.setattr(wgpu_backend, "unary", lambda op, a: real("relu" if op == "gelu" else op, a))
    assert not check_case(case, wgpu_backend, spec_index=0)["ok"]


def test_dropout_mask_is_identical_on_both_backends_and_has_rate_p(wgpu_backend, numpy_backend):
    import lab
    x = np.ones(100_000, dtype=np.float32)
    outs = [lab.functional.dropout(lab.tensor(x, backend=b), 0.25, seed=7).numpy() for b in (wgpu_backend, numpy_backend)]
    np.testing.assert_array_equal(outs[0], outs[1])
    kept = outs[0] != 0
    assert abs(kept.mean() - 0.75) < 0.01                      # 100k Bernoulli draws: std of the mean ~0.0014
    np.testing.assert_allclose(outs[0][kept], 1 / 0.75, rtol=1e-6)
    other = lab.functional.dropout(lab.tensor(x, backend=numpy_backend), 0.25, seed=8).numpy()
    assert (other != outs[1]).any(), "a different seed must give a different mask"


def test_large_index_space_uses_2d_grid(wgpu_backend):
    """More than 65535 workgroups of 256 threads: the flat kernels must cover every element."""
    import lab
    n = 65535 * 256 + 1000
    x = np.arange(n, dtype=np.float32) % 97
    y = (lab.tensor(x, backend=wgpu_backend) * 2.0).numpy()
    np.testing.assert_array_equal(y, x * 2)
