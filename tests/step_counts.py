"""Dispatches of a training step, as the plan's op counts are checked against them."""
import lab
from lab.engine.backend import using_backend
from lab.train import TrainConfig, Trainer


def second_step_dispatches(backend, make_model, ids, **config):
    """The dispatches of a fresh model's second training step on `backend` (the first compiled the kernels and made
    the optimizer's moments); config: TrainConfig's fields beside steps=10 and replay_steps=False."""
    with using_backend(backend):
        lab.manual_seed(0)
        t = Trainer(make_model(), ids, ids, TrainConfig(**{"steps": 10, "replay_steps": False, **config}))
        t.train_step()
        lab.sync()
        before = backend.stats()["dispatches"]
        t.train_step()
        lab.sync()
    return backend.stats()["dispatches"] - before
