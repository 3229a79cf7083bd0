"""One way to time an operation, shared by the benchmarks and the plan estimator's device profile."""
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
