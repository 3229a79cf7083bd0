"""One way to time an operation, shared by the benchmarks and the plan estimator's device profile, and one way to
measure a training step's peak memory."""
import gc
import time


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
