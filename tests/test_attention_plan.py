"""The fused attention's blocks (lab/engine/wgpu/attention_plan.py): the choice as pure arithmetic, and every
variant that fits lavapipe's workgroup memory equal to the composed path on it."""
import numpy as np
import pytest

from lab.checks import InputError
from lab.engine.wgpu import attention_plan as ap
from lab.engine.wgpu.attention_plan import BASE, AttentionTuning

from attention_runs import attention_run

LAVAPIPE, H200 = 32768, 49152


def test_the_tuned_blocks_where_the_memory_takes_them_else_the_largest_smaller_ones_that_fit():
    assert all(ap.workgroup_bytes(e, BASE) <= LAVAPIPE for es in ap.ENTRIES.values() for e in es)
    tuned = AttentionTuning(FLASH_FWD_BLOCKS=(64, 32, 8), FLASH_BWD_BLOCKS=(32, 32, 16))
    assert ap.blocks("fwd", 64, H200, tuned) == (64, 32, 8)
    assert ap.blocks("bwd", 64, H200, tuned) == (32, 32, 16)
    assert ap.blocks("fwd", 64, LAVAPIPE, tuned) == (32, 32, 8)  # 46,080 bytes: not on 32 KiB; 31,744 do
    assert ap.blocks("bwd", 64, LAVAPIPE, tuned) == BASE        # bwd_kv_main 42,240 bytes; the base's 16 x 32
    #                                                             before an unmeasured 32 x 16 of as many scores
    assert ap.blocks("fwd", 64, H200, tuned, invocations=64) == (64, 32, 4)   # 128 threads a workgroup: too many
    assert ap.blocks("fwd", 64, 8192, tuned) is None            # not even the smallest blocks fit


@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 128])
@pytest.mark.parametrize("storage", [LAVAPIPE, H200])
def test_blocks_for_each_head_dim_fit_the_device_and_are_no_larger_than_the_tuned_ones(head_dim, storage):
    """Heads of 80 and 128 (Llama family) need smaller blocks than 64's: each pass gets blocks that fit the
    workgroup memory, the largest such (no fitting blocks of more scores within the tuning's)."""
    tuning = AttentionTuning()
    for kind, wanted in (("fwd", tuning.FLASH_FWD_BLOCKS), ("bwd", tuning.FLASH_BWD_BLOCKS)):
        b = ap.blocks(kind, head_dim, storage, tuning)
        assert b is not None and b[0] <= wanted[0] and b[1] <= wanted[1], (kind, b)
        assert all(ap.workgroup_bytes(e, b, head_dim) <= storage for e in ap.ENTRIES[kind])
        bigger = [c for c in ap._all_blocks() if c[0] * c[1] > b[0] * b[1] and c[0] <= wanted[0]
                  and c[1] <= wanted[1] and all(ap.workgroup_bytes(e, c, head_dim) <= storage
                                                for e in ap.ENTRIES[kind])]
        assert not bigger, (kind, b, bigger)
    assert ap.blocks("fwd", 64, H200) == tuning.FLASH_FWD_BLOCKS and ap.blocks("bwd", 64, H200) == \
        tuning.FLASH_BWD_BLOCKS    # the H200's measured choice at heads of 64 stands


def test_variants_fit_the_memory_they_are_for():
    for storage in (LAVAPIPE, H200):
        pairs = ap.variants(storage)
        assert pairs[0] == (BASE, BASE) and len(set(pairs)) == len(pairs)
        for head_dim in (32, 64, 80, 128):
            pairs = ap.variants(storage, head_dim)
            assert pairs and len(set(pairs)) == len(pairs)
            for fwd, bwd in pairs:
                assert ap.workgroup_bytes("fwd_main", fwd, head_dim) <= storage
                assert max(ap.workgroup_bytes(e, bwd, head_dim) for e in ap.ENTRIES["bwd"]) <= storage
    larger = [p for p in ap.variants(H200) if p not in ap.variants(LAVAPIPE)]
    assert {(64, 32, 8), (16, 64, 8)} <= {f for f, _ in larger} and (32, 32, 8) in {b for _, b in larger}


@pytest.mark.parametrize("bad,match", [
    (dict(FLASH_DEFAULT=1), "FLASH_DEFAULT must be True or False, got 1"),
    (dict(FLASH_DEFAULT_ROTARY="no"), "FLASH_DEFAULT_ROTARY must be True or False, got 'no'"),
    (dict(FLASH_DEFAULT_ROTARY=None), "FLASH_DEFAULT_ROTARY must be True or False, got None"),
    (dict(FLASH_FWD_BLOCKS=(16, 32)), r"FLASH_FWD_BLOCKS must be a \(BQ, BK, TY\) tuple of integers, got \(16, 32\)"),
    (dict(FLASH_BWD_BLOCKS=(48, 32, 8)), r"BQ in \(8, 16, 32, 64\).*got \(48, 32, 8\)"),
    (dict(FLASH_BWD_BLOCKS=(16, 32, 32)), r"TY in \(4, 8, 16\).*got \(16, 32, 32\)"),
    (dict(FLASH_BWD_BLOCKS=(16, 32, 16)), r"BQ and BK multiples of 2 TY, got \(16, 32, 16\)"),
    (dict(FLASH_BWD_BLOCKS=(32, 16, 16)), r"BQ and BK multiples of 2 TY, got \(32, 16, 16\)"),
    (dict(FLASH_FWD_BLOCKS=(16.0, 32, 8)), "tuple of integers"),
    (dict(FLASH_FWD_BLOCKS=(True, 32, 8)), "tuple of integers"),
    (dict(FLASH_FWD_BLOCKS="16x32"), "tuple of integers"),
])
def test_attention_tuning_refuses_blocks_the_kernels_do_not_take(bad, match):
    with pytest.raises(InputError, match=match):
        AttentionTuning(**bad)
    with pytest.raises(InputError, match="kind must be 'fwd' or 'bwd', got 'forward'"):
        ap.blocks("forward", 64, H200)
    for head_dim in (0, 62, 260, 64.0, True):
        with pytest.raises(InputError, match=f"head_dim must be a multiple of 4 in \\[4, 256\\], got {head_dim!r}"):
            ap.blocks("fwd", head_dim, H200)


def _workgroup_bytes_by_reading_the_kernel(entry, blocks, head_dim):
    """The bytes of the var<workgroup> arrays `entry` reaches in attention.wgsl (through the functions it calls),
    their sizes evaluated at these blocks and head dim."""
    import re

    from lab.engine import kernels
    text = kernels.specialize("attention", **dict(zip(("BQ", "BK", "TY", "D4"), (*blocks, head_dim // 4))))
    consts = {}
    for name, value in re.findall(r"^const (\w+): u32 = ([^;]+);", text, flags=re.M):
        consts[name] = eval(re.sub(r"(\d+)u", r"\1", value).replace("/", "//"), {}, dict(consts))
    arrays = {name: {"f32": 4, "vec2<f32>": 8, "vec4<f32>": 16}[elem]
              * eval(re.sub(r"(\d+)u", r"\1", n).replace("/", "//"), {}, dict(consts))
              for name, elem, n in re.findall(r"var<workgroup> (\w+): array<([\w<>]+), ([^>]+)>;", text)}
    bodies = {}
    for m in re.finditer(r"^fn (\w+)\(", text, flags=re.M):
        depth, i = 0, text.index("{", m.end())
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                bodies[m.group(1)] = text[i:j]
                break
    seen, todo = set(), [entry]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += [g for g in re.findall(r"\b(\w+)\(", bodies[f]) if g in bodies]
    used = {a for f in seen for a in arrays if re.search(r"\b" + a + r"\[", bodies[f])}
    return sum(arrays[a] for a in used)


@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
@pytest.mark.parametrize("blocks", [(16, 32, 8), (32, 32, 16), (64, 32, 8), (16, 64, 8), (8, 16, 4)])
def test_workgroup_bytes_counts_what_each_entry_point_declares(blocks, head_dim):
    """The plan's count of each entry point's workgroup memory is the kernel's: the arrays it reaches, at these
    template values (lavapipe does not refuse a pipeline over its limit, so the count is the only guard)."""
    for entry in ("fwd_main", "bwd_kv_main", "bwd_q_main"):
        assert ap.workgroup_bytes(entry, blocks, head_dim) == _workgroup_bytes_by_reading_the_kernel(
            entry, blocks, head_dim), entry


def test_every_variant_compiles(wgpu_backend):
    for head_dim in (64, 128):
        for fwd, bwd in ap.variants(H200, head_dim):
            wgpu_backend._pipeline("attention", "fwd_main", wgpu_backend._attention_subs(fwd, head_dim))
            for entry in ap.ENTRIES["bwd"]:
                wgpu_backend._pipeline("attention", entry, wgpu_backend._attention_subs(bwd, head_dim))


@pytest.mark.parametrize("variant", ap.variants(H200), ids=lambda v: "f{}x{}x{}-b{}x{}x{}".format(*v[0], *v[1]))
def test_every_block_variant_equals_the_composed_attention(wgpu_backend, numpy_backend, variant, monkeypatch):
    """Each (forward, backward) block choice that fits here gives the composed path's output and qkv gradient
    (numpy), with dropout the same decisions, at T of one block, of several and of no block's multiple."""
    fwd, bwd = variant
    monkeypatch.setattr(wgpu_backend, "attention_tuning", AttentionTuning(True, fwd, bwd))
    monkeypatch.setattr(wgpu_backend, "limits", {**wgpu_backend.limits, "max-compute-workgroup-storage-size": H200})
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", None)       # FLASH_DEFAULT decides
    rng = np.random.default_rng(5)
    for T, p in ((32, 0.0), (128, 0.25), (40, 0.0)):
        qkv_np = rng.standard_normal((1, T, 3 * 128)).astype(np.float32)
        g_np = rng.standard_normal((1, T, 128)).astype(np.float32)
        got, labels = {}, {}
        for backend in (wgpu_backend, numpy_backend):
            got[backend.name], labels[backend.name] = attention_run(backend, qkv_np, g_np, 2, p=p, seed=11)
        want = {"fwd_main": fwd, "bwd_kv_main": bwd, "bwd_q_main": bwd}
        for entry, b in want.items():
            assert labels["wgpu"][f"attention:{entry}"].endswith("{}x{}x{}".format(*b)), labels["wgpu"]
        for a, b in zip(got["wgpu"], got["numpy"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fused_attention_falls_back_to_the_composed_path_where_no_blocks_fit(wgpu_backend, monkeypatch):
    """On a device with 8 KiB of workgroup memory not even the smallest blocks fit heads of 64: the fused path is
    not taken (the composed one runs) rather than failing to build. (WebGPU's minimum 16 KiB takes 16 x 16 blocks.)"""
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    assert wgpu_backend.flash_attention_fits((1, 64, 384), 2)
    monkeypatch.setattr(wgpu_backend, "limits", {**wgpu_backend.limits, "max-compute-workgroup-storage-size": 16384})
    assert wgpu_backend.flash_attention_fits((1, 64, 384), 2)
    monkeypatch.setattr(wgpu_backend, "limits", {**wgpu_backend.limits, "max-compute-workgroup-storage-size": 8192})
    assert not wgpu_backend.flash_attention_fits((1, 64, 384), 2)


def test_attention_variants_benchmark_runs_quick(wgpu_backend, tmp_path):
    """benchmarks/attention_variants.py --quick (tiny shapes, a few seconds on lavapipe): every shape timed on the
    composed path and each variant, each variant equal to the composed path, the JSON written, and the backend's
    attention settings as they were."""
    import importlib.util
    import json

    from lab.engine.wgpu.attention_plan import variants
    before = (wgpu_backend.FLASH_ATTENTION, wgpu_backend.attention_tuning)
    spec = importlib.util.spec_from_file_location("attention_variants", "benchmarks/attention_variants.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "variants.json"
    record = bench.main(["--quick", "--out", str(out), "--repeats", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert (wgpu_backend.FLASH_ATTENTION, wgpu_backend.attention_tuning) == before
    assert len(record["shapes"]) == 5 and record["repeats"] == 1
    assert [r["rotary"] for r in record["shapes"]] == [False] * 4 + [True]   # (Llama's rope path timed too)
    names = {bench.name_of(v) for v in variants(wgpu_backend.limits["max-compute-workgroup-storage-size"], 64,
                                                wgpu_backend.limits["max-compute-invocations-per-workgroup"])[:3]}
    for row in record["shapes"]:
        assert row["composed_ms"] > 0 and set(row["variants"]) == names
        assert all(v["equal"] and v["ms"] > 0 and v["ratio"] > 0 for v in row["variants"].values()), row
    assert record["best"]["variant"] in names and record["best"]["set"].startswith("AttentionTuning: FLASH_DEFAULT")
    assert {(r["heads"], r["kv_heads"], r["head_dim"]) for r in record["shapes"]} == {(2, 2, 64), (4, 2, 64)}


def test_attention_variants_benchmark_times_other_head_dims_for_their_own_tuning(wgpu_backend, tmp_path):
    """--head-dim 32 cuts the same widths into heads of 32 (query heads per key-value head kept), times the
    variants that fit those heads and names the FLASH_HEAD_DIM_BLOCKS entry to set, which the plan then takes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("attention_variants", "benchmarks/attention_variants.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert list(dict.fromkeys(s[2:5] for s in bench.shapes(False, 128))) == [(3, 3, 128), (6, 6, 128), (3, 1, 128)]
    record = bench.main(["--quick", "--out", str(tmp_path / "v.json"), "--repeats", "1", "--head-dim", "32"])
    assert record["head_dim"] == 32
    assert {(r["heads"], r["kv_heads"], r["head_dim"]) for r in record["shapes"]} == {(4, 4, 32), (8, 4, 32)}
    assert all(v["equal"] for r in record["shapes"] for v in r["variants"].values())
    fwd, bwd = (tuple(record["shapes"][0]["variants"][record["best"]["variant"]][k]) for k in ("fwd_blocks",
                                                                                              "bwd_blocks"))
    assert record["best"]["set"] == f"AttentionTuning: FLASH_HEAD_DIM_BLOCKS += ((32, {fwd}, {bwd}),)"
    tuned = AttentionTuning(FLASH_HEAD_DIM_BLOCKS=((32, fwd, bwd),))
    assert (ap.blocks("fwd", 32, H200, tuned), ap.blocks("bwd", 32, H200, tuned)) == (fwd, bwd)
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path / "w.json"), "--head-dim", "62"])


@pytest.mark.parametrize("bad,match", [
    (((128, (16, 32, 8)),), r"FLASH_HEAD_DIM_BLOCKS\[0\] must be \(head_dim, fwd blocks, bwd blocks\)"),
    (((130, (16, 32, 8), (8, 16, 4)),), r"FLASH_HEAD_DIM_BLOCKS\[0\]: head_dim must be a multiple of 4 in \[4, 256\], "
                                        r"got 130"),
    (((128, (16, 32, 8), (8, 16, 4)),) * 2, r"FLASH_HEAD_DIM_BLOCKS\[1\]: head_dim 128 is given twice"),
    (((80, (16, 32, 8), (8, 16, 8)),), r"FLASH_HEAD_DIM_BLOCKS\[0\]'s bwd blocks must have .*got \(8, 16, 8\)"),
    (5, "FLASH_HEAD_DIM_BLOCKS must be a tuple of"),
])
def test_per_head_dim_tuning_refuses_entries_the_kernels_do_not_take(bad, match):
    with pytest.raises(InputError, match=match):
        AttentionTuning(FLASH_HEAD_DIM_BLOCKS=bad)


@pytest.mark.parametrize("storage,widest", [(16384, 76), (LAVAPIPE, 160), (H200, 244)])
def test_the_kernels_take_the_heads_whose_blocks_fit_and_a_t_within_the_grid(storage, widest):
    """kernels_take, the one rule of the engine (flash_attention_fits) and the plan estimator: the widest head is the
    device's workgroup memory's (the plan said 128 for every device: 16 KiB devices cannot run heads of 80-128, 32
    KiB ones run up to 160); rotary heads a multiple of 8; each pass's row of workgroups over T within the grid."""
    takes = [d for d in ap.HEAD_DIMS if ap.kernels_take(d, 2, 64, storage)]
    assert takes == list(range(4, widest + 1, 4))
    assert [d for d in ap.HEAD_DIMS if ap.kernels_take(d, 2, 64, storage, rotary=True)] == list(range(8, widest + 1, 8))
    assert not any(ap.kernels_take(d, 2, 64, storage) for d in (0, 2, 6, 258, 260))
    assert not ap.kernels_take(64, 0, 64, storage) and not ap.kernels_take(64, 65536, 64, storage)
    assert not ap.kernels_take(64, 2, 0, storage)
    fwd, bwd = ap.blocks("fwd", 64, storage), ap.blocks("bwd", 64, storage)
    most = 16 * min(fwd[0], bwd[0], bwd[1])        # T of 16 blocks of the smallest, on a grid of 16
    assert ap.kernels_take(64, 2, most, storage, max_workgroups=16)
    assert not ap.kernels_take(64, 2, most + 1, storage, max_workgroups=16)


def test_flash_attention_fits_asks_the_devices_grid_limit(wgpu_backend, monkeypatch):
    """A T whose blocks need more workgroups in a row than the device dispatches was taken by the fused path (its
    dispatch would fail validation): with the grid limit at 4 rows of blocks, T past 4 blocks goes composed."""
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    fwd, bwd = wgpu_backend._attention_blocks(16)
    most = 4 * min(fwd[0], bwd[0], bwd[1])
    monkeypatch.setattr(wgpu_backend, "limits", {**wgpu_backend.limits, "max-compute-workgroups-per-dimension": 4})
    assert wgpu_backend.flash_attention_fits((1, most, 3 * 16), 1)
    assert not wgpu_backend.flash_attention_fits((1, most + 1, 3 * 16), 1)
    assert not wgpu_backend.flash_attention_fits((5, 8, 3 * 16), 1)   # 5 heads in all: 5 rows of workgroups


@pytest.mark.parametrize("value", ["false", "off", "2", " 1", "true"])
def test_lab_flash_attention_takes_0_1_or_unset_only(value):
    """LAB_FLASH_ATTENTION was True for any value but "" and "0": "false" and "off" turned the fused attention on
    everywhere. Now 1, 0 or unset, else one error naming the variable, its value and what it takes."""
    assert (ap.asked(""), ap.asked("0"), ap.asked("1")) == (None, False, True)
    with pytest.raises(InputError, match=f"LAB_FLASH_ATTENTION must be 1 .*, 0 .* or unset .*, got '{value}'"):
        ap.asked(value)


def test_the_default_takes_rotary_attention_fused_and_the_rest_composed():
    """kernels_run, the one rule of the engine and the plan: by default (asked None) rotary attention runs fused
    (FLASH_DEFAULT_ROTARY) and the rest composed (FLASH_DEFAULT) below the binding limit; above it both fused; asked
    False / True override the defaults; the tuning's switches move them."""
    run = ap.kernels_run
    assert run(64, 2, 64, LAVAPIPE, 1 << 30, rotary=True) and not run(64, 2, 64, LAVAPIPE, 1 << 30)
    assert run(64, 2, 64, LAVAPIPE, 2 * 64 * 64 * 4 - 4) and not run(64, 2, 64, LAVAPIPE, 2 * 64 * 64 * 4)
    assert not run(64, 2, 64, LAVAPIPE, 1 << 30, rotary=True, asked=False) and run(64, 2, 64, LAVAPIPE, 1 << 30,
                                                                                       asked=True)
    assert not run(60, 2, 64, LAVAPIPE, 1 << 30, rotary=True, asked=True)   # (rotary heads a multiple of 8)
    off = AttentionTuning(FLASH_DEFAULT_ROTARY=False, FLASH_DEFAULT=True)
    assert not run(64, 2, 64, LAVAPIPE, 1 << 30, rotary=True, tuning=off) and run(64, 2, 64, LAVAPIPE, 1 << 30,
                                                                                     tuning=off)
