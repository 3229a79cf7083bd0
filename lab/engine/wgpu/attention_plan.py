"""The fused attention's blocks: how many queries (BQ) and keys (BK) a workgroup of kernels/attention.wgsl takes at a
time, on how many rows of 16 threads (TY), for the forward and for the backward, from the head dim, the device's
workgroup memory and invocations and the tuning below. Pure arithmetic (no device), so every choice is tested
without a GPU; nn.py carries it out. The switches to the fused path by default are here too
(AttentionTuning.FLASH_DEFAULT, FLASH_DEFAULT_ROTARY)."""
import dataclasses

from ...checks import InputError, show

BASE = (16, 32, 8)   # (BQ, BK, TY) that every entry point fits in 32 KiB at heads of 64 (lavapipe)
BQ_ALLOWED = (8, 16, 32, 64)
BK_ALLOWED = (16, 32, 64)    # (16 lanes of tx each hold BK / 16 keys of a score block)
TY_ALLOWED = (4, 8, 16)      # (each thread holds an even number of queries, BQ / TY, and of keys, BK / TY: pairs of
#                              weights a load)
HEAD_DIMS = range(4, 257, 4)  # (vec4 rows; each of 16 lanes holds every 16th vec4 of a row)
ENTRIES = {"fwd": ("fwd_main",), "bwd": ("bwd_kv_main", "bwd_q_main")}


def workgroup_bytes(entry, blocks, head_dim=64):
    """Bytes of workgroup memory attention.wgsl's `entry` uses at blocks (BQ, BK, TY) for heads of head_dim: the
    arrays it touches."""
    bq, bk, _ = blocks
    d4 = head_dim // 4
    rows, keys = 16 * d4 * bq, 2 * bk * (d4 + 1) * 16   # Qs (Gs alike): BQ rows of d4 vec4s; Ks, Vs (odd stride)
    if entry == "fwd_main":                      # Qs, Ks, Vs, Pw, red
        return rows + keys + 4 * bq * bk + 64 * bq
    if entry == "bwd_q_main":                    # Qs, Gs, Ks, Vs, Pw, Ls, Ds
        return 2 * rows + keys + 4 * bq * bk + 8 * bq
    if entry == "bwd_kv_main":                   # ... and St
        return 2 * rows + keys + 8 * bq * bk + 8 * bq
    raise InputError(f"workgroup_bytes: entry must be one of {sorted(e for v in ENTRIES.values() for e in v)}, "
                     f"got {show(entry)}")


def check_blocks(name, blocks):
    """blocks as a (BQ, BK, TY) tuple the kernels take, else one InputError naming `name`."""
    if (not isinstance(blocks, (tuple, list)) or len(blocks) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) for v in blocks)):
        raise InputError(f"{name} must be a (BQ, BK, TY) tuple of integers, got {show(blocks)}")
    bq, bk, ty = blocks
    if bq not in BQ_ALLOWED or bk not in BK_ALLOWED or ty not in TY_ALLOWED or bq % (2 * ty) or bk % (2 * ty):
        raise InputError(f"{name} must have BQ in {BQ_ALLOWED}, BK in {BK_ALLOWED}, TY in {TY_ALLOWED} and BQ and BK "
                         f"multiples of 2 TY, got {show(tuple(blocks))}")
    return tuple(blocks)


def _all_blocks():
    return [(bq, bk, ty) for bq in BQ_ALLOWED for bk in BK_ALLOWED for ty in TY_ALLOWED
            if not bq % (2 * ty) and not bk % (2 * ty)]


def _fits(kind, b, head_dim, storage, invocations):
    return 16 * b[2] <= invocations and all(workgroup_bytes(e, b, head_dim) <= storage for e in ENTRIES[kind])


@dataclasses.dataclass(frozen=True)
class AttentionTuning:
    """The fused attention's choices. benchmarks/attention_variants.py times each variant against the composed
    path; after a measurement on the H200 these are set from it (README, Performance)."""
    FLASH_DEFAULT: bool = False      # the fused kernels for every shape they take (heads of 4 to 256 in steps of 4),
    #                                  not only where the (B, H, T, T) weights exceed a buffer. Off for attention
    #                                  without rotary tables (GPT-2): on the H200 the fused path took 0.58-0.70x the
    #                                  composed one's speed at T = 1024 (gpt2-small) and at T = 256 with dropout
    #                                  (shakespeare-char); earlier, a whole shakespeare-char step 34.2 ms against 33.0
    #                                  composed (benchmarks/h200-decode-and-attention.log)
    FLASH_FWD_BLOCKS: tuple = (64, 32, 16)   # (BQ, BK, TY) of fwd_main where the device's workgroup memory takes
    #                                  them (else the largest that fits within them: blocks()): the variant whose worst
    #                                  ratio over those four shapes (heads of 64) was best (0.77x)
    FLASH_BWD_BLOCKS: tuple = (32, 32, 8)    # ... of bwd_kv_main and bwd_q_main
    FLASH_HEAD_DIM_BLOCKS: tuple = ()        # ((head_dim, fwd blocks, bwd blocks), ...): measured choices for heads
    #                                  of other widths (attention_variants.py --head-dim), in place of the two above
    FLASH_DEFAULT_ROTARY: bool = True  # FLASH_DEFAULT for attention with rotary tables (the Llama family), whose
    #                                  q and k the fused kernels rotate themselves: on the H200 smollm2-135m's step
    #                                  (batch 8 x 512, interleaved runs) took 135.3-135.9 ms fused against 140.1-140.5
    #                                  composed (3.3% faster), its attention alone (9 / 3 heads of 64) 2.4-2.9x the
    #                                  composed path at T = 256 and 1.2-1.4x at T = 1024 (attention_variants.py)

    def __post_init__(self):
        for name in ("FLASH_DEFAULT", "FLASH_DEFAULT_ROTARY"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"AttentionTuning: {name} must be True or False, got {show(getattr(self, name))}")
        for name in ("FLASH_FWD_BLOCKS", "FLASH_BWD_BLOCKS"):
            object.__setattr__(self, name, check_blocks(f"AttentionTuning: {name}", getattr(self, name)))
        entries, seen = self.FLASH_HEAD_DIM_BLOCKS, set()
        if not isinstance(entries, (tuple, list)):
            raise InputError(f"AttentionTuning: FLASH_HEAD_DIM_BLOCKS must be a tuple of (head_dim, fwd blocks, bwd "
                             f"blocks), got {show(entries)}")
        for i, entry in enumerate(entries):
            where = f"AttentionTuning: FLASH_HEAD_DIM_BLOCKS[{i}]"
            if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                raise InputError(f"{where} must be (head_dim, fwd blocks, bwd blocks), got {show(entry)}")
            _check_head_dim(where, entry[0])
            if entry[0] in seen:
                raise InputError(f"{where}: head_dim {entry[0]} is given twice")
            seen.add(entry[0])
            check_blocks(f"{where}'s fwd blocks", entry[1]), check_blocks(f"{where}'s bwd blocks", entry[2])
        object.__setattr__(self, "FLASH_HEAD_DIM_BLOCKS", tuple((d, tuple(f), tuple(b)) for d, f, b in entries))

    def wanted(self, head_dim):
        """The (fwd, bwd) blocks measured best for heads of head_dim (those of 64 where none were for it)."""
        return next(((f, b) for d, f, b in self.FLASH_HEAD_DIM_BLOCKS if d == head_dim),
                    (self.FLASH_FWD_BLOCKS, self.FLASH_BWD_BLOCKS))


def _check_head_dim(where, head_dim):
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim not in HEAD_DIMS:
        raise InputError(f"{where}: head_dim must be a multiple of 4 in [4, 256], got {show(head_dim)}")


def blocks(kind, head_dim, workgroup_storage, tuning=AttentionTuning(), invocations=256):
    """(BQ, BK, TY) for the forward (kind "fwd") or the backward ("bwd") at heads of head_dim: the tuning's (the
    measured best for head_dim, else for heads of 64) where every entry point of the pass fits `workgroup_storage`
    bytes and 16 TY threads are within `invocations`, else the largest blocks no larger than the tuning's that fit
    (most scores a block, then the most keys: the base's 16 x 32 before an unmeasured 32 x 16, then rows of 8
    threads as the base has); None where none fit (then the fused path cannot run). Any T: the kernels leave the last blocks' rows past T out."""
    if kind not in ENTRIES:
        raise InputError(f"blocks: kind must be 'fwd' or 'bwd', got {show(kind)}")
    _check_head_dim("blocks", head_dim)
    wanted = tuning.wanted(head_dim)[kind == "bwd"]
    smaller = sorted((b for b in _all_blocks() if b[0] <= wanted[0] and b[1] <= wanted[1]),
                     key=lambda b: (-b[0] * b[1], -b[1], abs(b[2] - 8)))
    return next((b for b in [wanted] + smaller if _fits(kind, b, head_dim, workgroup_storage, invocations)), None)


def kernels_take(head_dim, heads, seq, workgroup_storage, rotary=False, tuning=AttentionTuning(), invocations=256,
                 max_workgroups=65535):
    """Whether the kernels run causal self-attention over seq tokens of `heads` heads in all (B H: a workgroup row
    each) of head_dim on a device with this workgroup memory, invocations and grid limit: heads a multiple of 4 in
    [4, 256] (of 8 with rotary: its halves are whole vec4s) whose blocks fit (blocks(): up to 76 on WebGPU's
    guaranteed 16 KiB, 160 on 32 KiB, 244 on 48 KiB), and each pass's blocks of T within the grid (kernels_run:
    whether they run)."""
    if head_dim not in HEAD_DIMS or rotary and head_dim % 8 or not 0 < heads <= max_workgroups or seq < 1:
        return False
    fwd, bwd = (blocks(kind, int(head_dim), workgroup_storage, tuning, invocations) for kind in ("fwd", "bwd"))
    return fwd is not None and bwd is not None and -(-seq // min(fwd[0], bwd[0], bwd[1])) <= max_workgroups


def kernels_run(head_dim, heads, seq, workgroup_storage, max_binding, rotary=False, asked=None,
                tuning=AttentionTuning(), invocations=256, max_workgroups=65535):
    """Whether the engine runs the fused kernels (kernels_take's arguments): where they take the shape and are
    asked for (asked: LAB_FLASH_ATTENTION's True or False; None: the tuning's default, FLASH_DEFAULT_ROTARY with
    rotary tables, else FLASH_DEFAULT), or where the composed path's (B H, T, T) weights exceed max_binding bytes.
    The one rule of WgpuBackend.flash_attention_fits and the plan estimator."""
    wanted = (tuning.FLASH_DEFAULT_ROTARY if rotary else tuning.FLASH_DEFAULT) if asked is None else asked
    return (kernels_take(head_dim, heads, seq, workgroup_storage, rotary, tuning, invocations, max_workgroups)
            and (wanted or heads * seq * seq * 4 > max_binding))


def asked(value):
    """LAB_FLASH_ATTENTION's value as kernels_run's `asked`: unset or "" None, "0" False, "1" True."""
    if value not in ("", "0", "1"):   # (any other value turned the fused path on: "false" too)
        raise InputError(f"LAB_FLASH_ATTENTION must be 1 (the fused attention everywhere it applies), 0 (only "
                         f"where the composed weights exceed a buffer) or unset (AttentionTuning's default), got "
                         f"{show(value)}")
    return {"": None, "0": False, "1": True}[value]


def variants(workgroup_storage, head_dim=64, invocations=256):
    """The (forward, backward) block pairs worth timing on a device with this much workgroup memory, at heads of
    head_dim: each pass's blocks that fit it, the base first where it fits (benchmarks/attention_variants.py)."""
    def fitting(kind):   # the blocks under 16 x 32 x 8 only where those do not fit (heads of 80 and more)
        return [b for b in _all_blocks() if b[0] >= 16 and b[1] >= 32 and b[2] >= 8
                and _fits(kind, b, head_dim, workgroup_storage, invocations)] or [
            b for b in _all_blocks() if _fits(kind, b, head_dim, workgroup_storage, invocations)]
    fwd, bwd = fitting("fwd"), fitting("bwd")
    # each forward with the backward of the same blocks, or the largest backward that fits
    pairs = [(f, f if f in bwd else max(bwd, key=lambda b: (b[0] * b[1], -b[2]))) for f in fwd] if bwd else []
    pairs += [(f, b) for f in fwd[:1] for b in bwd if (f, b) not in pairs]
    return sorted(set(pairs), key=lambda p: (p != (BASE, BASE), p))
