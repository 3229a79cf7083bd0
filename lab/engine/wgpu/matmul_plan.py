"""The matmul planner: which kernel, entry point, tiles, grid, split along K, padding and operand copies a product
takes, from its shapes, transpositions, the device's limits and the tuning below. Pure arithmetic (no device, no
arrays; the kernels' workgroup memory is read from their WGSL), so every choice can be tested without a GPU;
matmul.py carries a plan out."""
import dataclasses
import functools
import math
import re

from ...checks import InputError, integer, real, show
from ..kernels import source
from .common import WG, _grid, _round_up

# The kernels' geometry, fixed by their sources (kernels/matmul*.wgsl), not tuned:
TILE = 64        # matmul.wgsl's and matmul_aligned.wgsl's nn/tn/nt/tt output tiles: 64 x 64
TILE_WIDE = 128  # matmul_aligned.wgsl's *128 tiles (128 rows x 64) and *_wide tiles (128 x 128)
TK = 16          # the tiled kernels' step along K: split-K chunks and whole-tile K are multiples of it
THIN_ROWS = 64   # matmul_thin.wgsl's rows (of the product or, for a thin M, of its transpose) per workgroup
THIN_TK = 32     # matmul_thin.wgsl's step along K
THIN_COLS = 16   # matmul_thin.wgsl's columns of the product (or, for a thin M, of its transpose)
ROWS_LIMIT = 16  # matmul_rows.wgsl's most rows (one accumulator each per thread)
ROWS_COLS_NT = 8  # matmul_rows.wgsl's columns per workgroup for B (N, K) (for B (K, N): Tuning.ROWS_COLS_NN)
ROWS_COLS_ALLOWED = (4, 8, 16, 32, 64)
_WORKGROUP_ARRAY = re.compile(r"var<workgroup>\s*\w+\s*:\s*array<\s*([\w<>]+)\s*,\s*(\d+)\s*>")
_ELEMENT_BYTES = {"f32": 4, "u32": 4, "i32": 4, "vec2<f32>": 8, "vec4<f32>": 16, "vec4<u32>": 16}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Every tuning constant of the matmul choice, each with its reason (the measurements were on the H200)."""
    SPLIT_K_TILES: int = 1024       # split K while the output has fewer 64 x 64 tiles than this (enough to fill a
    #                                 large GPU; 128 x 128 tiles count four each)
    SPLIT_K_MIN_K: int = 256        # ... and K is at least this long
    SPLIT_K_MIN_CHUNK: int = 128    # ... into chunks of at least this many along K (summing the chunks costs a pass)
    ROW128_MIN_TILES: int = 256     # 128-row tiles only for products that make at least twice this many 64 x 64
    #                                 tiles (split chunks included): fewer leave multiprocessors idle
    WIDE_MIN_TILES: int = 256       # 128 x 128 tiles for products that make at least this many of them (270 of them
    #                                 still ran faster than 540 of 128 x 64; fewer leave most of 132 SMs idle)
    MATMUL_ROWS: bool = True        # row-major A staged along rows (matmul.wgsl main_rows)
    MATMUL_ALIGNED: bool = True     # whole-tile shapes take matmul_aligned.wgsl (vec4 loads, no bounds checks)
    GELU_GRAD_FUSED: bool = False   # an MLP's hidden gradient times gelu'(pre) applied as the whole-tile kernel
    #                                 stores g W^T (its GELU_GRAD pipelines), not by a gelu_bwd pass: off, as on the
    #                                 H200 the longer epilogue cost more than the pass (shakespeare-char's 16384 x
    #                                 1536 x 384: 636 us against 466 + a 113 us pass)
    ROWS_MAX: int = 16              # products of up to this many rows (a decode step's linears) take
    #                                 matmul_rows.wgsl: K reduced in the workgroup, bias, GELU and residual fused
    ROWS_COLS_NN: int = 8           # ... their columns per workgroup for a (K, N) weight, up to 7 rows (the rest of
    #                                 the 256 threads slice K): decode steps on the H200, ms per step at 32/16/8/4
    #                                 columns: gpt2-small 3.10/2.72/2.56/2.41, smollm2-135m 7.10/6.36/4.90/6.73
    ROWS_COLS_NN_MANY: int = 4      # ... from 8 rows: batch 16, gpt2-small 7.59/5.49/4.38/4.03, smollm2-135m
    #                                 12.78/11.65/10.00/8.80 (32 columns left a 768-wide output 24 workgroups)
    THIN_MAX: int = 16              # products with M or N up to this take matmul_thin.wgsl, with K up to this
    #                                 lora.wgsl's up_add_t_main ...
    THIN_MIN_VOLUME: int = 1 << 20  # ... when M N K is at least this (smaller ones are cheap either way)
    THIN_SPLIT_BLOCKS: int = 1024   # the thin kernel splits K while it has fewer row blocks than this
    PAD_MIN_VOLUME: int = 1 << 28   # M N K from which a ragged product runs zero-padded to whole 128 x 128 tiles
    #                                 (a GPT-2 output layer, 8192 x 50257 x 768: the bounds-checked kernels ran its
    #                                 three products at about 25 TFLOP/s, 76 of a 209 ms step) ...
    PAD_MAX_WORK: float = 1.12      # ... if the padded product is at most this much more work (SmolLM2's 576-wide
    #                                 products padded to 640 run on 128 x 128 tiles: a training step 141.3 -> 137.0
    #                                 ms on the H200; 1.25 padded more and gained less, 139.7)

    def __post_init__(self):
        # a threshold below its meaningful range silently means "always" or "never", and THIN_MAX above the thin
        # kernel's 16 columns wrote only the first 16 of each row: each field is checked against what the kernels do
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is bool:
                if not isinstance(value, bool):
                    raise InputError(f"Tuning: {f.name} must be True or False, got {show(value)}")
            elif f.name.startswith("ROWS_COLS_NN"):
                if value not in ROWS_COLS_ALLOWED:   # (a divisor of the 256 threads that keeps 4 rows' sums in them)
                    raise InputError(f"Tuning: {f.name} must be one of {ROWS_COLS_ALLOWED}, got {show(value)}")
            elif f.name == "PAD_MAX_WORK":
                object.__setattr__(self, f.name, real(f"Tuning: {f.name}", value, 1.0))
            else:
                object.__setattr__(self, f.name, integer(f"Tuning: {f.name}", value, int(f.name == "SPLIT_K_MIN_CHUNK"),
                                                         {"THIN_MAX": THIN_COLS, "ROWS_MAX": ROWS_LIMIT}.get(f.name)))


@dataclasses.dataclass(frozen=True)
class Limits:
    """The device limits a plan must respect (WebGPU's guaranteed minimums by default)."""
    max_workgroups: int = 65535     # per grid dimension
    workgroup_storage: int = 16384  # bytes of workgroup memory
    storage_buffers: int = 8        # storage buffers a kernel binds

    @classmethod
    def of(cls, limits):
        """From a device's limits dict (wgpu's names)."""
        return cls(limits.get("max-compute-workgroups-per-dimension", cls.max_workgroups),
                   limits.get("max-compute-workgroup-storage-size", cls.workgroup_storage),
                   limits.get("max-storage-buffers-per-shader-stage", cls.storage_buffers))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a product runs. path: "zeros" (K = 0), "rows" (matmul_rows.wgsl, entry by B's layout: bias, GELU and a
    residual applied as it stores), "gathered" (head views through contiguous copies), "padded"
    (through zero-padded copies of sizes `padded`, planned again), "thin" (matmul_thin.wgsl; `swap`: it computes
    C^T = B^T A^T), "thin_k" (lora.wgsl for K <= THIN_MAX), "aligned" (matmul_aligned.wgsl) or "tiled"
    (matmul.wgsl). `cast`: float16 operands are widened first (every kernel but the whole-tile ones reads
    float32); `transpose_b`: B is copied transposed first, `layout` ("nn", "tn", ...) is then the kernel's;
    `split` chunks of `k_chunk` along K are summed after; `fused_bias`, `gelu`: applied as the tiles are stored;
    `triangle`: matmul_aligned.wgsl's code (1: the output's lower triangle, 2/3: A (or A^T) lower-triangular);
    `column_sums`: the kernel also sums B's columns (matmul_aligned.wgsl's SUMS; asked for and not given, the
    caller sums them by a reduction)."""
    path: str
    kernel: str = ""
    entry: str = ""
    grid: tuple = (1, 1, 1)
    split: int = 1
    k_chunk: int = 0
    padded: tuple = None
    cast: bool = False
    transpose_b: bool = False
    layout: str = "nn"
    fused_bias: bool = False
    gelu: bool = False
    triangle: int = 0
    swap: bool = False
    column_sums: bool = False


def declared_storage(wgsl):
    """Bytes of workgroup memory a WGSL module declares (every var<workgroup> array: an upper bound for each entry)."""
    total = 0
    for element, count in _WORKGROUP_ARRAY.findall(wgsl):
        if element not in _ELEMENT_BYTES:
            raise ValueError(f"matmul_plan: workgroup array of {element}, not one of {sorted(_ELEMENT_BYTES)}")
        total += _ELEMENT_BYTES[element] * int(count)
    return total


@functools.cache
def storage(kernel):
    """Bytes of workgroup memory kernels/<kernel>.wgsl declares (read from the source, so it follows its edits)."""
    return declared_storage(source(kernel))


def fits(kernel, limits):
    return storage(kernel) <= limits.workgroup_storage


def heads_in_place(seq, dim, limits=Limits(), tuning=Tuning()):
    """Whether attention's six products all take the whole-tile kernels: T (M, N or K) a multiple of 64, and the
    head width (N or K) too."""
    return tuning.MATMUL_ALIGNED and fits("matmul_aligned", limits) and seq % TILE == 0 and dim % TILE == 0


@functools.lru_cache(maxsize=4096)  # (a training step asks for the same few dozen plans each time)
def plan(M, N, K, batch_a=1, batch_b=1, trans_a=False, trans_b=False, *, bias=False, gelu=False, triangle=None,
         views=False, views_vec4=True, into=False, column_sums=False, limits=Limits(), tuning=Tuning()):
    """The Plan for (batch, M, K) @ (batch, K, N) (operands stored transposed where trans_a, trans_b; a batch of 1
    broadcast). views: an operand or the destination is a head view (views_vec4: every view's offset, row width
    and head width are multiples of 4); into: the product is written into a given destination; column_sums:
    B's column sums are wanted too (given where the whole-tile kernels stage B (K, N) of one product)."""
    batch = max(batch_a, batch_b)
    if K == 0:
        return Plan("gathered" if views else "zeros")
    if (0 < M <= tuning.ROWS_MAX and not trans_a and batch_a == batch_b == 1 and not views and not into
            and fits("matmul_rows", limits)):
        layout = "nt" if trans_b else "nn"
        grid = (math.ceil(N / rows_cols(layout, M, tuning)), 1, 1)
        if grid[0] <= limits.max_workgroups:
            return Plan("rows", "matmul_rows", layout, grid, k_chunk=K, layout=layout, fused_bias=bias, gelu=gelu)
    if not views and not gelu:
        padded = _padded_to_tiles(M, N, K, batch, limits, tuning)
        if padded:
            return Plan("padded", padded=padded)
    if not views and not gelu and not bias and batch_a == batch_b == 1 and M * N * K >= max(tuning.THIN_MIN_VOLUME, 1):
        if min(M, N) <= tuning.THIN_MAX and fits("matmul_thin", limits):
            return _thin(M, N, K, limits, tuning)
        if K <= tuning.THIN_MAX and not trans_a and not trans_b:
            return _checked(Plan("thin_k", "lora", "up_add_t_main", _grid(math.ceil(M * N / WG)), cast=True), M, N, K,
                            limits)
    tiles = math.ceil(M / TILE) * math.ceil(N / TILE) * batch
    wide_shape = M % TILE_WIDE == 0 and N % TILE_WIDE == 0 and K % TK == 0  # whole 128 x 128 tiles
    S = 1
    if 0 < tiles < tuning.SPLIT_K_TILES and K >= tuning.SPLIT_K_MIN_K and not into:
        # as many chunks as fill the device with tiles of 64 x 64 or, where M and N allow, of 128 x 128: the
        # weight gradients' long K then runs at the 128 x 128 tiles' full rate (45.9 TFLOP/s in 32 chunks against
        # 34.0 in 8 for 384 x 1536 x 16384 on the H200), well worth summing the chunks after
        S = max(1, min(math.ceil(tuning.SPLIT_K_TILES / (tiles // 4 if wide_shape else tiles)),
                       K // tuning.SPLIT_K_MIN_CHUNK, limits.max_workgroups // batch))   # (K may be under a chunk)
    kc = math.ceil(math.ceil(K / S) / TK) * TK   # chunks of whole TK steps
    S = math.ceil(K / kc)
    aligned_on = tuning.MATMUL_ALIGNED and fits("matmul_aligned", limits)
    aligned = aligned_on and M % TILE == 0 and N % TILE == 0 and K % TK == 0
    wide = aligned_on and wide_shape and M * N * batch * S >= tuning.WIDE_MIN_TILES << 14  # (16384 outputs a tile)
    if views and not (aligned and views_vec4):
        return Plan("gathered", cast=not aligned)
    layout = ("t" if trans_a else "n") + ("t" if trans_b else "n")
    grid = (math.ceil(N / TILE), math.ceil(M / TILE), batch * S)
    if not aligned:
        if not fits("matmul", limits):
            raise ValueError(f"matmul: the tiled kernel needs {storage('matmul')} bytes of workgroup memory, more "
                             f"than this device's max-compute-workgroup-storage-size of {limits.workgroup_storage}")
        entry = "main_rows" if tuning.MATMUL_ROWS and not trans_a else "main"
        return _checked(Plan("tiled", "matmul", entry, grid, S, kc, cast=True, layout=layout), M, N, K, limits)
    # A transposed B is staged badly by the 64-column kernels (its rows run along k); transposing it first costs
    # one copy of B, far less than the product it speeds up (measured: README, Performance). The 128 x 128
    # kernels transpose it as they stage it.
    transpose_b = not wide and layout in ("nt", "tt")
    if transpose_b:
        layout = layout[0] + "n"
    entry = layout
    if wide:  # 128 x 128 tiles, 8 x 8 per thread
        entry, grid = layout + "_wide", (N // TILE_WIDE, M // TILE_WIDE, grid[2])
    elif M % TILE_WIDE == 0 and tiles * S >= 2 * tuning.ROW128_MIN_TILES:
        # 128-row tiles (8 x 4 outputs per thread) where they still leave enough workgroups to fill the device
        entry, grid = layout + "128", (grid[0], M // TILE_WIDE, grid[2])
    tri = 0
    if triangle == "out" and M == N:
        tri = 1
    elif triangle == "a" and M == K:
        tri = 3 if trans_a else 2
    # a bias or GELU is applied as the tiles are stored, unless split-K partial products are summed afterwards
    # (M = 0 runs no workgroup, and the sums come from the first row tile's)
    sums = column_sums and M > 0 and layout[1] == "n" and batch == 1 and not (views or into or bias or gelu or tri)
    return _checked(Plan("aligned", "matmul_aligned", entry, grid, S, kc, transpose_b=transpose_b, layout=layout,
                         fused_bias=bias and S == 1, gelu=gelu and S == 1, triangle=tri, column_sums=sums),
                    M, N, K, limits)


def rows_cols(layout, M, tuning):
    """matmul_rows.wgsl's (and matmul_rows_multi.wgsl's) columns per workgroup for a product of M rows by B of
    layout "nn" ((K, N)) or "nt" ((N, K))."""
    if layout == "nt":
        return ROWS_COLS_NT
    return tuning.ROWS_COLS_NN if M < 8 else tuning.ROWS_COLS_NN_MANY


MULTI_BUFFERS = 9   # matmul_rows_multi.wgsl's storage bindings (params, input, 3 weights, output, 3 biases)


def plan_group(M, widths, how, limits=Limits(), tuning=Tuning()):
    """The Plan of several Linear layers of one input of M rows in one matmul_rows_multi.wgsl dispatch (weights
    (K, N_i) of `widths`): how "concat" (one to three outputs side by side) or "swiglu" (two of one width:
    silu(first) * second); None where it does not take them (more rows than ROWS_MAX, a device binding fewer
    storage buffers or less workgroup memory, a grid past the limit), and the layers then run one by one."""
    if how not in ("concat", "swiglu"):
        raise ValueError(f"plan_group: how must be 'concat' or 'swiglu', got {how!r}")
    tiles = [math.ceil(n / rows_cols("nn", M, tuning)) for n in widths]
    if not (0 < M <= tuning.ROWS_MAX and limits.storage_buffers >= MULTI_BUFFERS and fits("matmul_rows_multi", limits)
            and (len(widths) in (1, 2, 3) if how == "concat" else len(widths) == 2 and widths[0] == widths[1])):
        return None
    grid = (sum(tiles) if how == "concat" else tiles[0], 1, 1)
    if not 0 < grid[0] <= limits.max_workgroups:
        return None
    return Plan("rows", "matmul_rows_multi", how, grid, layout="nn")


def _checked(p, M, N, K, limits):
    """p, or the error that says its grid exceeds the device's workgroups per dimension."""
    if max(p.grid) > limits.max_workgroups:
        raise ValueError(f"matmul: {M} x {K} @ {K} x {N} ({p.kernel}:{p.entry}) needs a grid of {p.grid} workgroups, "
                         f"more than this device's max-compute-workgroups-per-dimension of {limits.max_workgroups}")
    return p


def _thin(M, N, K, limits, tuning):
    """matmul_thin.wgsl on the operands as stored (a thin M computes C^T = B^T A^T, written through C's strides),
    K split into chunks while too few row blocks fill the GPU."""
    swap = N > tuning.THIN_MAX
    blocks = math.ceil((N if swap else M) / THIN_ROWS)
    S = 1
    if blocks < tuning.THIN_SPLIT_BLOCKS:
        S = min(math.ceil(tuning.THIN_SPLIT_BLOCKS / blocks), max(K // tuning.SPLIT_K_MIN_CHUNK, 1),
                limits.max_workgroups)
    kc = math.ceil(math.ceil(K / S) / THIN_TK) * THIN_TK
    S = math.ceil(K / kc)
    return _checked(Plan("thin", "matmul_thin", "main", (blocks, 1, S), S, kc, cast=True, swap=swap), M, N, K, limits)


def _padded_to_tiles(M, N, K, batch, limits, tuning):
    """(Mp, Np, Kp), M and N rounded up to 128 and K to 16, where a ragged product is to run as its zero-padded
    whole-tile one (else None): large (PAD_MIN_VOLUME), and padding adds at most PAD_MAX_WORK to the work; the
    copies in and out cost far less than the rate gained."""
    if not (tuning.MATMUL_ALIGNED and fits("matmul_aligned", limits)) or (
            M % TILE_WIDE == 0 and N % TILE_WIDE == 0 and K % TK == 0):
        return None
    Mp, Np, Kp = _round_up(M, TILE_WIDE), _round_up(N, TILE_WIDE), _round_up(K, TK)
    if batch * M * N * K >= tuning.PAD_MIN_VOLUME and Mp * Np * Kp <= tuning.PAD_MAX_WORK * M * N * K:
        return Mp, Np, Kp
    return None
