"""Bad input raises an error that names what was wrong and what is allowed."""
import numpy as np
import pytest

import lab
from lab.engine import ops as F


def test_matmul_shape_error_names_both_shapes(use_backend):
    with pytest.raises(ValueError, match=r"matmul: shapes \(4, 8\) and \(7, 3\) do not align: 8 != 7"):
        lab.tensor(np.zeros((4, 8))) @ lab.tensor(np.zeros((7, 3)))
    with pytest.raises(ValueError, match=r"batch dimensions \(2,\) and \(3,\) differ"):
        lab.tensor(np.zeros((2, 4, 5))) @ lab.tensor(np.zeros((3, 5, 6)))


def test_broadcast_and_reshape_errors_name_shapes(use_backend):
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\) cannot be broadcast"):
        lab.tensor(np.zeros((2, 3))) + lab.tensor(np.zeros(4))
    with pytest.raises(ValueError, match=r"cannot reshape \(2, 3\) .* into \(4, 2\)"):
        lab.tensor(np.zeros((2, 3))).reshape(4, 2)


def test_dtype_errors(use_backend):
    with pytest.raises(ValueError, match="expected a floating-point tensor, got dtype int32"):
        lab.tensor([1, 2]) + lab.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="only floating-point tensors can require gradients"):
        lab.tensor([1, 2], requires_grad=True)


def test_index_errors(use_backend):
    w = lab.tensor(np.zeros((5, 3)), requires_grad=True)
    with pytest.raises(ValueError, match=r"embedding: index 5 is out of range for a table of 5 rows \(allowed 0\.\.4\)"):
        F.embedding(np.array([0, 5]), w)
    logits = lab.tensor(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"cross_entropy: target 9 is out of range for 4 classes \(allowed 0\.\.3"):
        F.cross_entropy(logits, np.array([1, 9]))
    with pytest.raises(ValueError, match=r"targets of shape \(3,\) do not match logits \(2, 4\)"):
        F.cross_entropy(logits, np.array([1, 2, 3]))
    with pytest.raises(IndexError, match="out of bounds for axis 0 with size 2"):
        logits[2]


def test_tensor_beyond_device_binding_limit_is_refused_naming_the_limit(wgpu_backend):
    limit = wgpu_backend.max_binding
    n = limit // 4 + 1
    with pytest.raises(ValueError, match=rf"max-storage-buffer-binding-size of {limit} bytes"):
        wgpu_backend.full((n,), 0.0)


def test_unknown_backend_and_float64_on_wgpu(wgpu_backend):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        lab.set_backend("cuda")
    with pytest.raises(ValueError, match="float64 tensors exist on the numpy backend only"):
        lab.tensor(np.zeros(2), dtype="float64", backend=wgpu_backend)


def test_mixing_backends_is_an_error(wgpu_backend, numpy_backend):
    a = lab.tensor([1.0], backend=wgpu_backend)
    b = lab.tensor([1.0], backend=numpy_backend)
    with pytest.raises(ValueError, match="different backends"):
        a + b
