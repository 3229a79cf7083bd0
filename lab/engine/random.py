"""The lab's random state: one numpy Generator seeds parameter init and every dropout mask."""
import numpy as np

_rng = {"gen": np.random.default_rng(0)}


def manual_seed(seed):
    """Make parameter init, dropout masks and batch sampling repeatable."""
    _rng["gen"] = np.random.default_rng(seed)


def generator():
    return _rng["gen"]


def next_seed():
    return int(_rng["gen"].integers(0, 2**32 - 1))


def get_state():
    return _rng["gen"].bit_generator.state


def set_state(state):
    g = np.random.default_rng()
    g.bit_generator.state = state
    _rng["gen"] = g
