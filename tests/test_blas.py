"""lab.engine.blas: the numpy backend's float32 products through MKL (when the mkl package is installed) equal
numpy's for every layout, fall back to numpy for what MKL is not given, and LAB_BLAS chooses."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import lab
from lab.checks import InputError
from lab.engine import blas

HAS_MKL = blas._mkl_library_path() is not None
needs_mkl = pytest.mark.skipif(not HAS_MKL, reason="the mkl package is not installed (pip install 'lab[mkl]')")


@pytest.fixture
def fresh_choice(monkeypatch):
    """blas decides once per process: forget that decision for this test (and restore it after)."""
    saved = dict(blas._state)
    blas._state.clear()
    yield monkeypatch
    blas._state.clear()
    blas._state.update(saved)


@pytest.fixture
def forced_mkl(fresh_choice):
    """MKL as LAB_BLAS=mkl gives it whatever the threads (auto takes it only where numpy's BLAS runs one thread),
    or None where the mkl package is not installed: what the routing tests route around."""
    fresh_choice.setenv("LAB_BLAS", "mkl" if HAS_MKL else "numpy")
    return blas.mkl()


@pytest.fixture
def sgemm_calls(forced_mkl, monkeypatch):
    """How many products went to MKL's sgemm during the test (small ones included: the layouts are what is
    tested, with shapes small enough to read)."""
    lib = forced_mkl
    if lib is None:
        pytest.skip("MKL not in use")
    monkeypatch.setattr(blas, "MKL_MIN_WORK", 0)
    calls = []
    real = lib.sgemm

    def counted(*args):
        calls.append(args[3:6])
        return real(*args)
    monkeypatch.setattr(lib, "sgemm", counted)
    return calls


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _check(got, a, b):
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def _layouts():
    """(name, a, b): one product each, in the layouts the numpy backend hands over."""
    x, w, big = _rand((24, 40)), _rand((40, 16), 1), _rand((30, 50), 2)
    return [
        ("plain", x, w),
        ("transposed a", _rand((40, 24), 3).T, w),
        ("transposed b", x, _rand((16, 40), 4).T),
        ("both transposed", _rand((40, 24), 3).T, _rand((16, 40), 4).T),
        ("row block of a", big[3:9, :40], w),
        ("column block of a (rows apart)", big[:, 5:45], w),
        ("column block of b", x, _rand((40, 70), 5)[:, 10:26]),
        ("one row", x[4:5], w),
        ("one row of a transposed matrix", _rand((40, 24), 6).T[7:8], w),
        ("one column of b", x, w[:, 3:4]),
        ("one column of a transposed matrix", x, _rand((5, 40), 7).T[:, 2:3]),
        ("leading axis of 1", x[None], w),
        ("leading axes of 1 on both", x[None, None], w[None, None]),
        ("k of 1", x[:, :1], w[:1]),
    ]


@needs_mkl
@pytest.mark.parametrize("case", range(len(_layouts())), ids=[n for n, _, _ in _layouts()])
def test_mkl_product_equals_numpys_for_every_layout(case, sgemm_calls):
    _, a, b = _layouts()[case]
    _check(blas.matmul(a, b), a, b)
    assert len(sgemm_calls) == 1   # through MKL, not numpy's fallback


@needs_mkl
def test_mkl_writes_into_a_column_block_of_a_wider_output_and_nothing_else(sgemm_calls):
    a, b = _rand((12, 8)), _rand((8, 5), 1)
    wide = np.full((12, 20), 7.0, np.float32)
    block = wide[:, 6:11]
    assert blas.matmul(a, b, out=block) is block   # (np.matmul's contract: the output it was given)
    _check(wide[:, 6:11], a, b)
    assert (wide[:, :6] == 7).all() and (wide[:, 11:] == 7).all()   # the columns beside it untouched
    assert len(sgemm_calls) == 1


def _fallback_cases():
    x, w = _rand((6, 8)), _rand((8, 5), 1)
    raw = np.zeros(6 * 8 * 4 + 2, np.uint8)
    unaligned = np.frombuffer(raw.data, dtype=np.float32, count=48, offset=2).reshape(6, 8)
    return [
        ("stack of products", _rand((3, 6, 8)), _rand((3, 8, 5), 1)),
        ("broadcast stack", _rand((3, 6, 8)), w),
        ("float64", x.astype(np.float64), w.astype(np.float64)),
        ("float16 and float32", x.astype(np.float16), w),
        ("integers", (x * 10).astype(np.int32), (w * 10).astype(np.int32)),
        ("reversed rows", x[::-1], w),
        ("every other column", _rand((6, 16))[:, ::2], w),
        ("broadcast (zero-stride) rows", np.broadcast_to(x[:1], (6, 8)), w),
        ("floats off 4-byte boundaries", unaligned, w),
        ("no rows", x[:0], w),
        ("k of 0", x[:, :0], w[:0]),
        ("a vector", x, w[:, 0]),
    ]


@pytest.mark.parametrize("case", range(len(_fallback_cases())), ids=[n for n, _, _ in _fallback_cases()])
def test_what_mkl_is_not_given_is_numpys_product(case, forced_mkl, monkeypatch):
    _, a, b = _fallback_cases()[case]
    lib = forced_mkl
    if lib is not None:
        monkeypatch.setattr(lib, "sgemm", lambda *args: pytest.fail("went to MKL"))
    got, want = blas.matmul(a, b), np.matmul(a, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_an_output_overlapping_an_operand_is_numpys_buffered_product(forced_mkl, monkeypatch):
    lib = forced_mkl
    if lib is not None:
        monkeypatch.setattr(lib, "sgemm", lambda *args: pytest.fail("went to MKL"))
    buf = _rand((6, 6))
    a = buf[:, :4].copy()
    want = np.matmul(buf[:, :4], _rand((4, 2), 1))
    got = blas.matmul(buf[:, :4], _rand((4, 2), 1), out=buf[:, 4:6])   # out is beside a in the same rows
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(buf[:, :4], a)


@pytest.mark.parametrize("a_shape, b_shape, out", [((6, 8), (7, 5), None), ((6, 8), (8, 5), (6, 4)),
                                                     ((2, 6, 8), (3, 8, 5), None)])
def test_bad_shapes_are_numpys_error(a_shape, b_shape, out):
    a, b = _rand(a_shape), _rand(b_shape, 1)
    o = None if out is None else np.empty(out, np.float32)
    with pytest.raises(ValueError) as numpys:
        np.matmul(a, b) if o is None else np.matmul(a, b, out=o)
    with pytest.raises(ValueError) as ours:
        blas.matmul(a, b, out=o)
    assert str(ours.value) == str(numpys.value)


def test_a_read_only_output_is_numpys_error():
    a, b = _rand((4, 3)), _rand((3, 2), 1)
    o = np.empty((4, 2), np.float32)
    o.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        blas.matmul(a, b, out=o)


@needs_mkl
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 33), st.integers(1, 33), st.integers(1, 33), st.booleans(), st.booleans(),
       st.integers(0, 3), st.integers(0, 3), st.booleans())
def test_mkl_products_of_any_size_and_layout_equal_numpys(sgemm_calls, M, K, N, ta, tb, pad_a, pad_b, into_view):
    # (sgemm_calls: MKL forced, the threshold lowered: these shapes are all small; the same for every example)
    before = len(sgemm_calls)
    _any_size_and_layout(M, K, N, ta, tb, pad_a, pad_b, into_view)
    assert len(sgemm_calls) == before + 1


@needs_mkl
@pytest.mark.parametrize("shape, to_mkl", [((64, 64, 64), False), ((1, 768, 2304), False), ((128, 128, 128), True),
                                           ((768, 128, 512), True), ((1, 576, 4096), True)])
def test_small_products_stay_numpys_and_large_ones_go_to_mkl(shape, to_mkl, forced_mkl, monkeypatch):
    lib = forced_mkl
    if lib is None:
        pytest.skip("MKL not in use")
    calls = []
    real = lib.sgemm
    monkeypatch.setattr(lib, "sgemm", lambda *args: calls.append(args) or real(*args))
    M, K, N = shape
    a, b = _rand((M, K)), _rand((K, N), 1)
    _check(blas.matmul(a, b), a, b)
    assert len(calls) == int(to_mkl)


def _any_size_and_layout(M, K, N, ta, tb, pad_a, pad_b, into_view):
    # each operand cut out of a larger array (rows pad_* floats apart beyond their width), maybe transposed
    a_full = _rand((K, M + pad_a) if ta else (M, K + pad_a), M * 7 + K)
    b_full = _rand((N, K + pad_b) if tb else (K, N + pad_b), N * 5 + K)
    a = a_full[:, :M].T if ta else a_full[:, :K]
    b = b_full[:, :K].T if tb else b_full[:, :N]
    if into_view:
        wide = np.zeros((M, N + 3), np.float32)
        blas.matmul(a, b, out=wide[:, 1:N + 1])
        _check(wide[:, 1:N + 1], a, b)
        assert not wide[:, 0].any() and not wide[:, N + 1:].any()
    else:
        _check(blas.matmul(a, b), a, b)


def test_lab_blas_rejects_an_unknown_choice_with_the_choices(fresh_choice):
    fresh_choice.setenv("LAB_BLAS", "openblas")
    with pytest.raises(InputError, match=r"LAB_BLAS='openblas' is not a choice: use one of auto, numpy, mkl"):
        blas.mkl()


def test_lab_blas_mkl_without_the_package_says_how_to_install_it(fresh_choice):
    fresh_choice.setenv("LAB_BLAS", "mkl")
    fresh_choice.setattr(blas, "_mkl_library_path", lambda: None)
    with pytest.raises(InputError,
                       match=r"LAB_BLAS=mkl but the mkl package is not installed: pip install 'lab\[mkl\]'"):
        blas.mkl()


def test_lab_blas_numpy_keeps_numpys_own_blas(fresh_choice):
    fresh_choice.setenv("LAB_BLAS", "numpy")
    assert blas.mkl() is None
    assert blas.describe().startswith("numpy's ")
    a, b = _rand((5, 4)), _rand((4, 3), 1)
    np.testing.assert_array_equal(blas.matmul(a, b), np.matmul(a, b))


def test_a_bad_lab_blas_is_one_line_from_the_cli_before_any_step():
    env = dict(os.environ, LAB_BLAS="fast")
    run = subprocess.run([sys.executable, "-m", "lab", "train", "--preset", "tiny", "--backend", "numpy",
                          "--steps", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "LAB_BLAS='fast' is not a choice" in errors[0], run.stderr
    assert "Traceback" not in run.stderr and "step/s" not in run.stderr   # (before the progress bar: no step ran)


@needs_mkl
def test_training_with_mkl_matches_numpys_blas_and_repeats_bit_for_bit(fresh_choice):
    """A few numpy-backend training steps with MKL's products: the losses of numpy's own BLAS within float32
    rounding, and the same bits when run again (replays and checkpointing compare bits)."""
    from lab.engine.backend import using_backend
    from lab.models.transformer import TransformerConfig, TransformerLM
    from lab.train import TrainConfig, Trainer
    ids = np.random.default_rng(0).integers(0, 40, 4000)
    cfg = TransformerConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    fresh_choice.setattr(blas, "MKL_MIN_WORK", 0)   # (this model's products are all small: MKL takes them here)
    sgemm_calls = []

    def losses(choice):
        fresh_choice.setenv("LAB_BLAS", choice)
        blas._state.clear()
        lib = blas.mkl()
        if lib is not None:
            real = lib.sgemm
            lib.sgemm = lambda *args: sgemm_calls.append(choice) or real(*args)
        with using_backend("numpy"):
            lab.manual_seed(0)
            tr = Trainer(TransformerLM(cfg), ids, ids[:500], TrainConfig(steps=10**9, batch_size=4, block_size=16))
            return [float(tr.train_step()[0].item()) for _ in range(4)]
    mkl_a, mkl_b, numpys = losses("mkl"), losses("mkl"), losses("numpy")
    assert sgemm_calls and set(sgemm_calls) == {"mkl"}   # (the products did go through MKL)
    assert mkl_a == mkl_b
    np.testing.assert_allclose(mkl_a, numpys, rtol=1e-5)


@pytest.mark.parametrize("case", ["np.matrix", "masked operand", "masked output", "nested list"])
def test_array_subclasses_get_numpys_product(case, forced_mkl, monkeypatch):
    """A subclass's product is numpy's: np.matrix's result is a matrix, and np.matmul refuses masked arrays (MKL
    would multiply the data under the mask and drop it); a nested list is numpy's too (it has no dtype to check)."""
    lib = forced_mkl
    if lib is not None:
        monkeypatch.setattr(lib, "sgemm", lambda *args: pytest.fail("went to MKL"))
    a, b = _rand((6, 8)), _rand((8, 5), 1)
    out = np.ma.masked_array(np.zeros((6, 5), np.float32)) if case == "masked output" else None
    if case == "np.matrix":
        a, b = np.matrix(a), np.matrix(b)
    elif case == "masked operand":
        a = np.ma.masked_array(a, mask=a > 1)
    elif case == "nested list":
        a = a.tolist()
    try:
        want = np.matmul(a, b) if out is None else np.matmul(a, b, out=out.copy())
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            blas.matmul(a, b, out=out)
        return
    got = blas.matmul(a, b, out=out)
    assert type(got) is type(want)
    np.testing.assert_array_equal(got, want)


def _child(code, **env):
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("LAB_BLAS", "MKL_", "OMP_", "LD_LIBRARY"))}
    return subprocess.run([sys.executable, "-c", code], env={**run_env, **env}, capture_output=True, text=True,
                          timeout=120)


def _libtbb_loads():
    import ctypes
    try:
        ctypes.CDLL("libtbb.so.12")
        return True
    except OSError:
        return False


@needs_mkl
@pytest.mark.skipif(_libtbb_loads(), reason="libtbb.so.12 loads here: MKL's TBB threading layer works")
def test_an_mkl_threading_layer_that_cannot_load_is_one_error_not_the_end_of_the_process():
    """MKL_THREADING_LAYER=TBB with libtbb off the loader's path: mkl_rt would print its FATAL ERROR and exit the
    process at the first MKL call; auto keeps numpy's BLAS and LAB_BLAS=mkl is one line from the CLI."""
    auto = _child("from lab.engine import blas; print(blas.describe())", MKL_THREADING_LAYER="TBB",
                  OMP_NUM_THREADS="1")   # (one thread: where auto would take MKL)
    assert auto.returncode == 0 and auto.stdout.startswith("numpy's "), auto.stdout + auto.stderr
    required = _child("import sys; from lab import cli; "
                      "sys.exit(cli.main(['train', '--preset', 'tiny', '--backend', 'numpy', '--steps', '1']))",
                      MKL_THREADING_LAYER="TBB", LAB_BLAS="mkl")
    err = required.stderr.strip()
    assert required.returncode == 2 and err.count("\n") == 0, required.stdout + required.stderr
    assert "LAB_BLAS=mkl but MKL cannot be used here" in err and "libtbb.so.12" in err and "Traceback" not in err


FORK_AFTER_TORCH = """
import os, numpy as np, torch
from lab.engine import blas
a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
want = blas.matmul(a, a.T) if {mkl_first} else a.astype(np.float64) @ a.T.astype(np.float64)
torch.randn(300, 300) @ torch.randn(300, 300)   # PyTorch's GNU OpenMP threads
pid = os.fork()
if pid == 0:
    os._exit(0 if np.allclose(blas.matmul(a, a.T), want, rtol=1e-4, atol=1e-3) else 5)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@needs_mkl
@pytest.mark.parametrize("mkl_first", [True, False], ids=["MKL ran before the fork", "MKL first used in the child"])
def test_a_child_forked_beside_pytorch_gets_its_products(mkl_first):
    """A process that ran PyTorch's threads (and MKL's) forks (multiprocessing's default on Linux): the child's MKL
    products complete (a threaded first product hung there) and are right."""
    pytest.importorskip("torch")
    try:
        run = _child(FORK_AFTER_TORCH.format(mkl_first=mkl_first), MKL_NUM_THREADS="2", OMP_NUM_THREADS="2",
                     LAB_BLAS="mkl")   # (threaded MKL: auto would keep numpy's BLAS with two threads)
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child hung")
    assert run.returncode == 0 and run.stdout.strip() == "0", run.stdout + run.stderr


@needs_mkl
@pytest.mark.parametrize("env, takes_mkl", [({"OMP_NUM_THREADS": "1"}, True), ({"OPENBLAS_NUM_THREADS": "1"}, True),
                                            ({"OMP_NUM_THREADS": "2"}, False), ({"OPENBLAS_NUM_THREADS": "4"}, False)])
def test_auto_takes_mkl_on_one_thread_only_where_numpys_blas_runs_one(env, takes_mkl):
    """Threaded MKL beside numpy's threaded OpenBLAS (and PyTorch's OpenMP) made small training steps 5-8x slower:
    auto takes MKL where numpy's BLAS runs one thread, and then runs it on one thread too."""
    run = _child("from lab.engine import blas; lib = blas.mkl(); "
                 "print(blas.describe(), lib.max_threads() if lib else 0)", **env)
    assert run.returncode == 0, run.stderr
    said, threads = run.stdout.rsplit(maxsplit=1)
    assert said.startswith("MKL ") == takes_mkl and int(threads) == int(takes_mkl), run.stdout
