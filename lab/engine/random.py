"""The lab's random state: one numpy Generator seeds parameter init and every dropout mask."""
import contextlib

import numpy as np

_rng = {"gen": np.random.default_rng(0), "drawn": None}


def manual_seed(seed):
    """Make parameter init, dropout masks and batch sampling repeatable."""
    _rng["gen"] = np.random.default_rng(seed)


def generator():
    return _rng["gen"]


def next_seed():
    seed = int(_rng["gen"].integers(0, 2**32 - 1))
    if _rng["drawn"] is not None:
        _rng["drawn"].append(seed)
    return seed


@contextlib.contextmanager
def recording_seeds():
    """Collect the seeds next_seed() draws inside the block, in order (a step capture maps them to new ones)."""
    previous, _rng["drawn"] = _rng["drawn"], []
    try:
        yield _rng["drawn"]
    finally:
        _rng["drawn"] = previous


def get_state():
    return _rng["gen"].bit_generator.state


def set_state(state):
    g = np.random.default_rng()
    g.bit_generator.state = state
    _rng["gen"] = g
