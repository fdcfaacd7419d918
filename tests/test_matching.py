"End-to-end and bad-input checks of the class matching (wat_nb.matching)."
import json

import numpy as np
import ot
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings, strategies as st

from wat_nb.matching import (as_class_list, class_cost_matrix, draw_source_samples, emd2_uniform, group_by_class,
                             load_matching, match_classes, matching_accuracy, matching_label_map, prefilter_sources,
                             save_matching, subsample_class)


def pot_w2_sq(a, b):
    a, b = a.reshape(len(a), -1).double().numpy(), b.reshape(len(b), -1).double().numpy()
    return ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), ot.dist(a, b), numItermax=10**7)


def lsa_total(C):
    r, c = scipy.optimize.linear_sum_assignment(np.asarray(C).T)
    return float(np.asarray(C)[c, r].sum())


class TinyDataset(torch.utils.data.Dataset):
    "A labelled dataset shaped like wat_nb.data's: items (image, label), .targets and .classes."
    def __init__(self, n_per_class=12, classes=('a', 'b', 'c'), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.classes = list(classes)
        self.targets = [c for c in range(len(classes)) for _ in range(n_per_class)]
        self.images = torch.stack([torch.full((3, 4, 4), float(c)) + 0.1 * torch.randn(3, 4, 4, generator=g)
                                   for c in self.targets])
    def __len__(self): return len(self.targets)
    def __getitem__(self, i): return self.images[i], self.targets[i]


def test_exact_cost_matrix_equals_pot_on_ragged_classes():
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(m, 2, 3, 3, generator=g) + i for i, m in enumerate([10, 7, 3, 10])]
    tgt = [torch.randn(n, 2, 3, 3, generator=g) - j for j, n in enumerate([50, 13, 1, 29, 60])]
    C2 = class_cost_matrix(src, tgt, squared=True, progress=False)
    ref = np.array([[pot_w2_sq(a, b) for b in tgt] for a in src])
    np.testing.assert_allclose(C2, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(class_cost_matrix(src, tgt, progress=False), np.sqrt(C2))
    # thread count and block size change the schedule, not the numbers
    np.testing.assert_allclose(class_cost_matrix(src, tgt, squared=True, num_threads=1, block_bytes=1, progress=False), C2)


def test_cap_is_seeded_and_per_class():
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(3, 5, 8, generator=g), [torch.randn(40, 8, generator=g) for _ in range(2)]
    C_a = class_cost_matrix(src, tgt, max_per_class=10, seed=3, progress=False)
    C_b = class_cost_matrix(src, tgt, max_per_class=10, seed=3, progress=False)
    C_c = class_cost_matrix(src, tgt, max_per_class=10, seed=4, progress=False)
    np.testing.assert_array_equal(C_a, C_b)
    assert not np.allclose(C_a, C_c)
    idx = torch.as_tensor(subsample_class(40, 10, 3, 1))
    np.testing.assert_allclose(C_a[:, 1] ** 2, [pot_w2_sq(s, tgt[1][idx]) for s in src], rtol=1e-5)


def test_emd2_uniform_non_divisible_sizes():
    rng = np.random.default_rng(2)
    for m, n in [(10, 50), (10, 37), (3, 7), (1, 5), (6, 6)]:
        M = rng.random((m, n))
        assert emd2_uniform(M) == pytest.approx(ot.emd2(np.full(m, 1 / m), np.full(n, 1 / n), M), abs=1e-12)
        assert emd2_uniform(M - 1000) == pytest.approx(emd2_uniform(M) - 1000, abs=1e-9)  # all-negative costs
    with pytest.raises(ValueError, match='non-empty'):
        emd2_uniform(np.zeros((0, 3)))


def test_gaussian_costs():
    g = torch.Generator().manual_seed(3)
    # diagonal Gaussians in 4-D: Bures with diagonal fit and with a full fit agree when n is large
    a = torch.tensor([1., 2., .5, 1.]) * torch.randn(4000, 4, generator=g)
    b = 1 + torch.tensor([.5, 1., 1., 3.]) * torch.randn(4000, 4, generator=g)
    diag = class_cost_matrix([a], [b], cost='bures', squared=True)[0, 0]
    full = class_cost_matrix([a], [b], cost='bures-full', shrinkage=0.0, squared=True)[0, 0]
    closed = 4 * 1.0 + (1 - .5) ** 2 + (2 - 1) ** 2 + (.5 - 1) ** 2 + (1 - 3) ** 2
    assert diag == pytest.approx(closed, rel=0.05) and full == pytest.approx(closed, rel=0.05)
    # the class-mean distance is a lower bound of the exact W2
    src, tgt = [torch.randn(10, 6, generator=g) for _ in range(4)], [torch.randn(20, 6, generator=g) + 1 for _ in range(3)]
    assert (class_cost_matrix(src, tgt, cost='mean') <= class_cost_matrix(src, tgt, progress=False) + 1e-9).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match='dimension'):
        class_cost_matrix([torch.randn(3, 4)], [torch.randn(3, 5)])
    with pytest.raises(ValueError, match='no points'):
        class_cost_matrix([torch.randn(3, 4)], [torch.randn(0, 4)])
    with pytest.raises(ValueError, match='unknown cost'):
        class_cost_matrix([torch.randn(3, 4)], [torch.randn(3, 4)], cost='sinkhorn')
    with pytest.raises(ValueError, match='only 2 source candidates'):
        match_classes(np.ones((2, 5)))
    with pytest.raises(ValueError, match='NaN'):
        match_classes(np.array([[1.0, np.inf], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        as_class_list(torch.randn(5))


@settings(max_examples=60, deadline=None)
@given(K=st.integers(1, 12), extra=st.integers(0, 6), levels=st.sampled_from([2, 3, 1000]), seed=st.integers(0, 10**6),
       offset=st.sampled_from([0.0, -5000.0, 1e6]))
def test_match_equals_linear_sum_assignment(K, extra, levels, seed, offset):
    "Random square and rectangular costs, few levels (many ties) or many, any sign: same optimum as scipy, distinct sources."
    k, K = K, K + extra
    C = np.random.default_rng(seed).integers(0, levels, (K, k)).astype(float) + offset
    sigma, total = match_classes(C, return_cost=True)
    assert len(set(sigma.tolist())) == k and sigma.min() >= 0 and sigma.max() < K
    assert total == pytest.approx(lsa_total(C), abs=1e-9, rel=1e-12)
    assert total == pytest.approx(C[sigma, np.arange(k)].sum())


def test_group_by_class_dataset_encode_embed_cap():
    ds = TinyDataset()
    groups = group_by_class(ds, max_per_class=5, seed=0)
    assert [tuple(x.shape) for x in groups] == [(5, 3, 4, 4)] * 3
    assert all(torch.allclose(x.mean(), torch.tensor(float(c)), atol=0.1) for c, x in enumerate(groups))
    enc = group_by_class(ds, max_per_class=5, seed=0, encode=lambda x: x[:, :1], embed=lambda z: z.flatten(1).sum(1, keepdim=True),
                         batch_size=2)
    assert torch.allclose(enc[1][:, 0], groups[1][:, :1].flatten(1).sum(1))
    assert not torch.equal(group_by_class(ds, max_per_class=5, seed=1)[0], groups[0])


def test_draw_source_samples_flat_and_bad_shapes():
    calls = []
    def sampler(ids, m, seed):
        calls.append((list(ids), m, seed))
        return torch.tensor(ids, dtype=torch.float32).repeat_interleave(m)[:, None]  # (len(ids) * m, 1)
    x = draw_source_samples(sampler, [4, 2, 9], m=2, seed=10, classes_per_call=2, progress=False)
    assert x.shape == (3, 2, 1) and x[:, :, 0].tolist() == [[4, 4], [2, 2], [9, 9]]
    assert calls == [([4, 2], 2, 10), ([9], 2, 11)]
    with pytest.raises(ValueError, match='returned shape'):
        draw_source_samples(lambda ids, m, s: torch.zeros(len(ids), m + 1, 1), [0], 2, progress=False)
    with pytest.raises(ValueError, match='m must'):
        draw_source_samples(sampler, [0], 0, progress=False)


def test_prefilter_shortlist_contains_true_sources():
    g = torch.Generator().manual_seed(5)
    centres = 4 * torch.randn(60, 16, generator=g)
    src = centres[:, None] + torch.randn(60, 4, 16, generator=g)
    true = torch.randperm(60, generator=g)[:8]
    tgt = [centres[t] + torch.randn(30, 16, generator=g) for t in true]
    for cost in ['mean', 'bures']:
        ids = prefilter_sources(src, tgt, keep_per_target=2, cost=cost)
        assert set(true.tolist()) <= set(ids.tolist()) and len(ids) <= 16
        sigma = ids[match_classes(class_cost_matrix(src[ids], tgt, progress=False))]
        assert matching_accuracy(sigma, true.numpy()) == 1.0
    with pytest.raises(ValueError, match='prefilter cost'):
        prefilter_sources(src, tgt, cost='exact')


def test_save_load_roundtrip_and_label_map(tmp_path):
    C = np.array([[0.5, 3.0, 2.0], [1.0, 0.1, 4.0], [2.0, 2.0, 2.0], [9.0, 9.0, 0.3]])
    sigma = match_classes(C)
    assert sigma.tolist() == [0, 1, 3]
    path = save_matching(tmp_path / 'run' / 'matching.json', sigma, ['x', 'y', 'z'], ['s0', 's1', 's2', 's3'], C,
                         params={'cost': 'exact', 'm': 10, 'cap': 50, 'seed': 0, 'space': 'pixels'})
    doc = load_matching(path)
    assert doc['matching']['z'] == {'source_id': 3, 'source_name': 's3', 'cost': 0.3, 'rank': 1,
                                    'runner_up_id': 0, 'runner_up_name': 's0', 'runner_up_cost': 2.0}
    assert doc['matching']['y'] == {'source_id': 1, 'source_name': 's1', 'cost': 0.1, 'rank': 1,
                                    'runner_up_id': 2, 'runner_up_name': 's2', 'runner_up_cost': 2.0}
    assert doc['total_cost'] == pytest.approx(0.9) and doc['params']['space'] == 'pixels'
    assert 'cost_matrix' not in doc
    assert sorted(p.name for p in path.parent.iterdir()) == ['matching.json']
    assert matching_label_map(doc) == [0, 1, 3] and matching_label_map(doc, ['z', 'x']) == [3, 0]
    # relabel target labels for fine-tuning
    labels = np.array([2, 0, 1, 2])
    assert np.array(matching_label_map(doc))[labels].tolist() == [3, 0, 1, 3]
    # overwriting is atomic and leaves one file
    save_matching(path, [1, 0, 3], ['x', 'y', 'z'])
    assert load_matching(path)['sigma'] == [1, 0, 3] and len(list(path.parent.iterdir())) == 1


def test_load_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='run the class matching'):
        load_matching(tmp_path / 'missing.json')
    (tmp_path / 'other.json').write_text(json.dumps({'hello': 1}))
    with pytest.raises(ValueError, match='not a saved matching'):
        load_matching(tmp_path / 'other.json')
    p = save_matching(tmp_path / 'm.json', [0, 1], ['a', 'b'])
    doc = json.loads(p.read_text()); doc['sigma'] = [1, 0]; p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match='disagree'):
        load_matching(p)
    with pytest.raises(ValueError, match='one source class'):
        save_matching(tmp_path / 'dup.json', [1, 1], ['a', 'b'])
    assert not (tmp_path / 'dup.json').exists()


def test_end_to_end_on_shapes(tmp_path):
    "Real shapes images stand in for 10 model samples per class; near targets are matched far above chance."
    from wat_nb.data import load_dataset
    source_ds, target_ds = load_dataset('shapes'), load_dataset('shapes-near')
    source = group_by_class(source_ds, max_per_class=10, seed=0)
    target = group_by_class(target_ds, max_per_class=50, seed=0)
    C = class_cost_matrix(source, target, progress=False)
    assert C.shape == (len(source_ds.classes), len(target_ds.classes))
    sigma = match_classes(C)
    acc = matching_accuracy(sigma, target_ds.source_classes)
    assert acc >= 3 / len(target_ds.classes)  # chance is 1/32 per class
    p = save_matching(tmp_path / 'matching.json', sigma, target_ds.classes, source_ds.classes, C,
                      params={'cost': 'exact', 'm': 10, 'cap': 50, 'seed': 0, 'space': 'pixels'})
    assert matching_label_map(load_matching(p), target_ds.classes) == sigma.tolist()
