"Guidance formulas, samplers and resumable generation (wat_nb.sampling) on toy models and tiny DiTs."
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wat_nb.codecs import Codec, PixelCodec
from wat_nb.gaussian import ddpm_alpha_bar
from wat_nb.models import build_dit
from wat_nb.sampling import (GUIDANCE_MODES, SAMPLERS, fit_prior_ot, generate, guided_eps, image_generators,
                             load_samples, make_scheduler, null_label, sample)

torch.set_num_threads(1)


class Toy(torch.nn.Module):
    "eps = s x + t / 1000 + y; with learn_sigma also v = y / 10 - 0.5 + v0 (2C channels). Logs its calls."
    def __init__(self, num_classes, s=1.0, channels=3, learn_sigma=False, v0=0.0):
        super().__init__()
        self.config = SimpleNamespace(num_classes=num_classes, in_channels=channels)
        self.s, self.learn_sigma, self.v0, self.calls = s, learn_sigma, v0, []

    def forward(self, x, timestep, class_labels):
        self.calls.append((len(x), timestep.tolist(), class_labels.tolist()))
        b = lambda v: v.float().view(-1, 1, 1, 1)
        out = self.s * x + b(timestep) / 1000 + b(class_labels)
        if self.learn_sigma: out = torch.cat([out, 0 * x + b(class_labels) / 10 - 0.5 + self.v0], 1)
        return SimpleNamespace(sample=out)


def toy_batch(channels=3, b=4, t=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, channels, 3, 3, generator=g), torch.arange(b) % 3
    return x, torch.full((b,), t), y


def hand(mode, x, t, y, w, s_ft=1.0, s_pre=2.0, null_ft=3, null_pre=5):
    "The paper's formulas on the toy models, written out."
    col = lambda v: v.float().view(-1, 1, 1, 1)
    eps = lambda s, lab: s * x + col(t) / 1000 + col(lab)
    cond = eps(s_ft, y)
    ref = {'none': cond, 'cfg': eps(s_ft, torch.full_like(y, null_ft)), 'dog': eps(s_pre, torch.full_like(y, null_pre)),
           'clr': eps(s_pre, y)}[mode]
    return (1 + w) * cond - w * ref


@pytest.mark.parametrize('mode,w', [('none', 0.0)] + [(m, w) for m in ('cfg', 'dog', 'clr') for w in (0.0, 0.5, 2.0)])
def test_guidance_formulas(mode, w):
    ft, pre = Toy(3, s=1.0), Toy(5, s=2.0)  # different class counts: null labels 3 and 5
    x, t, y = toy_batch()
    out = guided_eps(ft, pre, mode=mode, w=w)(x, t, y)
    torch.testing.assert_close(out, hand(mode, x, t, y, w))
    n_ft, n_pre = len(ft.calls), len(pre.calls)
    if mode == 'cfg' and w:  # one batched call: cond + each model's own null label
        assert (n_ft, n_pre) == (1, 0) and ft.calls[0][0] == 8 and ft.calls[0][2] == y.tolist() + [3] * 4
    elif mode in ('dog', 'clr') and w:  # two different models: each once, batch B
        assert (n_ft, n_pre) == (1, 1) and ft.calls[0][0] == pre.calls[0][0] == 4
        assert pre.calls[0][2] == ([5] * 4 if mode == 'dog' else y.tolist())
    else:
        assert (n_ft, n_pre) == (1, 0) and ft.calls[0][0] == 4


def test_null_label_is_each_models_own():
    ft, pre = build_dit('tiny', 3, init='diffusers', seed=0), build_dit('tiny', 7, init='diffusers', seed=1)
    assert (null_label(ft), null_label(pre)) == (3, 7)
    seen = {}
    for name, m in (('ft', ft), ('pre', pre)):
        m.register_forward_pre_hook(lambda mod, a, kw, name=name: seen.setdefault(name, []).append(kw['class_labels'].tolist()),
                                    with_kwargs=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([500, 500]), torch.tensor([0, 2])
    guided_eps(ft, pre, mode='cfg', w=1.0)(x, t, y)
    guided_eps(ft, pre, mode='dog', w=1.0)(x, t, y)
    assert seen['ft'] == [[0, 2, 3, 3], [0, 2]] and seen['pre'] == [[7, 7]]


@pytest.mark.parametrize('mode', ['cfg', 'dog', 'clr'])
def test_learned_variance_and_guided_channels(mode):
    ft = Toy(3, s=1.0, channels=4, learn_sigma=True)
    pre = Toy(5, s=2.0, channels=4, learn_sigma=True, v0=1.0)  # another variance: must not leak into the output
    x, t, y = toy_batch(channels=4)
    want_eps, cond = hand(mode, x, t, y, 0.5), hand('none', x, t, y, 0.5)
    var_ft = 0 * x + y.float().view(-1, 1, 1, 1) / 10 - 0.5
    out = guided_eps(ft, pre, mode=mode, w=0.5, guided_channels='all')(x, t, y)
    assert out.shape == (4, 8, 3, 3)
    torch.testing.assert_close(out[:, :4], want_eps)
    torch.testing.assert_close(out[:, 4:], var_ft)
    out3 = guided_eps(ft, pre, mode=mode, w=0.5, guided_channels=3)(x, t, y)  # the released DiT code's choice
    torch.testing.assert_close(out3[:, :3], want_eps[:, :3])
    torch.testing.assert_close(out3[:, 3], cond[:, 3])
    torch.testing.assert_close(out3[:, 4:], var_ft)
    assert not torch.allclose(out3[:, 3], out[:, 3])
    with pytest.raises(ValueError, match="'all' or an int in 1..4"):
        guided_eps(ft, pre, mode=mode, w=0.5, guided_channels=5)(x, t, y)


def test_hybrid_switch():
    ft, pre = Toy(3, s=1.0), Toy(5, s=2.0)
    x, _, y = toy_batch()
    fn = guided_eps(ft, pre, mode='hybrid', w=0, t_switch=600)
    t = torch.tensor([999, 600, 599, 0])
    out = fn(x, t, y)
    for i in range(4):
        s = 2.0 if t[i] >= 600 else 1.0
        torch.testing.assert_close(out[i], s * x[i] + t[i] / 1000 + y[i].float())
    assert ft.calls == [(2, [599, 0], y[2:].tolist())] and pre.calls == [(2, [999, 600], y[:2].tolist())]
    # over a whole DDPM run: the pretrained model at every step t >= 600, the fine-tuned one below
    ft.calls.clear(); pre.calls.clear()
    sample(fn, (4, 3, 3, 3), y, steps=10)
    steps = make_scheduler('ddpm', 10).timesteps.tolist()
    assert [c[1][0] for c in pre.calls] == [s for s in steps if s >= 600]
    assert [c[1][0] for c in ft.calls] == [s for s in steps if s < 600]


def test_bad_names_and_weights():
    ft, pre = Toy(3), Toy(5)
    with pytest.raises(ValueError, match='known modes: ' + ', '.join(GUIDANCE_MODES)):
        guided_eps(ft, pre, mode='classifier')
    with pytest.raises(ValueError, match='known samplers: ' + ', '.join(SAMPLERS)):
        sample(guided_eps(ft, mode='none', w=0), (1, 3, 2, 2), [0], sampler='dpm')
    with pytest.raises(ValueError, match='known: fixed_small'):
        make_scheduler('ddpm', 10, variance_type='large')
    with pytest.raises(ValueError, match='w must be >= 0'):
        guided_eps(ft, pre, mode='clr', w=-0.5)
    with pytest.raises(ValueError, match='needs the pretrained'):
        guided_eps(ft, mode='dog', w=0.5)
    with pytest.raises(ValueError, match='pre_labels must be class ids 0..4'):
        guided_eps(ft, pre, mode='clr', pre_labels=[0, 1, 5])
    # hybrid between a learned-variance pretrained model and a fixed-variance fine-tuned one: one clear error
    fn = guided_eps(Toy(3), Toy(5, learn_sigma=True), mode='hybrid', w=0)
    with pytest.raises(ValueError, match="'learned_range' needs 6 output channels, got 3 at t = 591"):
        sample(fn, (2, 3, 2, 2), [0, 1], steps=50)


def dit_ddpm_reference(eps_fn, labels, x, steps, gens):
    "DiT's respaced learned-range DDPM written out: betas from abar at the visited steps, log-variance interpolation."
    abar = torch.as_tensor(ddpm_alpha_bar(), dtype=torch.float64)
    ts = [round(i * 999 / (steps - 1)) for i in range(steps)][::-1]
    c = x.shape[1]
    for i, t in enumerate(ts):
        out = eps_fn(x, torch.full((len(x),), t), labels).double()
        eps, v = out[:, :c], out[:, c:]
        a, a_prev = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - a / a_prev
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x.double()
        if i + 1 < len(ts):
            post = beta * (1 - a_prev) / (1 - a)
            frac = (v + 1) / 2
            logvar = frac * beta.log() + (1 - frac) * post.log()
            noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=gi) for gi in gens]).double()
            x = (mean + (0.5 * logvar).exp() * noise).float()
        else:
            x = mean.float()
    return x


def test_ddpm_learned_range_matches_dit_rule():
    ft = Toy(3, s=0.3, channels=4, learn_sigma=True)
    fn = guided_eps(ft, mode='cfg', w=0.5, guided_channels=3)
    y = torch.tensor([0, 1, 2])
    got = sample(fn, (3, 4, 3, 3), y, 'ddpm', steps=12, seed=5)
    gens = image_generators(5, 0, 3)
    x = torch.cat([torch.randn((1, 4, 3, 3), generator=gi) for gi in gens])
    torch.testing.assert_close(got, dit_ddpm_reference(fn, y, x, 12, gens), rtol=1e-4, atol=1e-4)


def test_seeds_and_sampler_names():
    fn = guided_eps(Toy(3, s=0.2), Toy(3, s=0.4), mode='dog', w=1.0)
    y = torch.tensor([0, 1, 2, 0])
    runs = {(s, k): sample(fn, (4, 3, 3, 3), y, sampler=s, steps=6, seed=k) for s in SAMPLERS for k in (0, 1)}
    for s in SAMPLERS:
        torch.testing.assert_close(runs[s, 0], sample(fn, (4, 3, 3, 3), y, sampler=s, steps=6, seed=0), rtol=0, atol=0)
        assert not torch.allclose(runs[s, 0], runs[s, 1])
    assert not torch.allclose(runs['ddpm', 0], runs['ddim', 0])


def test_prior_map_moments():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3000, 2, 2, generator=g) * torch.tensor([[3.0, 0.5], [1.0, 2.0]]) + 4.0  # (N, 2, 2), d = 4
    abar = 0.3
    for cov in ('diag', 'full'):
        m = fit_prior_ot(data, abar_T=abar, cov=cov)
        z = m(torch.randn(100_000, 2, 2, generator=g)).reshape(-1, 4).double()
        flat = data.reshape(-1, 4).double()
        torch.testing.assert_close(z.mean(0), abar ** 0.5 * flat.mean(0), atol=0.02, rtol=0)
        torch.testing.assert_close(z.var(0), abar * flat.var(0) + 1 - abar, atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="'diag' or 'full'"):
        fit_prior_ot(data, cov='lowrank')


@pytest.fixture(scope='module')
def dits():
    return build_dit('tiny', 4, init='diffusers', seed=0), build_dit('tiny', 4, init='diffusers', seed=1)


class FailingCodec(PixelCodec):
    "Pixels, but decoding fails on call number `fail_at` (an interrupted run)."
    def __init__(self, fail_at):
        super().__init__(); self.calls, self.fail_at = 0, fail_at

    def decode(self, z):
        self.calls += 1
        if self.calls == self.fail_at: raise KeyboardInterrupt('simulated interruption')
        return super().decode(z)


def count_calls(model):
    n = [0]
    h = model.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n, h


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_generate_writes_npz_and_png(dits, tmp_path, sampler):
    ft, pre = dits
    path = generate(ft, pre, n_per_class=2, classes=[1, 3], mode='clr', w=0.5, sampler=sampler, steps=4, seed=0,
                    batch_size=3, out_dir=tmp_path, progress=False)
    images, labels, params = load_samples(path)
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8 and labels.tolist() == [1, 1, 3, 3]
    assert params['sampler'] == sampler and params['mode'] == 'clr' and params['w'] == 0.5 and params['seed'] == 0
    from PIL import Image
    assert np.asarray(Image.open(tmp_path / 'samples.png')).shape == (2 * 9 + 1, 8 * 9 + 1, 3)
    side = json.loads((tmp_path / 'samples.json').read_text())
    assert side['params'] == params and 'versions' in side
    other = load_samples(generate(ft, pre, n_per_class=2, classes=[1, 3], mode='clr', w=0.5, sampler=sampler, steps=4,
                                  seed=1, out_dir=tmp_path, name='seed1', progress=False))[0]
    assert (other != images).any()


def test_resume_after_interruption(dits, tmp_path):
    ft, pre = dits
    kw = dict(labels=[0, 1, 2, 3, 0, 1, 2], mode='dog', w=1.0, steps=4, seed=7, progress=False)
    full = load_samples(generate(ft, pre, batch_size=2, out_dir=tmp_path / 'full', **kw))[0]
    with pytest.raises(KeyboardInterrupt):
        generate(ft, pre, batch_size=2, out_dir=tmp_path / 'cut', codec=FailingCodec(fail_at=3), **kw)
    parts = sorted(p.name for p in (tmp_path / 'cut' / 'samples.parts').glob('*.npz'))
    assert parts == ['00000000-00000002.npz', '00000002-00000004.npz']
    n, h = count_calls(ft)
    resumed = load_samples(generate(ft, pre, batch_size=5, out_dir=tmp_path / 'cut', **kw))[0]  # another batch size
    h.remove()
    assert n[0] == 4  # one batch of the 3 missing images, 4 steps: the finished batches were not redone
    np.testing.assert_array_equal(resumed, full)
    n, h = count_calls(ft)
    again = generate(ft, pre, batch_size=2, out_dir=tmp_path / 'cut', **kw)  # finished: returned as it is
    h.remove()
    assert n[0] == 0 and again.name == 'samples.npz'
    with pytest.raises(ValueError, match='other parameters'):
        generate(ft, pre, batch_size=2, out_dir=tmp_path / 'cut', **{**kw, 'seed': 8})


def test_same_seed_any_batch_size(dits, tmp_path):
    ft, _ = dits
    kw = dict(n_per_class=2, mode='cfg', w=1.5, steps=5, seed=3, progress=False)
    a = load_samples(generate(ft, batch_size=8, out_dir=tmp_path, name='a', **kw))[0]
    b = load_samples(generate(ft, batch_size=3, out_dir=tmp_path, name='b', **kw))[0]
    np.testing.assert_array_equal(a, b)


class FirstThree(Codec):
    "A stand-in latent codec: 4 model channels, the first 3 shown as the image."
    name = key = 'first-three'
    def decode(self, z): return z[:, :3].float().clamp(-1, 1)


def test_generate_latent_learned_sigma_dit(tmp_path):
    kw = dict(in_channels=4, learn_sigma=True)
    ft = build_dit('tiny', 4, init='diffusers', seed=0, **kw)
    pre = build_dit('tiny', 6, init='diffusers', seed=1, **kw)  # its own class count: null label 6
    out = [load_samples(generate(ft, pre, n_per_class=1, mode=m, w=0.5, steps=4, codec=FirstThree(), guided_channels=gc,
                                 out_dir=tmp_path, name=f'{m}{gc}', progress=False))
           for m, gc in (('clr', 3), ('clr', 'all'), ('dog', 3))]
    assert all(o[0].shape == (4, 8, 8, 3) for o in out)
    assert out[0][2]['guided_channels'] == 3 and out[1][2]['guided_channels'] == 'all'
    assert (out[0][0] != out[1][0]).any() and (out[0][0] != out[2][0]).any()


def test_generate_bf16_and_prior(dits, tmp_path):
    ft, pre = dits
    prior = fit_prior_ot(torch.rand(64, 3, 8, 8) * 2 - 1)
    path = generate(ft, pre, n_per_class=1, mode='hybrid', w=0.0, steps=4, bf16=True, prior=prior, out_dir=tmp_path,
                    progress=False)
    images, _, params = load_samples(path)
    assert images.shape == (4, 8, 8, 3) and params['bf16'] is True and params['prior']['kind'] == 'diag'


def test_generate_bad_labels(dits, tmp_path):
    ft, pre = dits
    with pytest.raises(ValueError, match='null label'):
        generate(ft, pre, labels=[0, 4], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match='either labels or n_per_class'):
        generate(ft, pre, out_dir=tmp_path, progress=False)
