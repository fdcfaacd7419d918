"""wat_nb.overshoot from the outside: both factor measures on freshly rendered shapes with known factors, the real
targets' summaries in the order of their style shift, and bad input."""
import numpy as np
import pytest
from matplotlib.colors import hsv_to_rgb

from wat_nb.data import HUES, SHAPES
from wat_nb.overshoot import (hue_offset, outline_classifier, outlined, overshoot_summary, render_with_factors,
                              true_source_classes)

HUE_OF = np.array(list(HUES.values()))
RING = SHAPES.index("ring")


@pytest.fixture(scope="module")
def clf16():
    return outline_classifier(16)   # cached under the data root after its first training


@pytest.mark.parametrize("shift", [0.0, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("size", [16, 32])
def test_hue_offset_on_rendered(shift, size):
    r = render_with_factors(range(32), 6, shift, size=size, seed=[21, int(10 * shift)])
    d = hue_offset(r["images"], HUE_OF[r["classes"] % 4])
    err = np.abs(d - 0.2 * shift)
    assert not np.isnan(d).any()
    assert np.median(err) < 0.02, np.median(err)
    assert abs(d.mean() - 0.2 * shift) < 0.01, d.mean()


def test_hue_offset_is_signed_and_wraps():
    def solid(h):   # one flat colour, (1, 8, 8, 3)
        return np.tile(np.round(255 * hsv_to_rgb([h, 0.7, 0.9])).astype(np.uint8), (1, 8, 8, 1))
    assert hue_offset(solid(0.30), 0.25)[0] == pytest.approx(0.05, abs=0.01)
    assert hue_offset(solid(0.20), 0.25)[0] == pytest.approx(-0.05, abs=0.01)
    assert hue_offset(solid(0.95), 0.05)[0] == pytest.approx(-0.10, abs=0.01)
    assert hue_offset(solid(0.05), 0.95)[0] == pytest.approx(0.10, abs=0.01)
    d = hue_offset(np.concatenate([solid(h) for h in np.linspace(0, 1, 13)[:-1]]), 0.5)
    assert ((d > -0.5) & (d <= 0.5)).all()


@pytest.mark.parametrize("shift", [0.2, 0.5, 0.7, 0.9])
def test_outlined_on_rendered(shift, clf16):
    r = render_with_factors(range(32), 6, shift, seed=[22, int(10 * shift)])
    p = outlined(r["images"], clf16)
    assert p.dtype == bool and p.shape == (len(r["images"]),)
    right = p == r["outlined"]
    assert right[r["classes"] // 4 != RING].mean() >= 0.97   # an outlined ring shows no hole: the known miss
    assert (~outlined(r["filled"], clf16)).mean() >= 0.97     # the same scenes with every shape filled


def test_true_source_classes():
    src = true_source_classes("shapes-far")
    assert len(src) == 10 and len(set(src)) == 10 and all(0 <= c < 32 for c in src)
    past = render_with_factors(src, 2, 0.9, seed=23)   # rendered from the true sources: hue offset 0.18 by construction
    assert np.median(hue_offset(past["images"], HUE_OF[np.asarray(src)[past["labels"]] % 4])) == pytest.approx(0.18, abs=0.02)


def test_real_targets_in_order_of_shift(clf16):
    rows = {name: overshoot_summary(None, None, name, classifier=clf16)["real"]
            for name in ("shapes-near", "shapes-mid", "shapes-far")}
    hue = [r["hue_offset"] for r in rows.values()]
    out = [r["outlined"] for r in rows.values()]
    assert hue[0] < hue[1] < hue[2]
    assert out[0] < out[1] < out[2]
    assert hue == pytest.approx([0.04, 0.10, 0.18], abs=0.01)
    assert out[0] < 0.02 and 0.1 < out[1] < 0.25 and out[2] > 0.8
    assert all(r["n"] == 1000 and r["split"] == "test" for r in rows.values())


def test_summary_sets_samples_beside_real(clf16):
    src = true_source_classes("shapes-near")
    same = render_with_factors(src, 10, 0.2, seed=24)     # as far as the target: no overshoot
    past = render_with_factors(src, 10, 0.7, seed=24)     # much further: hue turned past, outlines the target lacks
    at = overshoot_summary(same["images"], same["labels"], "shapes-near", classifier=clf16)
    beyond = overshoot_summary(past["images"], past["labels"], "shapes-near", classifier=clf16)
    assert at["samples"]["n"] == 100 and at["real"]["n"] == 1000
    assert at["samples"]["hue_offset"] == pytest.approx(at["real"]["hue_offset"], abs=0.01)
    assert beyond["samples"]["hue_offset"] > beyond["real"]["hue_offset"] + 0.08
    assert beyond["samples"]["outlined"] > beyond["real"]["outlined"] + 0.3


def test_bad_input_raises(clf16):
    x = render_with_factors([0, 1], 2, 0.0, seed=25)["images"]   # uint8 (4, 16, 16, 3)
    bad = {"float": x.astype(np.float32) / 255, "channels first": np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
           "no batch": x[0], "list": x.tolist()}
    for what, b in bad.items():
        for f in (lambda b: hue_offset(b, 0.0), lambda b: outlined(b, clf16)):
            with pytest.raises(ValueError, match=r"uint8 numpy array \(N, H, W, 3\)"):
                f(b)
    with pytest.raises(ValueError, match="one per image"):
        hue_offset(x, [0.0, 0.5])
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        overshoot_summary(x, [0, 1, 2], "shapes-near", classifier=clf16)
    with pytest.raises(ValueError, match="class ids 0..9"):
        overshoot_summary(x, [0, 1, 2, 10], "shapes-near", classifier=clf16)
    with pytest.raises(ValueError, match="records no source classes"):
        true_source_classes("digits")
