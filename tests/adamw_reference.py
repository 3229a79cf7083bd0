"""AdamW's update rule in float64, the reference the optimizer's tests (both backends' kernels, numpy's adamw_)
are checked against."""
import numpy as np


def adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, step):
    """(p, m, v) after one AdamW step `step` (1-based) with gradient g: decoupled weight decay, bias-corrected
    moments."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * wd * p - lr * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps)
    return p, m, v


def check_numpy_adamw(numpy_backend, p, g, m, v, step, lr=3e-3, b1=0.9, b2=0.99, eps=1e-8, wd=0.1):
    """numpy's adamw_ updates p, m, v in place as the reference does."""
    want, m2, v2 = adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, step)
    numpy_backend.adamw_(p, g, m, v, lr, b1, b2, eps, wd, step)
    np.testing.assert_allclose(m, m2, rtol=1e-12)
    np.testing.assert_allclose(v, v2, rtol=1e-12)
    np.testing.assert_allclose(p, want, rtol=1e-10, atol=1e-12)
