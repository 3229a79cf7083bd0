"""Numerical faults: finding the first tensor where a NaN or Inf appeared in a training step.

The optimizer already skips a step whose gradient norm is not finite (on the device: see optim.wgsl), so the
weights stay as they were; this module explains the fault to the person training: which step, and where the
non-finite values first appeared, in the order the step computed them: the weights, the forward pass (embedding,
each block's output, the logits, the loss), then the gradients (from the head back towards the embedding).
"""
import numpy as np

from ..engine.tensor import no_grad


class NonFiniteError(FloatingPointError):
    """A training step produced NaN or Inf. `step` is its number, `tensor` names where it first appeared."""

    def __init__(self, step, tensor, detail=""):
        self.step, self.tensor = step, tensor
        super().__init__(f"step {step}: non-finite values (NaN or Inf) first appear in {tensor}{detail}. The "
                         f"update of this step was skipped, so the weights are those of step {step - 1}; lower the "
                         f"learning rate, check the data, or set TrainConfig(nonfinite='skip') to skip such steps")


def _bad(array):
    return not np.isfinite(array).all()


def first_nonfinite(model, batch):
    """The name of the first tensor with NaN or Inf for this (x, y) batch, or None if everything is finite."""
    for name, p in model.named_parameters():
        if _bad(p.numpy()):
            return f"the weights: parameter {name!r}"
    x, y = batch
    was_training = model.training
    model.eval()  # dropout off: the forward pass is a pure function of weights and data here
    try:
        with no_grad():
            try:
                logits, loss, hidden = model(x, y, return_hidden=True)
            except TypeError:  # a model without hidden states (ProNeuralLM)
                (logits, loss), hidden = model(x, y), []
        for i, h in enumerate(hidden):
            if _bad(h.numpy()):
                return "the forward pass: the embedding output" if i == 0 else f"the forward pass: block {i - 1}'s output"
        if _bad(logits.numpy()):
            return "the forward pass: the logits"
        if _bad(loss.numpy()):
            return "the forward pass: the loss"
    finally:
        model.train(was_training)
    for name, p in reversed(list(model.named_parameters())):  # backward runs from the head to the embedding
        if p.grad is not None and _bad(p.grad.numpy()):
            return f"the backward pass: the gradient of {name!r}"
    return None
