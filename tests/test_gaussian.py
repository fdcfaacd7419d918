"""Theorem 2 and the VP contraction as property tests over random Gaussian pairs."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from wat_nb.gaussian import (bures_w2_sq, check_gaussian, ddpm_alpha_bar, gaussian_w2_path, random_spd,
                             theorem2_check, theorem2_report, vp_marginal)

ABAR = ddpm_alpha_bar()


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.integers(1, 64), log_cond=st.floats(0, 8), scale=st.floats(0.05, 20),
       mean_scale=st.floats(0, 5), seed=st.integers(0, 2**31 - 1))
def test_theorem2_never_increases(d, log_cond, scale, mean_scale, seed):
    rng = np.random.default_rng(seed)
    m0, m1 = mean_scale * rng.normal(size=(2, d))
    S0 = random_spd(d, 10 ** log_cond, rng=rng)
    S1 = random_spd(d, 10 ** rng.uniform(0, log_cond), scale=scale, rng=rng)
    rep = theorem2_check(m0, S0, m1, S1, ABAR, tol=1e-9)
    assert rep["ok"], rep


def test_report_flags_an_increase():
    # The check must be able to fail: feed it a curve that rises between two steps.
    w = np.linspace(2.0, 0.0, 10); w[4] = w[3] + 0.5
    rep = theorem2_report(w, np.linspace(1.0, 0.1, 10))
    assert rep["max_increase"] == pytest.approx(0.5) and rep["at_step"] == 4


def test_contraction_bound_is_tight_for_means_only():
    # Equal covariances I: W2^2(t) = abar_t |dmu|^2 exactly, so the contraction holds with equality.
    d = 4
    w = gaussian_w2_path(np.zeros(d), np.eye(d), np.ones(d), np.eye(d), ABAR)
    np.testing.assert_allclose(w, ABAR * d, rtol=1e-10)


def test_commuting_covariances_match_per_eigenvalue_formula():
    for seed in range(5):
        S0, lam0, Q = random_spd(16, 1e6, rng=seed, return_eig=True)
        lam1 = np.random.default_rng(seed + 100).uniform(1e-6, 4, 16)
        got = bures_w2_sq(np.zeros(16), S0, np.zeros(16), (Q * lam1) @ Q.T)
        np.testing.assert_allclose(got, np.sum((np.sqrt(lam0) - np.sqrt(lam1)) ** 2), rtol=1e-7, atol=1e-9)


def test_path_on_torch_matches_numpy_and_batches_over_t():
    S0, S1 = random_spd(8, 100, rng=1), random_spd(8, 100, rng=2)
    m0, m1 = np.zeros(8), np.ones(8)
    wn = gaussian_w2_path(m0, S0, m1, S1, ABAR)
    wt = gaussian_w2_path(*map(torch.tensor, (m0, S0, m1, S1)), torch.tensor(ABAR))
    assert wn.shape == (1000,) and torch.is_tensor(wt)
    np.testing.assert_allclose(wt.numpy(), wn, rtol=1e-9, atol=1e-12)
    mt, St = vp_marginal(torch.tensor(m0), torch.tensor(S0), torch.tensor(ABAR[:3]))
    assert mt.shape == (3, 8) and St.shape == (3, 8, 8)


@pytest.mark.parametrize("mean,cov,msg", [
    (np.zeros(2), -np.eye(2), "positive semi-definite"),
    (np.zeros(2), np.array([[1.0, 1.0], [0.0, 1.0]]), "not symmetric"),
    (np.zeros(3), np.eye(2), "mean has shape"),
    (np.zeros(2), np.full((2, 2), np.nan), "finite"),
])
def test_bad_gaussians_fail_clearly(mean, cov, msg):
    with pytest.raises(ValueError, match=msg):
        check_gaussian(mean, cov)
    with pytest.raises(ValueError, match=msg):
        gaussian_w2_path(mean, cov, np.zeros(2), np.eye(2), ABAR)


def test_random_spd_rejects_bad_dimension():
    with pytest.raises(ValueError, match="dimension must be positive"):
        random_spd(0)


def _oracle_w2_sq(m0, S0, m1, S1) -> float:
    "W2^2 of two Gaussians from scipy's general matrix square root: |m0 - m1|^2 + tr(S0 + S1 - 2 (S0^1/2 S1 S0^1/2)^1/2)."
    from scipy.linalg import sqrtm
    r0 = sqrtm(S0)
    cross = sqrtm(r0 @ S1 @ r0)
    return float(np.sum((m0 - m1) ** 2) + np.trace(S0 + S1 - 2 * np.real(cross)))


@pytest.mark.parametrize("d, seed", [(2, 0), (5, 1), (16, 2), (40, 3)])
def test_bures_matches_an_independent_oracle_on_non_commuting_covariances(d, seed):
    rng = np.random.default_rng(seed)
    m0, m1 = rng.normal(size=(2, d))
    S0, S1 = random_spd(d, 50.0, rng=rng), random_spd(d, 20.0, scale=3.0, rng=rng)
    assert np.abs(S0 @ S1 - S1 @ S0).max() > 1e-2 * np.abs(S0 @ S1).max()   # they do not commute
    want = _oracle_w2_sq(m0, S0, m1, S1)
    got = float(bures_w2_sq(torch.as_tensor(m0), torch.as_tensor(S0), torch.as_tensor(m1), torch.as_tensor(S1)))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-8)
    # the commuting-only shortcut tr(S0^1/2 S1^1/2) gives another number here: the test can tell them apart
    from scipy.linalg import sqrtm
    shortcut = float(np.sum((m0 - m1) ** 2) + np.trace(S0 + S1 - 2 * np.real(sqrtm(S0) @ sqrtm(S1))))
    assert abs(shortcut - want) > 1e-3 * abs(want)
