"""The on-the-edge efficiency model against properties derived by hand (see lab/diagnostics/edge.py)."""
import numpy as np
import pytest

from lab.diagnostics.edge import (efficiency_surface, ema_along, gaussian_smooth, local_logsumexp,
                                  plot_surface)


@pytest.fixture(scope="module")
def default():
    return efficiency_surface()


def test_grid_shapes_and_axes(default):
    assert default.e_p.shape == (100, 50) and default.theta[0] == -5 and default.theta[-1] == 5
    np.testing.assert_allclose(default.n[[0, -1]], [10, 1000])
    assert np.allclose(np.diff(np.log(default.n)), np.log(100) / 49)  # log-spaced


def test_efficiency_product_closed_form_and_independent_of_n(default):
    T = default.theta[:, None]
    np.testing.assert_allclose(default.e_p, np.broadcast_to(1 + 0.01 * T ** 2 / (1 + T ** 2), default.e_p.shape),
                               rtol=1e-12)
    assert default.e_p.min() >= 1.0 and default.e_p.max() < 1.01
    assert np.abs(default.slope).max() < 1e-12  # dE_p/dlog n = 0, so the smoothed slope too


def test_fisher_floor_changes_the_closed_form():
    r = efficiency_surface(eps=0.5)  # I = max(1/(1+theta^2), 0.5): the floor binds for |theta| > 1
    T = r.theta[:, None]
    inside = np.abs(r.theta) <= 1
    np.testing.assert_allclose(r.e_p[inside], (1 + 0.01 * T ** 2 / (1 + T ** 2))[inside] * np.ones(50), rtol=1e-12)
    np.testing.assert_allclose(r.e_p[~inside], np.broadcast_to(1 + 0.01 * T ** 2 * 0.5, r.e_p.shape)[~inside], rtol=1e-12)


def test_envelope_bounds(default):
    E, Emax = default.e_p, default.e_max
    for i in range(len(default.theta)):  # E_max >= the local maximum; <= local max + log(cells)/tau
        lo, hi = max(0, i - 2), min(len(default.theta), i + 3)
        local = E[lo:hi].max(axis=0)
        assert (Emax[i] >= local - 1e-12).all()
        assert (Emax[i] <= local + np.log(hi - lo) / 20 + 1e-12).all()


def test_default_grid_has_no_edge_band_and_no_flat_region(default):
    # E_max >= 1 + log(3)/tau = 1.0549 > 1 + delta everywhere, so the band is empty
    assert default.e_max.min() >= 1 + np.log(3) / 20 - 1e-12
    assert not default.edge_band.any() and default.summary["edge_band_fraction"] == 0
    # lambda_H H alone has |d/dtheta| = 0.5 |2 theta / (1 + theta^2)| / ... far above eta on most cells
    assert not default.flat and default.flat_p25 > 100 * default.params.eta


def test_edge_band_appears_when_the_envelope_is_tight():
    r = efficiency_surface(tau=1e4, delta=0.02)  # a near-max envelope: E_max ~ E_p in [1, 1.01)
    assert r.edge_band.all()


def test_objective_matches_its_definition_and_is_symmetric(default):
    p = default.params
    softplus = np.log1p(np.exp(1 - p.delta - default.e_p))
    J = (default.psi + p.lambda_h * default.entropy - p.lambda_e * (default.e_p - 1) ** 2
         - p.lambda_s * default.slope ** 2 - p.mu * softplus ** 2)
    np.testing.assert_allclose(default.j, J, rtol=1e-12)
    np.testing.assert_allclose(default.j, default.j[::-1], atol=1e-12)  # every term is even in theta
    assert abs(default.summary["theta_at_j_max"]) < 0.06


def test_helpers_against_direct_formulas():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3))
    lse = local_logsumexp(x, 5.0, 1)
    np.testing.assert_allclose(lse[3], np.log(np.exp(5 * x[2:5]).sum(0)) / 5)
    np.testing.assert_allclose(lse[0], np.log(np.exp(5 * x[0:2]).sum(0)) / 5)
    const = np.ones((20, 2))
    np.testing.assert_allclose(gaussian_smooth(const, 3.0), const)  # weights sum to 1, reflect keeps constants
    ramp = np.arange(20.0)[:, None] * np.ones((1, 2))
    np.testing.assert_allclose(gaussian_smooth(ramp, 2.0)[8:12], ramp[8:12], atol=1e-9)  # linear: unchanged inside
    s = ema_along(x, 0.6, axis=0)
    ref = [x[0]]
    for row in x[1:]:
        ref.append(0.6 * ref[-1] + 0.4 * row)
    np.testing.assert_allclose(s, np.array(ref))


def test_figure_has_four_panels(default, tmp_path):
    fig = plot_surface(default, tmp_path / "edge.png")
    assert len(fig.axes) >= 4 and (tmp_path / "edge.png").stat().st_size > 10_000
