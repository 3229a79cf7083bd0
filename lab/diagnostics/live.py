"""Diagnostics measured on a live model, during or after training.

- sharpness: the top Hessian eigenvalue by power iteration on Hessian-vector products (central finite
  differences of gradients), against the edge-of-stability threshold 2/lr for SGD; with Adam's preconditioner
  P = diag(sqrt(v_hat) + eps), the top eigenvalue of P^-1/2 H P^-1/2 against (2 + 2 beta1) / ((1 - beta1) lr),
  which is 38/lr for beta1 = 0.9 (Cohen et al., 2022).
- empirical Fisher trace: the mean over examples of the squared per-example gradient norm, per parameter group.
- gradient noise scale B_simple = tr(Sigma) / |G|^2 from gradient norms at two batch sizes (McCandlish et al., 2018):
  E|g_b|^2 = |G|^2 + tr(Sigma) / b.
- efficiency product per parameter group: n x mean(Var(theta iterates over a window) x Fisher diagonal), with n the
  number of training sequences in that window; "edge band %" is the share of groups within 1 +- delta; a
  flat-region flag comes from the loss curve's relative slope.
Each works on plain functions of lab tensors, so it is tested on problems with known answers.
"""
import math
import time
from dataclasses import dataclass, field

import numpy as np



# ------------------------------------------------------------------------------------------------ gradients

def gradients(loss_fn, params):
    """d loss_fn() / d params as float64 numpy arrays (zeros where a parameter gets none). p.grad is restored."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss = loss_fn()
        loss.backward()
        return [p.grad.numpy().astype(np.float64) if p.grad is not None else np.zeros(p.shape) for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _flatten(arrays):
    return np.concatenate([a.reshape(-1) for a in arrays])


def _unflatten(vec, params):
    out, at = [], 0
    for p in params:
        out.append(vec[at:at + p.size].reshape(p.shape))
        at += p.size
    return out


def _shift(params, originals, direction, eps):
    for p, o, d in zip(params, originals, _unflatten(direction, params)):
        p.data = p.backend.from_numpy((o + eps * d).astype(np.float32))


def hessian_vector_product(loss_fn, params, v, eps=1e-3):
    """H v ~ (g(theta + eps v) - g(theta - eps v)) / (2 eps), v flattened over params; params are restored."""
    originals = [p.numpy() for p in params]
    datas = [p.data for p in params]
    try:
        _shift(params, originals, v, eps)
        g_plus = _flatten(gradients(loss_fn, params))
        _shift(params, originals, v, -eps)
        g_minus = _flatten(gradients(loss_fn, params))
    finally:
        for p, d in zip(params, datas):
            p.data = d
    return (g_plus - g_minus) / (2 * eps)


def sharpness(loss_fn, params, iters=20, eps=1e-3, preconditioner=None, seed=0):
    """Top eigenvalue of H (or of P^-1/2 H P^-1/2 with P = diag(preconditioner)) by power iteration."""
    n = sum(p.size for p in params)
    scale = None if preconditioner is None else 1.0 / np.sqrt(_flatten(preconditioner))
    v = np.random.default_rng(seed).standard_normal(n)
    v /= np.linalg.norm(v)
    eig = 0.0
    for _ in range(iters):
        w = v if scale is None else scale * v
        hv = hessian_vector_product(loss_fn, params, w, eps)
        if scale is not None:
            hv = scale * hv
        eig = float(v @ hv)                       # Rayleigh quotient
        norm = np.linalg.norm(hv)
        if norm == 0:
            break
        v = hv / norm
    return eig


def adam_preconditioner(optimizer, params):
    """Adam's diagonal preconditioner sqrt(v_hat) + eps for `params` (which the optimizer must hold)."""
    index = {id(p): i for i, p in enumerate(optimizer.params)}
    t = max(optimizer.step_count, 1)
    out = []
    for p in params:
        v = optimizer.backend.to_numpy(optimizer.v[index[id(p)]]).astype(np.float64)
        out.append(np.sqrt(v / (1 - optimizer.b2 ** t)) + optimizer.eps)
    return out


def edge_of_stability_threshold(lr, optimizer="sgd", beta1=0.9):
    """2/lr for (momentum-free) SGD; (2 + 2 beta1) / ((1 - beta1) lr) for Adam, 38/lr at beta1 = 0.9."""
    if optimizer == "sgd":
        return 2.0 / lr
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


# ------------------------------------------------------------------------------------------------ Fisher, noise

def fisher_trace(example_loss, n_examples, params, groups=None):
    """Empirical Fisher trace: mean_i |d loss_i / d theta|^2, in total and per group ({name: [params]})."""
    groups = groups or {"all": params}
    member = {id(p): name for name, ps in groups.items() for p in ps}
    per_group = {name: 0.0 for name in groups}
    diag = [np.zeros(p.shape) for p in params]
    for i in range(n_examples):
        grads = gradients(lambda: example_loss(i), params)
        for p, g, d in zip(params, grads, diag):
            sq = g * g
            d += sq / n_examples
            if id(p) in member:
                per_group[member[id(p)]] += float(sq.sum()) / n_examples
    return {"total": float(sum(d.sum() for d in diag)), "groups": per_group, "diagonal": diag}


def noise_scale_from_norms(g2_small, b_small, g2_big, b_big):
    """Unbiased |G|^2 and tr(Sigma) from mean squared gradient norms at two batch sizes; B_simple = tr / |G|^2."""
    if b_big <= b_small:
        raise ValueError(f"need b_big > b_small, got {b_small} and {b_big}")
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    tr = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
    # with few batches either estimate can come out negative: then the noise scale is not measurable (nan)
    b_simple = tr / g2 if g2 > 0 and tr > 0 else math.nan
    return {"b_simple": b_simple, "trace_sigma": tr, "grad_norm_sq": g2}


def gradient_noise_scale(batch_grad, b_small, b_big, repeats=2):
    """batch_grad(b) -> flat gradient over a fresh batch of b examples. Averages |g|^2 over `repeats` batches."""
    g2s = np.mean([np.sum(batch_grad(b_small) ** 2) for _ in range(repeats)])
    g2b = np.mean([np.sum(batch_grad(b_big) ** 2) for _ in range(repeats)])
    return noise_scale_from_norms(g2s, b_small, g2b, b_big)


# ------------------------------------------------------------------------------------------------ efficiency

def efficiency_products(snapshots, fisher_diag, n):
    """Per group: n * mean(Var over snapshots x Fisher diagonal). snapshots: {group: (W, k)} arrays of the
    group's sampled elements at W points; fisher_diag: {group: (k,)}."""
    return {g: float(n * np.mean(np.var(s, axis=0) * fisher_diag[g])) for g, s in snapshots.items()}


def flat_region(losses, threshold=1e-3):
    """True when the relative drop of the loss per step over the window is below threshold."""
    losses = np.asarray(losses, dtype=np.float64)
    if len(losses) < 4:
        return False, float("nan")
    half = len(losses) // 2
    first, second = losses[:half].mean(), losses[half:].mean()
    slope = (first - second) / max(abs(first), 1e-12) / half
    return bool(slope < threshold), float(slope)


def recommend(report, delta=0.01):
    """Plain-language advice from a diagnostics report, with the numbers it used."""
    advice = []
    s, thr = report.get("sharpness"), report.get("threshold")
    if s is not None and thr:
        if s > thr:
            advice.append(f"Sharpness {s:.3g} is above the edge-of-stability threshold {thr:.3g}: lower the learning "
                          f"rate (to about {report['lr'] * thr / s:.2g}) or expect unstable, oscillating loss.")
        elif s > 0.5 * thr:
            advice.append(f"Sharpness {s:.3g} is near the threshold {thr:.3g} (training at the edge of stability): "
                          f"keep the learning rate, watch for spikes.")
        else:
            advice.append(f"Sharpness {s:.3g} is well below the threshold {thr:.3g}: a larger learning rate is "
                          f"probably safe.")
    b, batch = report.get("noise_scale"), report.get("batch_size")
    if b is not None and batch and np.isfinite(b) and b > 0:
        if batch < 0.5 * b:
            advice.append(f"The gradient noise scale is about {b:.0f} examples, above the batch of {batch}: a larger "
                          f"batch (up to ~{b:.0f}) would use steps more efficiently.")
        elif batch > 2 * b:
            advice.append(f"The batch of {batch} is well above the noise scale ({b:.0f}): a smaller batch would reach "
                          f"the same loss with less compute.")
        else:
            advice.append(f"The batch of {batch} is close to the gradient noise scale ({b:.0f}): a good choice.")
    eff = report.get("efficiency", {})
    if eff:
        under = [g for g, e in eff.items() if e < 1 - delta]
        over = [g for g, e in eff.items() if e > 1 + delta]
        if len(under) > len(eff) / 2:
            advice.append(f"Most groups are under-efficient (E < {1 - delta:g}: {', '.join(under)}): the model can "
                          f"use more data or more capacity.")
        elif len(over) > len(eff) / 2:
            advice.append(f"Most groups are over-efficient (E > {1 + delta:g}: {', '.join(over)}): iterates wander "
                          f"more than the data supports; add regularization (weight decay, dropout) or lower the "
                          f"learning rate.")
        else:
            advice.append(f"{report.get('edge_band_pct', 0):.0f}% of groups are on the edge band.")
    if report.get("flat"):
        advice.append(f"The loss curve is flat (relative slope {report.get('loss_slope', 0):.2g} per step): "
                      f"decay the learning rate, or stop.")
    return " ".join(advice) if advice else "Not enough measurements yet."


# ------------------------------------------------------------------------------------------------ the monitor

def _role(name):
    """A parameter's group by its module names, GPT-2's (h.0.attn.c_attn, ln_1, wte) or the Llama family's
    (model.layers.0.self_attn.q_proj, input_layernorm, embed_tokens, an untied lm_head: the unembedding)."""
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):
        return "adapters"
    if "attn" in parts or "self_attn" in parts:
        return "attention"
    if "mlp" in parts:
        return "mlp"
    if any(p.startswith("ln_") or p.endswith("norm") for p in parts):
        return "norms"
    if parts[0] in ("wte", "wpe", "lm_head") or "embed_tokens" in parts:
        return "embeddings"
    return "other"


def parameter_groups(model):
    """Coarse groups by role: embeddings, attention, mlp, norms, adapters, other. (Llama's names fell into "other"
    but for its MLP: Fisher traces and efficiency products were reported for groups that did not exist.)"""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(_role(name), []).append(p)
    return groups


@dataclass
class DiagnosticsMonitor:
    """Runs the diagnostics on a Trainer every `every` steps (as a callback) and keeps a history of reports."""
    trainer: object
    every: int = 100
    window: int = 10            # parameter snapshots kept for the iterate variance
    snapshot_every: int = 10
    sample: int = 256           # parameter elements sampled per group
    power_iters: int = 5
    fisher_examples: int = 4
    delta: float = 0.01
    reports: list = field(default_factory=list)
    seconds: float = 0.0        # time spent in diagnostics

    def __post_init__(self):
        model = self.trainer.model
        self.groups = parameter_groups(model)
        rng = np.random.default_rng(0)
        self._pick = {g: [(i, rng.choice(p.size, size=min(p.size, max(1, self.sample // len(ps))), replace=False))
                          for i, p in enumerate(ps)] for g, ps in self.groups.items()}
        self._snaps = {g: [] for g in self.groups}
        self._losses = []
        self.trainer.callbacks.append(self)

    def _sampled(self, group, arrays):
        return np.concatenate([arrays[i].reshape(-1)[idx] for i, idx in self._pick[group]])

    def __call__(self, record):
        t0 = time.perf_counter()
        step = record["step"]
        self._losses = (self._losses + [record["loss"]])[-self.window * 2:]
        if step % self.snapshot_every == 0:
            for g, ps in self.groups.items():
                self._snaps[g] = (self._snaps[g] + [self._sampled(g, [p.numpy() for p in ps])])[-self.window:]
        if step % self.every == 0:
            self.reports.append(self.run(step))
        self.seconds += time.perf_counter() - t0

    def run(self, step=None):
        """One full diagnostics report now. Its gradients go through the model's parameters, so it holds the model
        (nn.in_use): called from the kernel while a panel's thread trains that model, it is refused by name
        instead of mixing its gradients into a step."""
        from ..nn import in_use
        with in_use(self.trainer.model, "DiagnosticsMonitor.run"):
            return self._report(step)

    def _report(self, step):
        from ..data import get_batch
        tr, model = self.trainer, self.trainer.model
        cfg, block = tr.cfg, tr.block_size
        rng = np.random.default_rng(step or 0)
        params = [p for ps in self.groups.values() for p in ps]
        small = max(1, cfg.batch_size // 4)
        x, y = get_batch(tr.train_ids, small, block, rng)
        # the loss alone (return_logits=False: F.linear_cross_entropy's chunks), as the trainer's step takes it: a run
        # that fits only without the whole (B, T, vocab) logits must not hold them here
        loss_fn = lambda: model(x, y, return_logits=False)[1]               # noqa: E731
        was_training = model.training
        model.eval()  # no dropout: the same function at every evaluation
        try:
            lr = tr.optimizer.lr if not tr.history else tr.history[-1]["lr"]
            pre = adam_preconditioner(tr.optimizer, params)
            sharp = sharpness(loss_fn, params, self.power_iters, preconditioner=pre)
            threshold = edge_of_stability_threshold(lr, "adam", tr.optimizer.b1)
            xs, ys = get_batch(tr.train_ids, self.fisher_examples, block, rng)
            fisher = fisher_trace(lambda i: model(xs[i:i + 1], ys[i:i + 1], return_logits=False)[1],
                                  self.fisher_examples, params, self.groups)

            def batch_grad(b):
                bx, by = get_batch(tr.train_ids, b, block, rng)
                return _flatten(gradients(lambda: model(bx, by, return_logits=False)[1], params))
            noise = gradient_noise_scale(batch_grad, small, cfg.batch_size, repeats=1)
        finally:
            model.train(was_training)
        diag_by_param = {id(p): fisher["diagonal"][k] for k, p in enumerate(params)}
        eff = {}
        if all(len(s) >= 3 for s in self._snaps.values()):
            fdiag = {g: self._sampled(g, [diag_by_param[id(p)] for p in ps]) for g, ps in self.groups.items()}
            n = len(self._snaps[next(iter(self._snaps))]) * self.snapshot_every * cfg.batch_size
            eff = efficiency_products({g: np.stack(s) for g, s in self._snaps.items()}, fdiag, n)
        flat, slope = flat_region(self._losses)
        report = {
            "step": step, "lr": lr, "sharpness": sharp, "threshold": threshold, "fisher_trace": fisher["total"],
            "fisher_groups": fisher["groups"], "noise_scale": noise["b_simple"], "batch_size": cfg.batch_size,
            "efficiency": eff,
            "edge_band_pct": 100.0 * np.mean([abs(e - 1) <= self.delta for e in eff.values()]) if eff else 0.0,
            "flat": flat, "loss_slope": slope,
        }
        report["recommendation"] = recommend(report, self.delta)
        return report
