"""Checks of wat_nb.ant (the ANT baseline) and of its switches in wat_nb.finetune: the domain classifier, the
similarity-guided target, adversarial noise, DiffFit subsets, few-shot subsets, the intra-cluster diversity score,
and an end-to-end fine-tuning run with every ANT switch on that resumes exactly."""
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from wat_nb.ant import (DomainClassifier, FeatureDistance, FewShotSubset, adversarial_noise, denoising_error,
                        few_shot, few_shot_indices, intra_cluster_distance, load_domain_classifier,
                        save_domain_classifier, similarity_target, train_domain_classifier, trainable_subset)
from wat_nb.finetune import FinetuneConfig, finetune, latest_checkpoint, load_finetuned, read_log, scheduled_lr
from wat_nb.gaussian import ddpm_scheduler
from wat_nb.models import build_dit

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import ToyDataset, config, tiny_model  # noqa: E402

torch.set_num_threads(1)  # tiny models on a shared CPU
WEIGHTS = 'diffusion_pytorch_model.safetensors'


def _run(model, ds, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return finetune(model, ds, config(out, **kw))


def _two_domains(n=32, c=3, size=8, seed=0):
    "Source images around -0.5, target images around +0.5 (easy to tell apart when little noise is added)."
    g = torch.Generator().manual_seed(seed)
    src = (-0.5 + 0.2 * torch.randn(n, c, size, size, generator=g)).clamp(-1, 1)
    tgt = (0.5 + 0.2 * torch.randn(n, c, size, size, generator=g)).clamp(-1, 1)
    return src, tgt


@pytest.fixture(scope='module')
def classifier_file(tmp_path_factory):
    "A domain classifier of ToyDataset images (target) against darker images (source), saved to safetensors."
    ds = ToyDataset()
    src = (ds.images - 0.8).clamp(-1, 1)
    clf = train_domain_classifier(src, ds, steps=40, batch_size=16, seed=0, progress=False)
    return save_domain_classifier(clf, tmp_path_factory.mktemp('clf') / 'clf.safetensors')


# ---------------------------------------------------------------- domain classifier

@pytest.mark.parametrize('c,h,w', [(3, 8, 8), (4, 16, 16), (4, 5, 7), (3, 1, 1)])
def test_domain_classifier_shapes(c, h, w):
    out = DomainClassifier(c)(torch.randn(3, c, h, w), torch.tensor([0, 500, 999]))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_train_domain_classifier_learns_and_is_seeded():
    src, tgt = _two_domains()
    a = train_domain_classifier(src, tgt, steps=60, batch_size=16, seed=3, progress=False)
    b = train_domain_classifier(src, tgt, steps=60, batch_size=16, seed=3, progress=False)
    c = train_domain_classifier(src, tgt, steps=60, batch_size=16, seed=4, progress=False)
    x, t = torch.cat([src, tgt]), torch.full((64,), 10)
    assert torch.equal(a(x, t), b(x, t)) and not torch.equal(a(x, t), c(x, t))
    pred = a(x, t).argmax(1)
    assert (pred == torch.cat([torch.zeros(32), torch.ones(32)]).long()).float().mean() > 0.9
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_train_domain_classifier_takes_datasets_and_latents():
    ds = ToyDataset()
    lat_src, lat_tgt = _two_domains(n=8, c=4, size=4)
    clf = train_domain_classifier(lat_src, lat_tgt, steps=2, batch_size=4, progress=False)
    assert clf.config['in_channels'] == 4
    assert train_domain_classifier(ds, ds.images, steps=2, batch_size=4, progress=False).config['in_channels'] == 3
    with pytest.raises(ValueError, match='source items are'):
        train_domain_classifier(ds, lat_tgt, steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match='both domains need images'):
        train_domain_classifier(ds, ds.images[:0], steps=1, batch_size=4, progress=False)


def test_save_load_domain_classifier(tmp_path):
    clf = DomainClassifier(4, width=16, depth=3, t_dim=32)
    path = save_domain_classifier(clf, tmp_path / 'sub' / 'c.safetensors')
    back = load_domain_classifier(path, device='cpu')
    assert back.config == clf.config
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    assert torch.equal(back(x, t), clf(x, t))
    save_file({'w': torch.zeros(2)}, str(tmp_path / 'other.safetensors'))
    with pytest.raises(ValueError, match='not a saved DomainClassifier'):
        load_domain_classifier(tmp_path / 'other.safetensors')
    with pytest.raises(FileNotFoundError, match='train_domain_classifier'):
        load_domain_classifier(tmp_path / 'none.safetensors')


# ---------------------------------------------------------------- similarity-guided target

class Logistic(torch.nn.Module):
    "logits (0, w.x + b): log p(target | x) = log sigmoid(w.x + b), gradient (1 - sigmoid) w."
    def __init__(self, w, b):
        super().__init__(); self.w, self.b = torch.nn.Parameter(w), torch.nn.Parameter(torch.tensor(b))

    def forward(self, x, t):
        z = (x * self.w).flatten(1).sum(1) + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


def test_similarity_target_closed_form_on_latents():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 2, 2, generator=g)
    clf, sched = Logistic(w, -0.2), ddpm_scheduler()
    noise, xt = torch.randn(5, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    t = torch.tensor([0, 1, 250, 600, 999])
    got = similarity_target(noise, xt, t, clf, 2.5, sched.alphas_cumprod)
    abar = sched.alphas_cumprod.double()
    for i in range(5):
        z = float((xt[i] * w).sum()) - 0.2
        want = noise[i].double() - 2.5 * (1 - abar[t[i]]) * (1 - 1 / (1 + math.exp(-z))) * w.double()
        assert torch.allclose(got[i].double(), want, atol=1e-5)
    assert clf.w.grad is None
    # pointing the guidance at the other domain flips the sign of the correction
    src = similarity_target(noise, xt, t, clf, 2.5, sched.alphas_cumprod, target_label=0)
    assert torch.allclose((src - noise) * (got - noise), -((got - noise).abs() * (src - noise).abs()), atol=1e-6)


# ---------------------------------------------------------------- adversarial noise

class ToyDenoiser(torch.nn.Module):
    "A conv eps-predictor with the DiT call signature; one frozen parameter to check that flags are restored."
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(5, 3)
        self.frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x, timestep, class_labels):
        return torch.tanh(self.conv(x)) * self.frozen + self.emb(class_labels)[:, :, None, None] + 0.001 * timestep.float()[:, None, None, None]


def test_adversarial_noise_ascends_and_is_standardised():
    torch.manual_seed(0)
    model, sched = ToyDenoiser().train(), ddpm_scheduler()
    g = torch.Generator().manual_seed(2)
    x0, e0 = torch.rand(8, 3, 6, 6, generator=g) * 2 - 1, torch.randn(8, 3, 6, 6, generator=g)
    t, y = torch.randint(0, 1000, (8,), generator=g), torch.randint(0, 5, (8,), generator=g)
    e = adversarial_noise(model, x0, t, y, e0, sched, steps=10, step_size=0.02)
    with torch.no_grad():
        before, after = denoising_error(model, x0, t, y, e0, sched), denoising_error(model, x0, t, y, e, sched)
    assert (after >= before).all() and after.mean() > before.mean() * 1.01
    assert torch.allclose(e.mean((1, 2, 3)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(e.std((1, 2, 3)), torch.ones(8), atol=1e-5)
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {'frozen'}
    assert not e.requires_grad
    more = adversarial_noise(model, x0, t, y, e0, sched, steps=20, step_size=0.02)
    with torch.no_grad(): assert denoising_error(model, x0, t, y, more, sched).mean() >= after.mean()


# ---------------------------------------------------------------- trainable subsets

class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = torch.nn.Embedding(4, 6), torch.nn.Linear(6, 6)
        self.ln, self.gn = torch.nn.LayerNorm(6), torch.nn.GroupNorm(2, 6)
        self.nobias = torch.nn.Linear(6, 6, bias=False)

    def forward(self, y):
        h = self.ln(self.lin(self.emb(y)))
        return self.nobias(self.gn(h[:, :, None]).squeeze(-1))


def test_difffit_trains_only_biases_norms_and_embeddings():
    torch.manual_seed(0)
    m = Mixed()
    share = trainable_subset(m, 'difffit')
    want = {'emb.weight', 'lin.bias', 'ln.weight', 'ln.bias', 'gn.weight', 'gn.bias'}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == want
    total = sum(p.numel() for p in m.parameters())
    assert share == pytest.approx(sum(m.get_parameter(n).numel() for n in want) / total)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)
    m(torch.tensor([0, 1, 2, 3])).square().mean().backward(); opt.step()
    assert {n for n, p in m.named_parameters() if not torch.equal(p, before[n])} == want
    assert trainable_subset(m, 'all') == 1.0 and all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match='unknown trainable subset'):
        trainable_subset(m, 'lora')


def test_difffit_counts_tied_dit_parameters_once():
    m = tiny_model()
    share = trainable_subset(m, 'difffit')
    unique = {id(p): p for p in m.parameters()}
    n_train = sum(p.numel() for p in unique.values() if p.requires_grad)
    assert share == pytest.approx(n_train / sum(p.numel() for p in unique.values())) and 0 < share < 0.1


# ---------------------------------------------------------------- few-shot subsets

def test_few_shot_is_deterministic_nested_and_balanced():
    targets = np.repeat(np.arange(4), [7, 9, 5, 12])
    a = few_shot_indices(targets, 5, seed=0)
    assert np.array_equal(a, few_shot_indices(targets, 5, seed=0))
    assert np.bincount(targets[a]).tolist() == [5, 5, 5, 5]
    assert set(few_shot_indices(targets, 2, seed=0)) <= set(a)
    assert not np.array_equal(a, few_shot_indices(targets, 5, seed=1))
    with pytest.raises(ValueError, match='class 2 has 5 images, fewer than shots=6'):
        few_shot_indices(targets, 6)
    with pytest.raises(ValueError, match='shots must be >= 1'):
        few_shot_indices(targets, 0)


def test_few_shot_of_a_plain_dataset_keeps_its_interface():
    ds = ToyDataset()
    fs = few_shot(ds, 2, seed=5)
    assert isinstance(fs, FewShotSubset) and len(fs) == 8 and fs.classes == ds.classes
    assert np.bincount(fs.targets).tolist() == [2, 2, 2, 2]
    for i in range(len(fs)):
        x, y = fs[i]
        assert y == fs.targets[i] and torch.equal(x, ds.images[fs.indices[i]])
    assert fs.images is ds.images  # other attributes pass through
    with pytest.raises(ValueError, match='needs a dataset with .targets'):
        few_shot(torch.utils.data.TensorDataset(torch.zeros(3)), 1)


# ---------------------------------------------------------------- intra-cluster distance

def test_intra_cluster_distance_by_hand():
    def l1(a, b): return torch.cdist(a.double(), b.double(), p=1)
    train = torch.tensor([[0.0], [10.0], [20.0]])
    samples = torch.tensor([[1.0], [-1.0], [2.0], [11.0], [9.0], [30.0]])  # clusters {1,-1,2}, {11,9}, {30}
    r = intra_cluster_distance(samples, train, l1)
    assert r['cluster_sizes'] == [3, 2, 1] and r['clusters'] == 2 and r['distance'] == 'l1'
    assert r['score'] == pytest.approx((np.mean([2, 1, 3]) + 2) / 2)
    assert math.isnan(intra_cluster_distance(samples[:2], torch.tensor([[1.0], [-1.0]]), l1)['score'])
    with pytest.raises(ValueError, match='need >= 2 samples'):
        intra_cluster_distance(samples[:1], train, l1)


def test_feature_distance_is_named_honestly_and_sees_collapse():
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(2, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    collapsed = train.repeat(3, 1, 1, 1)
    varied = (collapsed.float() + 60 * torch.randn(collapsed.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    fd = FeatureDistance()
    assert 'EfficientNet-Lite0' in fd.name and 'LPIPS' not in fd.name
    r0, r1 = intra_cluster_distance(collapsed, train, fd), intra_cluster_distance(varied, train, fd)
    assert r0['score'] < 1e-6 < 1e-3 < r1['score'] and r0['distance'] == fd.name


# ---------------------------------------------------------------- fine-tuning with ANT

def test_config_validates_ant_fields(tmp_path):
    with pytest.raises(ValueError, match='needs ant_classifier'):
        FinetuneConfig(ant_gamma=1.0)
    with pytest.raises(ValueError, match='ant_noise_step_size must be > 0'):
        FinetuneConfig(ant_noise_step_size=0.0)
    with pytest.raises(ValueError, match='ant_gamma must be >= 0'):
        FinetuneConfig(ant_gamma=-1.0, ant_classifier='x')
    with pytest.raises(FileNotFoundError, match='no domain classifier at'):
        _run(tiny_model(), ToyDataset(), tmp_path, steps=2, ant_gamma=1.0,
             ant_classifier=str(tmp_path / 'missing.safetensors'))
    wrong = save_domain_classifier(DomainClassifier(4), tmp_path / 'four.safetensors')
    with pytest.raises(ValueError, match='takes 4 channels but the model 3'):
        _run(tiny_model(), ToyDataset(), tmp_path, steps=2, ant_gamma=1.0, ant_classifier=str(wrong))


def test_finetune_with_all_ant_switches_resumes_exactly(tmp_path, classifier_file):
    kw = dict(ckpt_every=2, log_every=1, trainable='difffit', ant_noise_steps=3, ant_noise_step_size=0.05,
              ant_gamma=5.0, ant_classifier=str(classifier_file), lr_schedule='cosine', warmup_steps=1)
    ds = few_shot(ToyDataset(), 3, seed=0)

    class Stop(Exception): pass

    def stop_at_4(step, path):
        if step == 4: raise Stop  # an interruption right after checkpoint 4 (the cosine schedule keeps steps=6)
    with pytest.raises(Stop), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        finetune(tiny_model(), ds, config(tmp_path / 'resumed', steps=6, **kw), on_checkpoint=stop_at_4)
    assert latest_checkpoint(tmp_path / 'resumed').name == 'step-0000004'
    resumed = _run(tiny_model(), ds, tmp_path / 'resumed', steps=6, **kw)
    straight = _run(tiny_model(), ds, tmp_path / 'straight', steps=6, **kw)
    for part in ('model', 'ema'):
        wa = load_file(str(resumed.checkpoint / part / WEIGHTS))
        wb = load_file(str(straight.checkpoint / part / WEIGHTS))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part
    la, lb = read_log(tmp_path / 'resumed'), read_log(tmp_path / 'straight')
    assert la['step'].tolist() == lb['step'].tolist() == [1, 2, 3, 4, 5, 6] and la['loss'].tolist() == lb['loss'].tolist()
    st = json.loads((straight.checkpoint / 'state.json').read_text())
    assert 0 < st['trainable_share'] < 0.1 and st['config']['trainable'] == 'difffit'
    start, end = tiny_model().state_dict(), load_finetuned(straight.run_dir, ema=False).state_dict()
    moved = {n for n in start if not torch.equal(start[n], end[n])}
    assert moved and all(n.endswith('bias') or 'embedding_table' in n for n in moved)
    # the switches reach the loss: on a model with non-zero output (adaLN-Zero predicts 0 at first, which makes the
    # ascent a pure rescaling), the adversarial noise raises the first step's loss above that of the standardised
    # draw alone (a negligible step size), and the similarity target changes it
    first = {}
    for name, extra in [('still', dict(ant_noise_step_size=1e-9)), ('adv', {}),
                        ('adv+sim', dict(ant_gamma=5.0, ant_classifier=str(classifier_file)))]:
        model = build_dit('tiny', 4, seed=0, init='diffusers')
        res = _run(model, ds, tmp_path / name, steps=1, ckpt_every=1, log_every=1, ant_noise_steps=3,
                   **{'ant_noise_step_size': 0.05, **extra})
        first[name] = read_log(res.run_dir)['mse'][0]
    assert first['adv'] > first['still'] * 1.001 and first['adv+sim'] != first['adv']


def test_cosine_lr_follows_the_formula_in_the_log(tmp_path):
    res = _run(tiny_model(), ToyDataset(), tmp_path, steps=7, ckpt_every=7, log_every=3, lr=1e-3,
               warmup_steps=2, lr_schedule='cosine')
    log = read_log(res.run_dir)
    want = [1e-3 * (s + 1) / 2 for s in range(2)] + [0.5e-3 * (1 + math.cos(math.pi * (s - 2) / 5)) for s in range(2, 7)]
    assert log['lr'].tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert log['lr'][2] == pytest.approx(1e-3) and 0 < log['lr'][-1] < 1e-4
    cfg = config(tmp_path, steps=7, lr=1e-3, warmup_steps=2, lr_schedule='cosine')
    assert [scheduled_lr(cfg, s) for s in range(7)] == pytest.approx(want, rel=1e-12)
    assert latest_checkpoint(tmp_path).name == 'step-0000007'
