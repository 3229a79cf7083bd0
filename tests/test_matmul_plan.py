"""The wgpu matmul planner's choices, without a GPU: lab.engine.wgpu.matmul_plan is arithmetic on shapes, limits and
tuning (the kernels it names are checked against numpy in test_ops.py)."""
import math
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.engine.kernels import source
from lab.engine.wgpu.matmul_plan import Limits, Tuning, declared_storage, heads_in_place, plan, plan_group, storage

dims = st.integers(1, 70_000)


def test_planning_needs_no_device():
    code = "import sys, lab.engine.wgpu.matmul_plan as P; P.plan(300, 200, 1000); print('wgpu' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("trans_a, trans_b, entry, transpose_b", [
    (False, False, "nn", False), (True, False, "tn", False), (False, True, "nn", True), (True, True, "tn", True)])
def test_whole_64_tiles_take_the_aligned_kernel_and_b_transposed_first(trans_a, trans_b, entry, transpose_b):
    p = plan(64, 192, 48, 1, 1, trans_a, trans_b)
    assert (p.path, p.kernel, p.entry, p.transpose_b) == ("aligned", "matmul_aligned", entry, transpose_b)
    assert not p.cast  # float16 operands are read as they are
    assert p.grid == (3, 1, 1) and p.split == 1 and p.k_chunk == 48


@pytest.mark.parametrize("trans_a, entry", [(False, "main_rows"), (True, "main")])
def test_ragged_shapes_take_the_bounds_checked_kernel_on_float32(trans_a, entry):
    p = plan(100, 70, 33, 3, 1, trans_a, True, bias=True)
    assert (p.path, p.kernel, p.entry, p.cast, p.transpose_b, p.fused_bias) == ("tiled", "matmul", entry, True, False,
                                                                               False)
    assert p.grid == (2, 2, 3)
    assert plan(100, 70, 33, tuning=Tuning(MATMUL_ROWS=False)).entry == "main"
    assert plan(64, 64, 16, tuning=Tuning(MATMUL_ALIGNED=False)).path == "tiled"


def test_wide_products_take_128_by_128_tiles_that_transpose_b_themselves():
    p = plan(2048, 2048, 1024, 1, 1, False, True)
    assert (p.entry, p.grid, p.transpose_b) == ("nt_wide", (16, 16, 1), False)
    assert plan(2048, 1024, 128).entry == "nn128"  # 2 Mi outputs: half of WIDE_MIN_TILES 128 x 128 tiles
    assert plan(2048, 2048, 1024, tuning=Tuning(WIDE_MIN_TILES=1 << 30)).entry == "nn128"


def test_128_row_tiles_only_where_enough_workgroups_remain():
    p = plan(1024, 2112, 64)            # 16 x 33 = 528 tiles of 64 x 64: at least 2 x ROW128_MIN_TILES
    assert (p.entry, p.grid) == ("nn128", (33, 8, 1))
    assert plan(1024, 1984, 64).entry == "nn"   # 496 tiles
    assert plan(1088, 2112, 64).entry == "nn"   # M not a multiple of 128


@pytest.mark.parametrize("M, N, K, split", [(64, 64, 16384, 128), (128, 128, 16384, 128), (64, 256, 2048, 16),
                                            (2048, 2048, 4096, 1), (64, 64, 240, 1)])
def test_split_k_when_k_is_long_and_the_output_small(M, N, K, split):
    p = plan(M, N, K, bias=True)
    assert p.split == split and p.k_chunk * split >= K > p.k_chunk * (split - 1) and p.k_chunk % 16 == 0
    assert p.grid[2] == split
    assert p.fused_bias == (split == 1)  # a bias is added after the chunks are summed
    assert plan(M, N, K, into=True).split == 1  # written in place: no partial products


def test_gelu_is_fused_only_into_a_product_in_one_piece():
    assert plan(256, 256, 64, gelu=True).gelu and not plan(64, 64, 4096, gelu=True).gelu


def test_split_never_takes_more_chunks_than_the_grid_holds():
    p = plan(64, 64, 16384, 600, 600, limits=Limits(max_workgroups=1000))
    assert p.split == 1 and p.grid == (1, 1, 600)
    assert plan(64, 64, 16384, 60, 60, limits=Limits(max_workgroups=1000)).split == 16


@settings(max_examples=300, deadline=None)
@given(M=dims, N=dims, K=st.integers(0, 70_000), batch=st.sampled_from([1, 2, 12, 48]), ta=st.booleans(),
       tb=st.booleans(), limit=st.sampled_from([65535, 4096, 256]))
def test_grids_never_exceed_the_devices_workgroups_per_dimension(M, N, K, batch, ta, tb, limit):
    try:
        p = plan(M, N, K, batch, 1, ta, tb, limits=Limits(max_workgroups=limit))
    except ValueError as e:
        assert f"max-compute-workgroups-per-dimension of {limit}" in str(e) and f"{M} x {K} @ {K} x {N}" in str(e)
        return
    assert max(p.grid) <= limit
    if p.path in ("aligned", "tiled", "thin"):
        assert p.split == math.ceil(K / p.k_chunk)


def test_a_grid_too_large_is_one_clear_error():
    with pytest.raises(ValueError, match=r"needs a grid of \(1, 2, 1\) workgroups, more than this device's "
                                         r"max-compute-workgroups-per-dimension of 1"):
        plan(128, 64, 16, limits=Limits(max_workgroups=1))


def test_workgroup_storage_is_read_from_the_kernels_sources():
    src = "var<workgroup> Ta: array<vec4<f32>, 512>;\nvar<workgroup> Bs : array< f32 , 33 >;\nvar<private> x: array<f32, 9>;"
    assert declared_storage(src) == 512 * 16 + 33 * 4
    with pytest.raises(ValueError, match="workgroup array of vec3<f16>"):
        declared_storage("var<workgroup> T: array<vec3<f16>, 4>;")
    for kernel in ("matmul", "matmul_aligned", "matmul_thin"):  # within WebGPU's guaranteed 16 KiB: any device
        assert 0 < storage(kernel) <= 16384 and storage(kernel) == declared_storage(source(kernel))


def test_a_tile_never_exceeds_the_workgroup_storage_limit():
    for limit in (16384, 32768, 49152):
        p = plan(256, 256, 256, limits=Limits(workgroup_storage=limit))
        assert storage(p.kernel) <= limit
    small = Limits(workgroup_storage=storage("matmul"))   # too small for the whole-tile kernel
    assert plan(256, 256, 256, limits=small).kernel == "matmul"
    assert not heads_in_place(256, 64, small) and heads_in_place(256, 64)
    with pytest.raises(ValueError, match="max-compute-workgroup-storage-size of 1024"):
        plan(256, 256, 256, limits=Limits(workgroup_storage=1024))


@settings(max_examples=200, deadline=None)
@given(M=st.integers(1, 20_000), N=st.integers(1, 60_000), K=st.integers(1, 5000))
def test_padding_is_to_exactly_the_next_whole_tiles_and_at_most_pad_max_work_more(M, N, K):
    p = plan(M, N, K)
    if p.path != "padded":
        return
    Mp, Np, Kp = p.padded
    assert (Mp - M, Np - N, Kp - K) == (-M % 128, -N % 128, -K % 16)
    assert Mp * Np * Kp <= Tuning().PAD_MAX_WORK * M * N * K and M * N * K >= Tuning().PAD_MIN_VOLUME


def test_gpt2_output_layer_is_padded_and_small_or_wasteful_ones_are_not():
    assert plan(8192, 50257, 768).padded == (8192, 50304, 768)
    assert plan(8192, 50257, 768, 1, 1, True, False).padded == (8192, 50304, 768)
    assert plan(8192, 129, 1 << 18).path != "padded"      # 98% more work
    assert plan(1000, 1000, 100).path == "tiled"           # too small to be worth the copies
    assert plan(8192, 50257, 768, gelu=True).path != "padded"


def test_smollm2_576_wide_training_products_run_padded_to_whole_128_tiles():
    # a batch 8 x 512 step's linears: 576 columns (q/o, down) or rows (their weight gradients) pad to 640 (11% more
    # work) and then take the 128 x 128 kernels
    assert plan(4096, 576, 576).padded == (4096, 640, 576)
    assert plan(4096, 576, 1536).padded == (4096, 640, 1536)
    assert plan(576, 1536, 4096, 1, 1, True, False).padded == (640, 1536, 4096)
    assert plan(4096, 520, 576).path != "padded"          # 23% more work


NO_ROWS = Tuning(ROWS_MAX=0)   # (a thin M otherwise takes matmul_rows.wgsl)


def test_thin_products():
    p = plan(8, 4096, 4096, tuning=NO_ROWS)       # a thin M: C^T = B^T A^T
    assert (p.path, p.swap, p.grid, p.split, p.k_chunk, p.cast) == ("thin", True, (64, 1, 16), 16, 256, True)
    p = plan(4096, 16, 4096, 1, 1, True, True)    # a thin N, operands read as stored
    assert (p.path, p.swap, p.grid) == ("thin", False, (64, 1, 16))
    assert plan(1024, 1024, 8).path == "thin_k" and plan(1024, 1024, 8, 1, 1, False, True).path == "tiled"
    for not_thin in (plan(8, 4096, 4096, bias=True, tuning=NO_ROWS), plan(8, 4096, 4096, 2, 1), plan(8, 64, 64)):
        assert not_thin.path != "thin"


@pytest.mark.parametrize("triangle, M, N, K, trans_a, code", [
    ("out", 128, 128, 64, False, 1), ("out", 128, 64, 64, False, 0), ("a", 128, 64, 128, False, 2),
    ("a", 128, 64, 128, True, 3), ("a", 128, 64, 64, False, 0), (None, 128, 128, 128, False, 0)])
def test_triangle_codes(triangle, M, N, K, trans_a, code):
    assert plan(M, N, K, 1, 1, trans_a, False, triangle=triangle).triangle == code


def test_head_views_run_in_place_only_on_whole_vec4_tiles():
    assert plan(256, 64, 256, 8, 8, views=True).path == "aligned"
    assert plan(256, 64, 256, 8, 8, views=True, views_vec4=False).path == "gathered"
    assert plan(250, 64, 250, 8, 8, views=True).path == "gathered"
    assert plan(256, 64, 0, 8, 8, views=True).path == "gathered" and plan(256, 64, 0).path == "zeros"


def test_an_empty_product_plans_no_split():
    for M, N in ((0, 64), (64, 0), (0, 0)):
        p = plan(M, N, 4096)
        assert p.split == 1 and p.grid[0] * p.grid[1] == 0


def test_a_split_chunk_below_one_is_refused():
    with pytest.raises(ValueError, match="SPLIT_K_MIN_CHUNK must be an integer >= 1, got 0"):
        Tuning(SPLIT_K_MIN_CHUNK=0)


@pytest.mark.parametrize("change, message", [
    (dict(THIN_MAX=17), "THIN_MAX must be an integer >= 0 and <= 16, got 17"),   # the thin kernel's 16 columns
    (dict(ROWS_MAX=17), "ROWS_MAX must be an integer >= 0 and <= 16, got 17"),   # the rows kernel's accumulators
    (dict(SPLIT_K_TILES=-1), "SPLIT_K_TILES must be an integer >= 0, got -1"),
    (dict(SPLIT_K_MIN_K=2.5), "SPLIT_K_MIN_K must be an integer >= 0, got 2.5"),
    (dict(THIN_MIN_VOLUME=True), "THIN_MIN_VOLUME must be an integer >= 0, got True"),
    (dict(PAD_MAX_WORK=0.5), "PAD_MAX_WORK must be a finite number >= 1, got 0.5"),
    (dict(MATMUL_ROWS=1), "MATMUL_ROWS must be True or False, got 1")])
def test_a_nonsense_tuning_is_one_error_naming_the_field(change, message):
    with pytest.raises(ValueError, match=re.escape("Tuning: " + message)):
        Tuning(**change)


def test_a_split_threshold_below_one_chunk_plans_one_chunk():
    """SPLIT_K_MIN_K under SPLIT_K_MIN_CHUNK let K // SPLIT_K_MIN_CHUNK be 0 chunks: ZeroDivisionError."""
    for M, N, K in ((20, 20, 64), (1, 65, 33), (130, 129, 40), (64, 64, 1)):
        p = plan(M, N, K, tuning=Tuning(SPLIT_K_MIN_K=0))
        assert p.split == 1 and p.k_chunk >= K
    assert plan(0, 5, 7, tuning=Tuning(THIN_MIN_VOLUME=0)).path == "tiled"   # no thin plan of no rows


def test_a_thin_product_takes_the_tiled_kernel_where_the_thin_one_does_not_fit():
    between = Limits(workgroup_storage=(storage("matmul") + storage("matmul_thin")) // 2)
    assert storage("matmul") <= between.workgroup_storage < storage("matmul_thin")
    assert plan(1, 4097, 300, tuning=NO_ROWS).kernel == "matmul_thin"
    assert plan(1, 4097, 300, limits=between, tuning=NO_ROWS).kernel == "matmul"
    assert plan(4097, 3, 300, limits=between).kernel == "matmul"


@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("trans_b, entry", [(False, "nn"), (True, "nt")])
def test_few_rows_are_one_dispatch_with_their_epilogues(M, trans_b, entry):
    """A decode step's products (M = batch rows <= 16): matmul_rows.wgsl, K reduced inside the workgroup (no split,
    no summing pass), bias and GELU applied as it stores, the weight read as stored (no cast, no transposed copy);
    a (K, N) weight's columns per workgroup by the row count (Tuning.ROWS_COLS_NN below 8 rows, _MANY from 8)."""
    cols = 8 if trans_b else (Tuning().ROWS_COLS_NN if M < 8 else Tuning().ROWS_COLS_NN_MANY)
    for N, K in ((768, 768), (3072, 768), (768, 3072), (50257, 768), (65, 100), (1, 32)):
        for bias, gelu in ((False, False), (True, False), (True, True)):
            p = plan(M, N, K, 1, 1, False, trans_b, bias=bias, gelu=gelu)
            assert (p.path, p.kernel, p.entry, p.grid, p.split, p.cast, p.transpose_b, p.fused_bias, p.gelu) == (
                "rows", "matmul_rows", entry, (math.ceil(N / cols), 1, 1), 1, False, False, bias, gelu)


def test_rows_take_only_plain_products_of_few_rows():
    assert plan(17, 768, 768).path != "rows" and plan(16, 768, 768, tuning=NO_ROWS).path != "rows"
    assert plan(4, 768, 768, 1, 1, True, False).path != "rows"          # A stored transposed
    assert plan(4, 32, 16, 4, 4).path != "rows" and plan(4, 32, 16, 4, 1).path != "rows"   # batched
    assert plan(64, 64, 64, 1, 1, views=True).path != "rows" and plan(4, 64, 64, into=True).path != "rows"
    assert plan(4, 64, 0).path == "zeros"
    # more columns than the grid holds fall back to the tiled kernels instead of failing
    assert plan(1, 8 * 65535 + 1, 64, 1, 1, False, True).path != "rows"
    assert plan(1, 8 * 1000 + 1, 64, 1, 1, False, True, limits=Limits(max_workgroups=1000)).path != "rows"
    assert plan(1, 8 * 1000, 64, 1, 1, False, True, limits=Limits(max_workgroups=1000)).path == "rows"


def test_linear_groups_take_one_dispatch_where_the_device_binds_them():
    """Llama's q, k, v (side by side) and gate, up (SwiGLU) of a few rows: one matmul_rows_multi.wgsl dispatch over
    every weight's column tiles (8 columns below 8 rows, 4 from 8: Tuning.ROWS_COLS_NN, _MANY); None (the layers one by one) past ROWS_MAX, on a device binding fewer than its
    nine storage buffers (WebGPU's default is 8), for swiglu of unequal widths or a grid past the limit."""
    many = Limits(storage_buffers=16)
    p = plan_group(1, (576, 192, 192), "concat", many)
    assert (p.kernel, p.entry, p.grid) == ("matmul_rows_multi", "concat", (72 + 24 + 24, 1, 1))
    assert plan_group(16, (1536, 1536), "swiglu", many).grid == (384, 1, 1)
    assert plan_group(3, (33,), "concat", Limits(storage_buffers=9)).grid == (5, 1, 1)
    assert plan_group(3, (33,), "concat", Limits(storage_buffers=9), Tuning(ROWS_COLS_NN=32)).grid == (2, 1, 1)
    for refused in (plan_group(17, (64, 64), "swiglu", many), plan_group(1, (64, 64), "swiglu", Limits()),
                    plan_group(1, (64, 65), "swiglu", many), plan_group(1, (64,) * 4, "concat", many),
                    plan_group(1, (64,), "swiglu", many), plan_group(0, (64,), "concat", many),
                    plan_group(1, (32 * 1001,), "concat", Limits(max_workgroups=1000, storage_buffers=16)),
                    plan_group(4, (64, 64), "swiglu", many, Tuning(ROWS_MAX=2))):
        assert refused is None
    with pytest.raises(ValueError, match="plan_group: how must be 'concat' or 'swiglu', got 'sum'"):
        plan_group(1, (64,), "sum")


def test_column_sums_come_with_whole_tile_products_of_an_untransposed_b_only():
    """B's column sums (a Linear layer's bias gradient beside its weight gradient) are taken by the whole-tile
    kernels that stage B (K, N), split or not; every other product leaves them to a reduction (column_sums False)."""
    for M, N, K, tuning in ((64, 64, 48, Tuning()), (64, 64, 512, Tuning()), (128, 64, 32, Tuning(ROW128_MIN_TILES=0)),
                            (128, 128, 512, Tuning(WIDE_MIN_TILES=0))):
        for trans_a in (False, True):
            p = plan(M, N, K, 1, 1, trans_a, False, column_sums=True, tuning=tuning)
            assert p.path == "aligned" and p.column_sums and p.entry[1] == "n", p
    assert plan(64, 64, 512, 1, 1, True, False, column_sums=True).split > 1
    assert not plan(64, 64, 48, 1, 1, True, False).column_sums                           # not asked for
    assert not plan(33, 70, 300, 1, 1, True, False, column_sums=True).column_sums        # ragged: tiled kernel
    assert not plan(128, 128, 48, 1, 1, False, True, column_sums=True,                   # B staged along k
                    tuning=Tuning(WIDE_MIN_TILES=0)).column_sums
    assert not plan(64, 64, 48, 2, 2, True, False, column_sums=True).column_sums        # a batch of products
    assert not plan(64, 64, 48, 1, 1, False, False, bias=True, column_sums=True).column_sums
    assert not plan(64, 64, 64, 1, 1, False, False, triangle="out", column_sums=True).column_sums
    assert not plan(64, 64, 48, 1, 1, False, False, into=True, column_sums=True).column_sums
    assert not plan(0, 64, 48, 1, 1, True, False, column_sums=True).column_sums   # no workgroup to sum them
