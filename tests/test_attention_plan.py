"""The fused attention's blocks (lab/engine/wgpu/attention_plan.py): the choice as pure arithmetic, and every
variant that fits lavapipe's workgroup memory equal to the composed path on it."""
import numpy as np
import pytest

from lab.checks import InputError
from lab.engine.wgpu import attention_plan as ap
from lab.engine.wgpu.attention_plan import BASE, AttentionTuning

LAVAPIPE, H200 = 32768, 49152


def test_the_base_blocks_fit_32_kib_and_the_tuned_ones_where_t_and_the_memory_take_them():
    assert all(ap.workgroup_bytes(e, BASE) <= LAVAPIPE for es in ap.ENTRIES.values() for e in es)
    tuned = AttentionTuning(FLASH_FWD_BLOCKS=(64, 32, 8), FLASH_BWD_BLOCKS=(32, 32, 16))
    assert ap.blocks("fwd", 1024, H200, tuned) == (64, 32, 8)
    assert ap.blocks("bwd", 256, H200, tuned) == (32, 32, 16)
    assert ap.blocks("fwd", 1024, LAVAPIPE, tuned) == BASE      # 46,080 bytes: not on 32 KiB
    assert ap.blocks("bwd", 256, LAVAPIPE, tuned) == BASE       # bwd_kv_main 42,240 bytes
    assert ap.blocks("fwd", 96, H200, tuned) == BASE            # 96 is no multiple of 64
    assert ap.blocks("fwd", 1024, 16384, tuned) is None         # WebGPU's minimum: not even the base fits


def test_variants_fit_the_memory_they_are_for():
    for storage in (LAVAPIPE, H200):
        pairs = ap.variants(storage)
        assert pairs[0] == (BASE, BASE) and len(set(pairs)) == len(pairs)
        for fwd, bwd in pairs:
            assert ap.workgroup_bytes("fwd_main", fwd) <= storage
            assert max(ap.workgroup_bytes(e, bwd) for e in ap.ENTRIES["bwd"]) <= storage
    larger = [p for p in ap.variants(H200) if p not in ap.variants(LAVAPIPE)]
    assert {(64, 32, 8), (16, 64, 8)} <= {f for f, _ in larger} and (32, 32, 8) in {b for _, b in larger}


@pytest.mark.parametrize("bad,match", [
    (dict(FLASH_DEFAULT=1), "FLASH_DEFAULT must be True or False, got 1"),
    (dict(FLASH_FWD_BLOCKS=(16, 32)), r"FLASH_FWD_BLOCKS must be a \(BQ, BK, TY\) tuple of integers, got \(16, 32\)"),
    (dict(FLASH_BWD_BLOCKS=(48, 32, 8)), r"BQ in \(16, 32, 64\).*got \(48, 32, 8\)"),
    (dict(FLASH_BWD_BLOCKS=(16, 32, 32)), r"TY in \(8, 16\).*got \(16, 32, 32\)"),
    (dict(FLASH_BWD_BLOCKS=(16, 32, 16)), r"BQ a multiple of 2 TY, got \(16, 32, 16\)"),
    (dict(FLASH_FWD_BLOCKS=(16.0, 32, 8)), "tuple of integers"),
    (dict(FLASH_FWD_BLOCKS=(True, 32, 8)), "tuple of integers"),
    (dict(FLASH_FWD_BLOCKS="16x32"), "tuple of integers"),
])
def test_attention_tuning_refuses_blocks_the_kernels_do_not_take(bad, match):
    with pytest.raises(InputError, match=match):
        AttentionTuning(**bad)
    with pytest.raises(InputError, match="kind must be 'fwd' or 'bwd', got 'forward'"):
        ap.blocks("forward", 64, H200)


def _workgroup_bytes_by_reading_the_kernel(entry, blocks):
    """The bytes of the var<workgroup> arrays `entry` reaches in attention.wgsl (through the functions it calls),
    their sizes evaluated at these blocks."""
    import re

    from lab.engine import kernels
    text = kernels.specialize("attention", **dict(zip(("BQ", "BK", "TY"), blocks)))
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


@pytest.mark.parametrize("blocks", [(16, 32, 8), (32, 32, 16), (64, 32, 8), (16, 64, 8)])
def test_workgroup_bytes_counts_what_each_entry_point_declares(blocks):
    """The plan's count of each entry point's workgroup memory is the kernel's: the arrays it reaches, at these
    template values (lavapipe does not refuse a pipeline over its limit, so the count is the only guard)."""
    for entry in ("fwd_main", "bwd_kv_main", "bwd_q_main"):
        assert ap.workgroup_bytes(entry, blocks) == _workgroup_bytes_by_reading_the_kernel(entry, blocks), entry


def test_every_variant_compiles(wgpu_backend):
    for fwd, bwd in ap.variants(H200):
        wgpu_backend._pipeline("attention", "fwd_main", wgpu_backend._attention_subs(fwd))
        for entry in ap.ENTRIES["bwd"]:
            wgpu_backend._pipeline("attention", entry, wgpu_backend._attention_subs(bwd))


@pytest.mark.parametrize("variant", ap.variants(H200), ids=lambda v: "f{}x{}x{}-b{}x{}x{}".format(*v[0], *v[1]))
def test_every_block_variant_equals_the_composed_attention(wgpu_backend, numpy_backend, variant, monkeypatch):
    """Each (forward, backward) block choice that fits here gives the composed path's output and qkv gradient
    (numpy), with dropout the same decisions, at T of one block, of several and of a multiple of 32 that is no
    multiple of a 64-query block (there the base blocks run)."""
    import lab
    from lab.engine import ops as F
    fwd, bwd = variant
    monkeypatch.setattr(wgpu_backend, "attention_tuning", AttentionTuning(True, fwd, bwd))
    monkeypatch.setattr(wgpu_backend, "limits", {**wgpu_backend.limits, "max-compute-workgroup-storage-size": H200})
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", None)       # FLASH_DEFAULT decides
    rng = np.random.default_rng(5)
    for T, p in ((32, 0.0), (128, 0.25), (96, 0.0)):
        qkv_np = rng.standard_normal((1, T, 3 * 128)).astype(np.float32)
        g_np = rng.standard_normal((1, T, 128)).astype(np.float32)
        got = {}
        for backend in (wgpu_backend, numpy_backend):
            lab.manual_seed(11)
            qkv = lab.tensor(qkv_np, requires_grad=True, backend=backend)
            with lab.profile(backend) as prof:
                y = F.causal_self_attention(qkv, 2, dropout_p=p)
                (y * lab.tensor(g_np, backend=backend)).sum().backward()
            got[backend.name] = (y.numpy(), qkv.grad.numpy())
            if backend is wgpu_backend:
                labels = {name: label for name, label, _ in prof.records}
                want = {"fwd_main": fwd, "bwd_kv_main": bwd, "bwd_q_main": bwd}
                for entry, b in want.items():
                    b = b if T % b[0] == 0 and T % b[1] == 0 else BASE
                    assert labels[f"attention:{entry}"].endswith("{}x{}x{}".format(*b)), labels
        for a, b in zip(got["wgpu"], got["numpy"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fused_attention_falls_back_to_the_composed_path_where_no_blocks_fit(wgpu_backend, monkeypatch):
    """On a device with WebGPU's minimum 16 KiB of workgroup memory not even the base blocks fit: the fused path
    is not taken (the composed one runs) rather than failing to build."""
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    assert wgpu_backend.flash_attention_fits((1, 64, 384), 2)
    monkeypatch.setattr(wgpu_backend, "limits", {**wgpu_backend.limits, "max-compute-workgroup-storage-size": 16384})
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
    assert len(record["shapes"]) == 4 and record["repeats"] == 1
    names = {bench.name_of(v) for v in variants(wgpu_backend.limits["max-compute-workgroup-storage-size"])[:3]}
    for row in record["shapes"]:
        assert row["composed_ms"] > 0 and set(row["variants"]) == names
        assert all(v["equal"] and v["ms"] > 0 and v["ratio"] > 0 for v in row["variants"].values()), row
    assert record["best"]["variant"] in names and record["best"]["set"].startswith("AttentionTuning: FLASH_DEFAULT")
