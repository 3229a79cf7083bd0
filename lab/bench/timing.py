"""One way to time an operation, shared by the benchmarks and the plan estimator's device profile, one way to
measure a training step's peak memory, and one way to write a benchmark's record."""
import gc
import json
import os
import secrets
import time
from pathlib import Path


def best_seconds(fn, sync, budget=0.4, rounds=5, max_reps=200):
    """Seconds per call of fn(): one warm-up call, one timed probe, then `rounds` rounds of as many calls as fit
    the budget; the best round (the least disturbed by other work on the machine). sync() waits for the device."""
    fn()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    probe = time.perf_counter() - t
    if probe > budget:  # one call already spends the whole budget (a large matmul on a CPU adapter)
        return probe
    reps = int(max(1, min(max_reps, budget / rounds / max(probe, 1e-9))))
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def peak_of_steps(backend, build, run):
    """(build()'s result, the peak bytes in use while run(built) ran, the built model's bytes counted): the
    backend's own count on a device; on numpy, where arrays are host memory, tracemalloc's (numpy reports its
    arrays to it), tracing from before the build so the model is counted, its peak reset once built (building a
    packed base from a random float32 init passes through float32 weights no training step holds)."""
    if backend.name != "numpy":
        built = build()
        backend.reset_peak()
        run(built)
        return built, backend.stats().get("peak_bytes_in_use")
    import tracemalloc
    tracemalloc.start()
    try:
        built = build()
        gc.collect()
        tracemalloc.reset_peak()
        run(built)
        return built, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def write_result(out_path, result, print_fn=print):
    """A benchmark's record as JSON at out_path, written whole beside it and then renamed over it: an interrupted
    or failed write (Ctrl-C, a full disk) leaves the previous record as it was, not half of a new one."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=float)   # (numpy scalars as numbers)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")   # (two writers never share one)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print_fn(f"wrote {out_path}")
