"""lab.profile(): where a step's time goes, kernel by kernel.

On wgpu every dispatch gets GPU timestamps (its own compute pass with timestamp writes), so the table shows
device time per kernel. On numpy each backend primitive is timed on the host with perf_counter.
"""
import contextlib
import functools
import time

from .backend import get_backend

# The numpy primitives worth timing: everything the Backend interface defines that does arithmetic.
_NUMPY_PRIMITIVES = ("unary", "scalar", "binary", "reduce", "copy_view", "write_view", "matmul", "softmax",
                     "softmax_bwd", "log_softmax", "log_softmax_bwd", "layernorm", "layernorm_bwd", "embedding",
                     "embedding_bwd", "cross_entropy", "cross_entropy_bwd", "dropout", "lora_down", "lora_up_add",
                     "adamw_", "sgd_", "sumsq_into", "clip_", "full", "from_numpy", "to_numpy", "gelu_and_grad",
                     "linears")


class Profile:
    """Timed records (name, detail, nanoseconds) of one profiled region; `table()` groups them by name, or by
    detail (a matmul's transposes and batch x M x N x K shape) with detail=True."""

    def __init__(self, backend_name, device):
        self.backend, self.device, self.records = backend_name, device, []

    @property
    def total_ms(self):
        return sum(ns for _, _, ns in self.records) / 1e6

    def by_kernel(self, detail=False):
        """One row per kernel (or per detail), largest total time first: name, calls, total_ms, mean_us, share."""
        groups = {}
        for name, label, ns in self.records:
            name = label if detail else name
            calls, total = groups.get(name, (0, 0))
            groups[name] = (calls + 1, total + ns)
        total = max(sum(t for _, t in groups.values()), 1)
        rows = [dict(name=n, calls=c, total_ms=t / 1e6, mean_us=t / c / 1e3, share=t / total)
                for n, (c, t) in groups.items()]
        return sorted(rows, key=lambda r: -r["total_ms"])

    def table(self, top=25, detail=False):
        what = "GPU time" if self.backend == "wgpu" else "host time"
        lines = [f"{what} on {self.device}: {len(self.records)} calls, {self.total_ms:.2f} ms",
                 f"{'kernel':<48}{'calls':>7}{'total ms':>11}{'mean us':>10}{'share':>8}"]
        rows = self.by_kernel(detail)
        for r in rows[:top]:
            lines.append(f"{r['name']:<48}{r['calls']:>7}{r['total_ms']:>11.3f}{r['mean_us']:>10.1f}"
                         f"{r['share']:>7.1%}")
        if len(rows) > top:
            rest = rows[top:]
            lines.append(f"{'(' + str(len(rest)) + ' more)':<48}{sum(r['calls'] for r in rest):>7}"
                         f"{sum(r['total_ms'] for r in rest):>11.3f}")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def _repr_pretty_(self, p, cycle):
        p.text(self.table())


@contextlib.contextmanager
def profile(backend=None):
    """Time every kernel run inside the block:

        with lab.profile() as prof:
            trainer.train_step()
        print(prof.table())
    """
    b = backend or get_backend()
    if b.name == "wgpu":
        prof = Profile("wgpu", b.device_info["device"])
        b.profile_begin()
        try:
            yield prof
        finally:
            prof.records = b.profile_end()
        return
    prof = Profile(b.name, "host")
    originals = {}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                label = f"{name}:{args[0]}" if name in ("unary", "scalar", "binary", "reduce") else name
                detail = label
                if name == "matmul":
                    a, bm = args[0], args[1]
                    detail = f"matmul {a.shape[0]}x{a.shape[1]}x{a.shape[2]} @ {bm.shape[1]}x{bm.shape[2]}"
                prof.records.append((label, detail, time.perf_counter_ns() - t))
        return wrapper

    for name in _NUMPY_PRIMITIVES:
        originals[name] = b.__dict__.get(name)
        setattr(b, name, timed(name, getattr(b, name)))
    try:
        yield prof
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(b, name)
            else:
                setattr(b, name, original)
