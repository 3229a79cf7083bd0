"""The lab's random state: one numpy Generator seeds parameter init and, by default, every dropout mask. A consumer
that must not be disturbed by other threads (a trainer's dropout seeds) takes its own stream (own_stream) and
draws from it inside draw_from()."""
import contextlib
import threading

import numpy as np

_rng = {"gen": np.random.default_rng(0)}
_local = threading.local()  # per thread: the stream next_seed draws from (None: the global one), the seeds recorded


def manual_seed(seed):
    """Make parameter init, dropout masks and batch sampling repeatable."""
    _rng["gen"] = np.random.default_rng(seed)


def generator():
    return _rng["gen"]


def own_stream():
    """The global generator as it stands, handed over to one consumer; the global one jumps 2**127 draws ahead, so
    nothing drawn elsewhere afterwards can repeat or shift the consumer's numbers (a run that nothing else draws
    beside gets the very seeds it drew from the global generator before streams existed)."""
    g = _rng["gen"]
    _rng["gen"] = np.random.Generator(g.bit_generator.jumped())
    return g


@contextlib.contextmanager
def draw_from(stream):
    """next_seed() in this thread draws from `stream` inside the block (other threads are unaffected)."""
    previous, _local.stream = getattr(_local, "stream", None), stream
    try:
        yield
    finally:
        _local.stream = previous


def next_seed():
    reused = getattr(_local, "reused", None)
    if reused is not None:
        seeds, drawn = reused
        if len(drawn) == len(seeds):
            raise RuntimeError(f"a recomputation drew more random seeds than the {len(seeds)} its forward drew: "
                               f"the block's dropout changed between its forward and its backward")
        drawn.append(seeds[len(drawn)])
        return drawn[-1]
    seed = int((getattr(_local, "stream", None) or _rng["gen"]).integers(0, 2**32 - 1))
    for drawn in getattr(_local, "recordings", ()):
        drawn.append(seed)
    return seed


@contextlib.contextmanager
def recording_seeds():
    """Collect the seeds next_seed() draws in this thread inside the block, in order (a step capture maps them to
    new ones; a checkpointed block draws them again as it recomputes). Recordings nest: each sees every seed."""
    drawn, previous = [], getattr(_local, "recordings", ())
    _local.recordings = previous + (drawn,)
    try:
        yield drawn
    finally:
        _local.recordings = previous


@contextlib.contextmanager
def reusing_seeds(seeds):
    """next_seed() in this thread returns `seeds` in order inside the block, drawing and recording nothing: a
    recomputed block gets its forward's dropout masks, and a step replay's seed patches cover both. Asking for
    more or fewer seeds than that is an error (the recomputation would not be the forward it replaces)."""
    previous, _local.reused = getattr(_local, "reused", None), (list(seeds), [])
    try:
        yield
        if len(_local.reused[1]) != len(seeds):
            raise RuntimeError(f"a recomputation drew {len(_local.reused[1])} random seeds, its forward "
                               f"{len(seeds)}: the block's dropout changed between its forward and its backward")
    finally:
        _local.reused = previous


def get_state():
    return _rng["gen"].bit_generator.state


def set_state(state):
    g = np.random.default_rng()
    g.bit_generator.state = state
    _rng["gen"] = g
