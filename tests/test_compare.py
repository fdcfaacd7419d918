"Paired bootstrap comparison of two sample sets (wat_nb.compare), on small synthetic features."
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from wat_nb.compare import (Comparison, compare_sets, fid, fmt_diff, fmt_score, kid, paired_bootstrap, paired_indices,
                            real_floor, replicates, share)
from wat_nb.metrics import fid_from_features, kid_from_features


def feats(n, d, seed, loc=0.0):
    "n rows of d correlated, non-negative features; one correlation per d, so equal `loc` means one distribution."
    mix = np.random.default_rng(777 + d).normal(size=(d, d)) / np.sqrt(d)
    return np.abs(np.random.default_rng(seed).normal(loc, 1.0, (n, d)) @ mix + 0.3)


def t32(x): return torch.tensor(x).float()


@pytest.mark.parametrize("stat", [kid, fid])
def test_identical_sets_are_a_tie(stat):
    a, r = feats(80, 16, 0), feats(120, 16, 1, loc=0.2)
    c = paired_bootstrap(stat, a, a.copy(), r, n_boot=100)
    assert (c.estimate, c.lo, c.hi, c.verdict()) == (0.0, 0.0, 0.0, "tie")


@pytest.mark.parametrize("stat", [kid, fid])
def test_a_mean_shift_is_found_with_its_sign(stat):
    a, r = feats(100, 16, 2), feats(150, 16, 3)
    b = a + 0.5
    c = paired_bootstrap(stat, t32(a), t32(b), t32(r), n_boot=150)  # tensors in, as extract_features returns them
    assert c.estimate < 0 and c.hi < 0 and c.verdict() == "a"
    assert paired_bootstrap(stat, b, a, r, n_boot=150).verdict() == "b"


def test_share_higher_is_better():
    g = np.random.default_rng(4)
    good = g.random(200) < 0.9
    bad = good & (g.random(200) < 0.5)
    c = paired_bootstrap(share, good, bad, n_boot=400)
    assert c.estimate > 0 and c.verdict(lower_is_better=False) == "a" and c.verdict() == "b"


def test_kid_is_torch_fidelity_kid_on_all_rows():
    x, y = feats(70, 24, 5), feats(70, 24, 6, loc=0.3)
    mean, std = kid_from_features(t32(x), t32(y), subsets=3, subset_size=70)  # each subset: all rows
    assert std < 1e-5 and kid(x, y) == pytest.approx(mean, rel=1e-4)


@pytest.mark.parametrize("n,r,d", [(60, 90, 32), (150, 200, 8), (30, 20, 12)])
def test_fid_is_torch_fidelity_fid(n, r, d):
    x, y = feats(n, d, 7), feats(r, d, 8, loc=0.2)
    assert fid(x, y) == pytest.approx(fid_from_features(t32(x), t32(y)), rel=1e-3)


def test_replicates_are_the_statistics_of_resampled_rows():
    a, r = feats(40, 16, 9), feats(60, 16, 10, loc=0.2)
    b = a + np.random.default_rng(11).normal(0, 0.3, a.shape)
    idx, ridx = paired_indices(40, 5, seed=1, n_real=60)
    want = [fid_from_features(t32(a[i]), t32(r[j])) - fid_from_features(t32(b[i]), t32(r[j])) for i, j in zip(idx, ridx)]
    assert replicates(fid, a, b, r, idx, ridx) == pytest.approx(want, rel=1e-3, abs=1e-4)

    def kid_distinct(x, i, j):  # unbiased MMD^2 of the resampled rows, over pairs of distinct original samples
        k = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3
        return (k(x[i], x[i])[i[:, None] != i].mean() + k(r[j], r[j])[j[:, None] != j].mean()
                - 2 * k(x[i], r[j]).mean())
    want = [kid_distinct(a, i, j) - kid_distinct(b, i, j) for i, j in zip(idx, ridx)]
    assert np.allclose(replicates(kid, a, b, r, idx, ridx), want, rtol=0, atol=1e-6)


scores = st.lists(st.floats(0, 1, allow_nan=False), min_size=4, max_size=60)


@settings(max_examples=30, deadline=None)
@given(scores, st.integers(0, 2 ** 16))
def test_swapping_the_sets_mirrors_the_comparison(xs, seed):
    x = np.array(xs)
    y = np.random.default_rng(seed).random(len(x)) < 0.5
    ab, ba = paired_bootstrap(share, x, y, n_boot=200, seed=seed), paired_bootstrap(share, y, x, n_boot=200, seed=seed)
    assert ba.estimate == pytest.approx(-ab.estimate, abs=1e-12)
    assert (ba.lo, ba.hi) == pytest.approx((-ab.hi, -ab.lo), abs=1e-12)
    assert ba.verdict() == {"a": "b", "b": "a", "tie": "tie"}[ab.verdict()]
    # the batched share is the mean of the resampled rows, as any statistic given as a plain function
    plain = paired_bootstrap(lambda z, _: float(np.mean(z)), x, y, n_boot=200, seed=seed)
    assert (plain.lo, plain.hi, plain.estimate) == pytest.approx((ab.lo, ab.hi, ab.estimate), abs=1e-12)


def test_two_draws_of_one_distribution_are_mostly_ties():
    ties = sum(paired_bootstrap(kid, feats(50, 8, 3 * k), feats(50, 8, 3 * k + 1), feats(80, 8, 3 * k + 2),
                                n_boot=150, seed=k).verdict() == "tie" for k in range(12))
    assert ties >= 10


def test_compare_sets_gives_a_table_row():
    a, r = feats(100, 12, 12), feats(150, 12, 13)
    ok = np.random.default_rng(14).random(100) < 0.8
    res = compare_sets(a, a + 0.5, r, ok, ok, n_boot=100)
    assert list(res) == ["fid", "kid", "recognition"]
    assert [res[m]["verdict"] for m in res] == ["a", "a", "tie"]
    for d in res.values():
        assert d["lo"] <= d["estimate"] <= d["hi"] and d["n"] == 100 and d["n_boot"] == 100
        assert d["estimate"] == pytest.approx(d["a"] - d["b"], abs=1e-9)
    assert fmt_score(res["fid"], "a").startswith("**") and not fmt_score(res["fid"], "b").startswith("**")
    assert "**" not in fmt_score(res["recognition"], "a") + fmt_score(res["recognition"], "b")  # a tie is never bold
    assert fmt_diff(Comparison(-1.234, -2.1, -0.4, 10, 10, 0.95, 0.0)) == "-1.23 [-2.10, -0.40]"
    assert compare_sets(a, a + 0.5, r, n_boot=20, fid_boot=5, metrics=["fid"])["fid"]["n_boot"] == 5


def test_real_floor():
    train, test = feats(300, 8, 15), feats(200, 8, 16)
    mean, sd = real_floor(train, test, 60, fid, reps=4, seed=1)
    assert sd > 0 and fid(feats(60, 8, 17, loc=1.0), test) > mean + 5 * sd
    assert real_floor(train, test, 60, fid, reps=4, seed=1) == (mean, sd)


def test_bad_input():
    a, r = feats(20, 4, 18), feats(30, 4, 19)
    with pytest.raises(ValueError, match="paired rows"): paired_bootstrap(fid, a, a[:-1], r)
    with pytest.raises(ValueError, match="pass real"): paired_bootstrap(kid, a, a)
    with pytest.raises(ValueError, match="level"): paired_bootstrap(share, a[:, 0], a[:, 0], level=95)
    with pytest.raises(ValueError, match=r"scores \(N,\)"): paired_bootstrap(share, a, a)
    with pytest.raises(ValueError, match="both sets"): compare_sets(a, a, r, correct_a=np.ones(20))
    with pytest.raises(ValueError, match="reps >= 2"): real_floor(a, r, 10, reps=1)
