"""The on-the-edge efficiency model: how close an estimator sits to the Cramer-Rao limit over a grid of parameter
values theta and sample sizes n, and the objective that rewards sitting on that edge.

On the grid (theta along axis 0, n along axis 1, n log-spaced):
    I = max(1 / (1 + theta^2), eps)                 Fisher information
    H = -log(1 + theta^2)                           entropy term
    Cov = 1 / (n I) + (0.1 theta / sqrt(n))^2       estimator covariance: the CR bound plus a bias-like excess
    E_p = n I Cov                                   efficiency product (1 on the Cramer-Rao edge)
    E_max = (1/tau) log sum_{|k| <= 2} exp(tau E_p[theta + k])    smoothed upper envelope along theta
    V = exp(-alpha (E_p - 1)^2) sigmoid(10 (E_p - 1 + delta))     variance constraint
    B = 1 / (sqrt(n) sqrt(I))                       Cramer-Rao bound on the standard deviation
    Psi = Gaussian smoothing of H B V along theta (reflect padding, sigma = 1.06 span / n_theta^0.2)
    S = EMA along n (beta) of dE_p / dlog n
    J = Psi + lambda_H H - lambda_E (E_p - 1)^2 - lambda_S S^2 - mu softplus(1 - delta - E_p)^2
    edge band = cells with 1 - delta <= E_max <= 1 + delta;  flat region: the 25th percentile of |dJ/dtheta| < eta

Consequences one can check by hand: while I is above its floor, E_p = 1 + 0.01 theta^2 / (1 + theta^2) for every n,
so E_p lies in [1, 1.01) and S = 0; and since a log-sum-exp over k cells is at least the largest term plus
log(k)/tau, E_max >= 1 + log(3)/tau everywhere (3 cells at the ends of the theta axis), above 1 + delta for the
defaults (tau = 20, delta = 0.01): the default grid has no cell in the edge band.
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class EdgeParams:
    theta_min: float = -5.0
    theta_max: float = 5.0
    n_min: float = 10.0
    n_max: float = 1000.0
    n_theta: int = 100
    n_n: int = 50
    delta: float = 0.01
    tau: float = 20.0
    alpha: float = 10.0
    lambda_h: float = 0.5
    lambda_e: float = 0.5
    lambda_s: float = 0.5
    mu: float = 0.5
    eta: float = 1e-4
    eps: float = 1e-6
    beta: float = 0.6
    window: int = 2          # E_max: +- this many theta cells


@dataclass
class EdgeResult:
    params: EdgeParams
    theta: np.ndarray        # (n_theta,)
    n: np.ndarray            # (n_n,)
    fisher: np.ndarray       # every grid below is (n_theta, n_n)
    entropy: np.ndarray
    cov: np.ndarray
    e_p: np.ndarray
    e_max: np.ndarray
    v: np.ndarray
    bound: np.ndarray
    psi: np.ndarray
    slope: np.ndarray        # S: EMA-smoothed dE_p / dlog n
    j: np.ndarray
    edge_band: np.ndarray    # bool
    dj_dtheta: np.ndarray
    flat_p25: float          # 25th percentile of |dJ/dtheta|
    flat: bool
    summary: dict = field(default_factory=dict)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _softplus(x):
    return np.logaddexp(0.0, x)


def local_logsumexp(x, tau, window):
    """(1/tau) log sum over theta cells within +-window of exp(tau x), truncated at the ends of the axis."""
    n = x.shape[0]
    offsets = np.arange(-window, window + 1)
    idx = np.arange(n)[:, None] + offsets[None, :]                       # (n_theta, 2w+1)
    valid = (idx >= 0) & (idx < n)
    vals = np.where(valid[:, :, None], x[np.clip(idx, 0, n - 1)], -np.inf)  # (n_theta, 2w+1, n_n)
    m = vals.max(axis=1)
    return m + np.log(np.exp(tau * (vals - m[:, None, :])).sum(axis=1)) / tau


def gaussian_smooth(x, sigma_cells):
    """Gaussian smoothing along axis 0 with reflect padding (numpy's 'reflect': d c b | a b c d)."""
    radius = int(np.ceil(3 * sigma_cells))
    k = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (k / sigma_cells) ** 2)
    w /= w.sum()
    padded = np.pad(x, ((radius, radius), (0, 0)), mode="reflect")      # reflects repeatedly if radius > n
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=0)  # (n_theta, n_n, 2r+1)
    return windows @ w


def ema_along(x, beta, axis=1):
    """s_0 = x_0, s_j = beta s_{j-1} + (1 - beta) x_j along `axis`, as one matrix product (no loop)."""
    n = x.shape[axis]
    j, k = np.arange(n)[:, None], np.arange(n)[None, :]
    weights = np.where(k <= j, (1 - beta) * beta ** np.maximum(j - k, 0), 0.0)
    weights[:, 0] = beta ** np.arange(n)                                  # the first value starts the average
    return np.moveaxis(np.moveaxis(x, axis, -1) @ weights.T, -1, axis)


def efficiency_surface(p=None, **overrides):
    """Compute the whole model on the grid. Keyword overrides change EdgeParams fields."""
    p = p or EdgeParams(**overrides)
    theta = np.linspace(p.theta_min, p.theta_max, p.n_theta)
    n = np.logspace(np.log10(p.n_min), np.log10(p.n_max), p.n_n)
    T, N = theta[:, None], n[None, :]
    fisher = np.maximum(1.0 / (1.0 + T ** 2), p.eps) * np.ones_like(N)
    entropy = -np.log(1.0 + T ** 2) * np.ones_like(N)
    cov = 1.0 / (N * fisher) + (0.1 * T / np.sqrt(N)) ** 2
    e_p = N * fisher * cov
    e_max = local_logsumexp(e_p, p.tau, p.window)
    v = np.exp(-p.alpha * (e_p - 1.0) ** 2) * _sigmoid(10.0 * (e_p - 1.0 + p.delta))
    bound = 1.0 / (np.sqrt(N) * np.sqrt(fisher))
    span = p.theta_max - p.theta_min
    sigma = 1.06 * span / p.n_theta ** 0.2                                # in theta units
    psi = gaussian_smooth(entropy * bound * v, sigma / (span / (p.n_theta - 1)))
    slope = ema_along(np.gradient(e_p, np.log(n), axis=1), p.beta, axis=1)
    j = (psi + p.lambda_h * entropy - p.lambda_e * (e_p - 1.0) ** 2 - p.lambda_s * slope ** 2
         - p.mu * _softplus(1.0 - p.delta - e_p) ** 2)
    edge = (e_max >= 1.0 - p.delta) & (e_max <= 1.0 + p.delta)
    dj = np.gradient(j, theta, axis=0)
    p25 = float(np.percentile(np.abs(dj), 25))
    result = EdgeResult(p, theta, n, fisher, entropy, cov, e_p, e_max, v, bound, psi, slope, j, edge, dj, p25,
                        p25 < p.eta)
    result.summary = {
        "edge_band_fraction": float(edge.mean()), "flat_region": result.flat, "flat_p25": p25,
        "e_p_range": (float(e_p.min()), float(e_p.max())), "e_max_min": float(e_max.min()),
        "j_max": float(j.max()), "theta_at_j_max": float(theta[np.unravel_index(j.argmax(), j.shape)[0]]),
    }
    return result


def plot_surface(result, path=None):
    """A 2 x 2 figure: E_p, Psi, J and the edge band over (log n, theta). Returns the matplotlib Figure."""
    import matplotlib
    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    extent = [np.log10(result.n[0]), np.log10(result.n[-1]), result.theta[0], result.theta[-1]]
    panels = [("efficiency product $E_p$", result.e_p, "viridis"), ("$\\Psi$ (smoothed $H B V$)", result.psi, "magma"),
              ("objective $J$", result.j, "cividis"), ("edge band $|E_{max} - 1| \\leq \\delta$", result.edge_band, "Greens")]
    for ax, (title, grid, cmap) in zip(axes.flat, panels):
        limits = {"vmin": 0.0, "vmax": 1.0} if grid.dtype == bool else {}  # a band: empty must look empty
        im = ax.imshow(grid.astype(float), origin="lower", aspect="auto", extent=extent, cmap=cmap, **limits)
        ax.set_title(title)
        ax.set_xlabel("log10 n")
        ax.set_ylabel("theta")
        fig.colorbar(im, ax=ax)
    band = result.summary["edge_band_fraction"]
    fig.suptitle(f"On-the-edge efficiency model: edge band {100 * band:.1f}% of cells, "
                 f"flat region: {'yes' if result.flat else 'no'} (p25 |dJ/dtheta| = {result.flat_p25:.2e})")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
