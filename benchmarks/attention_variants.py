"""Time the fused attention's block variants against the composed path on the wgpu backend: forward and backward of
F.causal_self_attention at shakespeare-char's, gpt2-small's and smollm2-135m's attention shapes (heads, key-value
heads (GQA) and head dim from lab.models.PRESETS, batch as `bench train` takes it, the preset's dropout) at T = 256
and T = 1024, the Llama presets also with the rotary tables (rope=(cos, sin), as LlamaAttention calls it: rows
marked "rope"; the composed path then rotates by F.rotary). Rounds
alternate the paths (the device's clocks drift); each path's median over the rounds, the device synced around
each run. Each variant's output and qkv gradient are compared with the composed path's first (same dropout
decisions), and a variant that differs is reported and never recommended. One line per shape: ms per path and
the composed path's time over the variant's (> 1: the variant is faster); --out writes all of it as JSON with the
variant to set in lab/engine/wgpu/attention_plan.py's AttentionTuning.
--head-dim D times the same widths, batches and head groups cut into heads of D instead (the presets' are 64), for
AttentionTuning.FLASH_HEAD_DIM_BLOCKS.
Usage: python benchmarks/attention_variants.py --out FILE [--repeats N] [--head-dim D] [--quick (tiny shapes:
lavapipe, tests)]"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

import lab
from lab.bench.train import BENCH_BATCH_SIZE
from lab.engine import ops as F
from lab.engine.backend import backend_instance
from lab.engine.wgpu import attention_plan
from lab.engine.wgpu.attention_plan import AttentionTuning
from lab.models import PRESETS

PRESET_NAMES = ("shakespeare-char", "gpt2-small", "smollm2-135m")
LENGTHS = (256, 1024)
TOLERANCE = 1e-4    # RMS of fused - composed relative to composed's (float32 sums in another order: ~1e-7)


def shapes(quick, head_dim=None):
    """(preset, batch, heads, key-value heads, head dim, T, dropout, rotary) of each timed attention; head_dim: the
    presets' widths and query heads per key-value head, in heads of head_dim."""
    if quick:   # tiny: 2 heads of 64 on lavapipe, and 4 reading 2 key-value heads at a T of no block's multiple
        out = [("tiny", 1, 2, 2, 64, 32, 0.0, False), ("tiny", 1, 2, 2, 64, 64, 0.2, False),
               ("tiny-gqa", 1, 4, 2, 64, 40, 0.0, False), ("tiny-gqa", 1, 4, 2, 64, 40, 0.2, False),
               ("tiny-gqa", 1, 4, 2, 64, 40, 0.0, True)]
    else:
        out = []
        for name in PRESET_NAMES:
            c = PRESETS[name]
            llama = not hasattr(c, "n_head")
            H, Hkv, D = ((c.num_attention_heads, c.num_key_value_heads, c.head_dim) if llama else
                         (c.n_head, c.n_head, c.n_embd // c.n_head))
            out += [(name, BENCH_BATCH_SIZE.get(name, 12), H, Hkv, D, T, c.dropout, rotary)
                    for T in LENGTHS for rotary in ((False, True) if llama else (False,))]
    if head_dim:   # the same width and group size G, in heads of head_dim (at least one group)
        cut = []
        for name, Bsz, H, Hkv, D, T, p, rotary in out:
            G = H // Hkv
            H = max(G, H * D // head_dim // G * G)
            if not (rotary and head_dim % 8):   # (rotary halves of whole vec4s)
                cut.append((f"{name} in heads of {head_dim}", Bsz, H, H // G, head_dim, T, p, rotary))
        out = cut
    return out


def rope_tables(B, T, D):
    """Rotary tables (cos, sin) (T, D) as Llama's (rotate-half form, theta 10000) on backend B."""
    ang = np.outer(np.arange(T), 1.0 / 10000 ** (np.arange(0, D, 2) / D))
    ang = np.concatenate([ang, ang], axis=1)
    return tuple(lab.tensor(f(ang).astype(np.float32), backend=B) for f in (np.cos, np.sin))


def name_of(variant):
    return "f{}x{}x{}/b{}x{}x{}".format(*variant[0], *variant[1])


def run(B, qkv, g, n_head, n_kv, p, variant, rope=None):
    """One forward and backward, synced; variant None: the composed path; rope: None or the rotary tables. Returns
    (seconds, y, dqkv)."""
    B.FLASH_ATTENTION = variant is not None
    if variant is not None:
        B.attention_tuning = AttentionTuning(True, *variant)
    qkv.grad = None
    B.sync(wait=True)
    start = time.perf_counter()
    lab.manual_seed(0)
    y = F.causal_self_attention(qkv, n_head, dropout_p=p, n_kv_head=n_kv, rope=rope)
    y.backward(g)
    B.sync(wait=True)
    return time.perf_counter() - start, y, qkv.grad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (default 7)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds, 3 variants (lavapipe, tests)")
    ap.add_argument("--head-dim", type=int, help="the presets' widths in heads of this many (a multiple of 4 up to "
                                                 "256) instead of 64")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.head_dim is not None and args.head_dim not in attention_plan.HEAD_DIMS:
        ap.error(f"--head-dim must be a multiple of 4 in [4, 256], got {args.head_dim}")
    B = backend_instance("wgpu")
    storage = B.limits.get("max-compute-workgroup-storage-size", 16384)
    head_dims = {s[4] for s in shapes(args.quick, args.head_dim)}
    if len(head_dims) != 1:   # (one AttentionTuning serves them all)
        raise SystemExit(f"attention_variants: the shapes have heads of {sorted(head_dims)}: time one head dim a run")
    head_dim = head_dims.pop()
    variants = attention_plan.variants(storage, head_dim, B.limits.get("max-compute-invocations-per-workgroup", 256))
    if not variants:
        raise SystemExit(f"attention_variants: no blocks fit heads of {head_dim} in {storage} bytes of workgroup "
                         f"memory")
    repeats = args.repeats
    if args.quick:
        variants, repeats = variants[:3], min(repeats, 2)
    saved = (B.FLASH_ATTENTION, B.attention_tuning)
    rng = np.random.default_rng(0)
    results = []
    try:
        for preset, Bsz, H, Hkv, D, T, p, rotary in shapes(args.quick, args.head_dim):
            qkv = lab.tensor(rng.standard_normal((Bsz, T, (H + 2 * Hkv) * D)).astype(np.float32), requires_grad=True,
                             backend=B)
            g = lab.tensor(rng.standard_normal((Bsz, T, H * D)).astype(np.float32), backend=B)
            B.FLASH_ATTENTION = False
            rope = rope_tables(B, T, D) if rotary else None
            composed = not B.flash_attention_fits(qkv.shape, H, Hkv, rotary)   # else its weights exceed a buffer
            paths = ([None] if composed else []) + list(variants)
            # each variant against the composed path once (this also builds the pipelines): relative RMS of the
            # difference of y and of dqkv, summed on the device (gpt2-small's dqkv is 300 MB: no readbacks)
            ref = run(B, qkv, g, H, Hkv, p, None, rope)[1:] if composed else None
            errors = {}
            for v in variants:
                got = run(B, qkv, g, H, Hkv, p, v, rope)[1:]
                with lab.no_grad():
                    errors[v] = None if ref is None else max(
                        math.sqrt(((a - b) * (a - b)).sum().item() / max((b * b).sum().item(), 1e-30))
                        for a, b in zip(got, ref))
            del ref, got
            times = {v: [] for v in paths}
            for _ in range(repeats):
                for v in paths:
                    times[v].append(run(B, qkv, g, H, Hkv, p, v, rope)[0])
            ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
            row = {"preset": preset, "batch": Bsz, "heads": H, "kv_heads": Hkv, "head_dim": D, "T": T, "dropout": p,
                   "rotary": rotary, "composed_ms": ms.get(None), "variants": {}}
            line = [f"{preset} B={Bsz} H={H}/{Hkv} D={D} T={T} p={p}{' rope' if rotary else ''}: composed "
                    + (f"{ms[None]:.3f} ms" if composed else "n/a")]
            for v in variants:
                ratio = ms[None] / ms[v] if composed else None
                ok = errors[v] is None or errors[v] <= TOLERANCE
                row["variants"][name_of(v)] = {"fwd_blocks": list(v[0]), "bwd_blocks": list(v[1]), "ms": ms[v],
                                               "ratio": ratio, "rel_rms_error": errors[v], "equal": ok}
                line.append(f"{name_of(v)} {ms[v]:.3f}" + (f" ({ratio:.2f}x)" if ratio else "")
                            + ("" if ok else f" DIFFERS {errors[v]:.1e}"))
            print(" | ".join(line), flush=True)
            results.append(row)
    finally:
        B.FLASH_ATTENTION, B.attention_tuning = saved
    # the variant whose worst ratio over the shapes is best, among those equal to the composed path everywhere
    worst = {}
    for v in variants:
        entries = [r["variants"][name_of(v)] for r in results]
        if all(e["equal"] for e in entries):
            worst[v] = min((e["ratio"] for e in entries if e["ratio"] is not None), default=None)
    ranked = [v for v in worst if worst[v] is not None]
    best = max(ranked, key=lambda v: worst[v]) if ranked else None
    summary = {"variant": name_of(best) if best else None, "worst_ratio": worst.get(best),
               "default_on": bool(best) and worst[best] >= 1.0,
               "set": None if not best else (
                   f"AttentionTuning: FLASH_DEFAULT = {bool(best) and worst[best] >= 1.0}, FLASH_FWD_BLOCKS = "
                   f"{best[0]}, FLASH_BWD_BLOCKS = {best[1]}") if head_dim == 64 else (
                   f"AttentionTuning: FLASH_HEAD_DIM_BLOCKS += (({head_dim}, {best[0]}, {best[1]}),)")}
    print("best:", summary["variant"], "worst ratio", None if best is None else f"{summary['worst_ratio']:.3f}",
          "->", summary["set"])
    record = {"device": B.device_info.get("device"), "head_dim": head_dim,
              "workgroup_storage": storage, "repeats": repeats, "tolerance": TOLERANCE, "shapes": results,
              "best": summary}
    tmp = f"{args.out}.tmp"    # written whole, then renamed: an interrupted write leaves no half a record
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, args.out)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
