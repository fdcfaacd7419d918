"Checks of the W2-along-the-forward-trajectory estimators (wat_nb.trajectory) against Gaussian closed forms."
import numpy as np
import ot
import pytest
import torch

from wat_nb.gaussian import ddpm_alpha_bar, gaussian_w2_path, random_spd
from wat_nb.trajectory import per_class_w2_curves, timestep_grid, trajectory_w2

ABAR = ddpm_alpha_bar()


@pytest.fixture(scope='module')
def gaussians():
    d = 3
    rng = np.random.default_rng(11)
    m0, m1 = rng.normal(size=d), rng.normal(size=d) - 1
    S0, S1 = random_spd(d, cond=4, rng=3), random_spd(d, cond=8, scale=3, rng=4)
    x = np.random.default_rng(1).multivariate_normal(m0, S0, size=30000)
    y = np.random.default_rng(2).multivariate_normal(m1, S1, size=30000)
    return x, y, (m0, S0, m1, S1)


def test_bures_matches_closed_form(gaussians):
    x, y, params = gaussians
    ts = timestep_grid(12)
    ref = np.asarray(gaussian_w2_path(*params, ABAR[ts]))
    est = trajectory_w2(x, y, ts, method='bures', squared=True)
    np.testing.assert_allclose(est, ref, atol=0.03 * ref[0])
    np.testing.assert_allclose(trajectory_w2(x, y, ts, method='bures'), np.sqrt(est))
    assert np.all(np.diff(est) <= 1e-12)  # Theorem 2


def test_exact_converges_and_sliced_is_lower_bound(gaussians):
    x, y, params = gaussians
    ts = timestep_grid(6)
    ref = np.asarray(gaussian_w2_path(*params, ABAR[ts]))
    err = [np.mean([np.abs(trajectory_w2(x, y, ts, n=n, seed=s, squared=True) - ref).mean() for s in range(4)])
           for n in (16, 400)]
    assert err[1] < 0.6 * err[0] and err[1] < 0.08 * ref[0]
    for seed in range(3):
        ex = trajectory_w2(x, y, ts, n=200, seed=seed)
        sl = trajectory_w2(x, y, ts, n=200, seed=seed, method='sliced', n_projections=400)
        assert np.all(sl <= 1.05 * ex + 1e-3)


def test_monotone_decrease_for_gaussian_data(gaussians):
    x, y, _ = gaussians
    ts = timestep_grid(30)
    for method in ['exact', 'sliced', 'bures']:
        w = trajectory_w2(x[:400], y[:400], ts, method=method, squared=True)
        assert np.all(np.diff(w) <= 0.02 * w[0]), method
        assert w[-1] < 0.02 * w[0], method


def test_shared_noise_removes_the_noise_floor_in_high_dimension():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 512)), rng.normal(size=(64, 512)) + 0.5
    ts = np.array([0, 999])
    shared = trajectory_w2(x, y, ts)
    indep = trajectory_w2(x, y, ts, shared_noise=False)
    assert shared[1] < 0.05 * shared[0]  # the marginals coincide at t = T-1
    assert indep[1] > 0.5 * np.sqrt(2 * 512)  # two independent noise clouds sit ~sqrt(2d) apart


def test_batched_cost_equals_direct_noising():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(25, 5)), rng.normal(size=(25, 5)) + 2
    r = np.random.default_rng(9)
    r.choice(25, 25, replace=False), r.choice(25, 25, replace=False)
    e = r.standard_normal((25, 5))
    for t in [0, 137, 640, 999]:
        a = ABAR[t]
        direct = ot.emd2([], [], ot.dist(np.sqrt(a) * x + np.sqrt(1 - a) * e, np.sqrt(a) * y + np.sqrt(1 - a) * e))
        assert trajectory_w2(x, y, [t], seed=9, squared=True)[0] == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_torch_input_and_images():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, 4, 4, generator=g), torch.randn(40, 3, 4, 4, generator=g) + 0.3
    ts = timestep_grid(5)
    a = trajectory_w2(x, y, ts)
    b = trajectory_w2(x.numpy().reshape(30, -1), y.numpy().reshape(40, -1), ts)
    np.testing.assert_allclose(a, b)
    assert trajectory_w2(x, y, ts, method='bures', cov='diag').shape == (5,)


def test_per_class_curves():
    rng = np.random.default_rng(0)
    src = [rng.normal(size=(20, 3)) + 4 * c for c in range(5)]
    tgt = [rng.normal(size=(15, 3)) + 4 * c for c in [4, 1, 0]]
    ts = timestep_grid(4)
    good = per_class_w2_curves(src, tgt, [4, 1, 0], ts, progress=False)
    ident = per_class_w2_curves(src, tgt, None, ts, progress=False)
    np.testing.assert_allclose(ident, per_class_w2_curves(src, tgt, [0, 1, 2], ts, progress=False))
    np.testing.assert_allclose(good[1], ident[1])  # class 1 is matched to itself either way
    assert good[0, 0] < ident[0, 0] and good[2, 0] < ident[2, 0]
    bures = per_class_w2_curves(src, tgt, [4, 1, 0], ts, method='bures', progress=False)
    assert bures.shape == (3, 4)


def test_bad_inputs():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match='unknown method'):
        trajectory_w2(x, x, method='sinkhorn')
    with pytest.raises(ValueError, match='dimension'):
        trajectory_w2(x, np.zeros((10, 4)))
    with pytest.raises(ValueError, match='n must'):
        trajectory_w2(x, x, n=11)
    with pytest.raises(ValueError, match="cov must"):
        trajectory_w2(x, x + 1, method='bures', cov='banded')
    with pytest.raises(ValueError, match='num must'):
        timestep_grid(0)
    with pytest.raises(ValueError, match='matches'):
        per_class_w2_curves([x], [x, x], [0])
