"""The mini profile's two backbones, diffusers' DiT and the UNet stand-in, through the same pipeline: label maps,
fine-tuning with exact resume, saving and loading, every guidance mode, ANT's noise and DiffFit's subset."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wat_nb.ant import adversarial_noise, trainable_subset
from wat_nb.finetune import finetune, load_finetuned
from wat_nb.gaussian import ddpm_scheduler
from wat_nb.models import build_model, label_tables, load_dit, null_label, save_dit
from wat_nb.sampling import GUIDANCE_MODES, generate, guided_eps, load_samples

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import ToyDataset, config  # noqa: E402

torch.set_num_threads(1)
BACKBONES = {'dit': 'tiny', 'unet': 'unet-tiny'}


def make(kind: str, num_classes: int, seed: int = 0):
    return build_model(BACKBONES[kind], num_classes, seed=seed)


class Labels:
    "Forward pre-hook that records the class labels a model is called with."
    def __init__(self, model):
        self.calls = []
        self.h = model.register_forward_pre_hook(lambda m, a, kw: self.calls.append(kw['class_labels'].tolist()),
                                                 with_kwargs=True)


@pytest.mark.parametrize('kind', BACKBONES)
@pytest.mark.parametrize('label_map', ['identity', 'reinit', [5, 2, 0, 3]])
def test_finetune_each_label_map(kind, label_map, tmp_path):
    model = make(kind, 6)
    rec = Labels(model)
    res = finetune(model, ToyDataset(num_classes=4), config(tmp_path / 'run', steps=4, label_map=label_map))
    rec.h.remove()
    k = 4 if label_map == 'reinit' else 6  # 'reinit': a fresh table of the target's size; else the source's labels
    used = {y for call in rec.calls for y in call}
    want = {0, 1, 2, 3} if isinstance(label_map, str) else {5, 2, 0, 3}
    assert used <= want | {k} and want <= used | {k}  # mapped labels, and the null label from the dropout
    back = load_finetuned(res.run_dir)
    assert type(back) is type(model) and null_label(back) == k
    assert [t.num_embeddings for t in label_tables(back)] == [k + 1]


@pytest.mark.parametrize('kind', BACKBONES)
def test_resume_equals_uninterrupted(kind, tmp_path):
    data = ToyDataset()
    full = finetune(make(kind, 4), data, config(tmp_path / 'full', steps=4)).model
    finetune(make(kind, 4), data, config(tmp_path / 'cut', steps=2))  # stopped after its checkpoint at step 2
    resumed = finetune(make(kind, 4), data, config(tmp_path / 'cut', steps=4)).model
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = make(kind, 4).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained


@pytest.mark.parametrize('kind', BACKBONES)
def test_save_load_round_trip(kind, tmp_path):
    m = make(kind, 5, seed=3).eval()
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))  # no zero-initialised output layer
    back = load_dit(save_dit(m, tmp_path / kind))
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([3, 400, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(back(x, timestep=t, class_labels=y).sample, m(x, timestep=t, class_labels=y).sample)
    assert type(back) is type(m) and null_label(back) == 5


@pytest.mark.parametrize('kind', BACKBONES)
def test_every_guidance_mode(kind, tmp_path):
    ft, pre = make(kind, 4, seed=0).eval(), make(kind, 7, seed=1).eval()  # their own null labels: 4 and 7
    with torch.no_grad():
        for m in (ft, pre):
            for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([700, 300]), torch.tensor([0, 3])
    seen = {}
    for mode in GUIDANCE_MODES:
        rf, rp = Labels(ft), Labels(pre)
        out = guided_eps(ft, pre, mode=mode, w=0.0 if mode in ('none', 'hybrid') else 0.5)(x, t, y)
        rf.h.remove(); rp.h.remove()
        seen[mode] = (rf.calls, rp.calls)
        assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert seen['none'] == ([[0, 3]], [])
    assert seen['cfg'] == ([[0, 3, 4, 4]], [])            # the fine-tuned model's own null label
    assert seen['dog'] == ([[0, 3]], [[7, 7]])            # the pretrained model's null label
    assert seen['clr'] == ([[0, 3]], [[0, 3]])            # the pretrained model at the same class
    assert seen['hybrid'] == ([[3]], [[0]])               # t >= 600 to the pretrained model, below to the fine-tuned
    images = {m: load_samples(generate(ft, pre, n_per_class=1, mode=m, w=0.0 if m in ('none', 'hybrid') else 1.0,
                                       steps=3, out_dir=tmp_path, name=m, progress=False))[0] for m in GUIDANCE_MODES}
    assert all(v.shape == (4, 8, 8, 3) for v in images.values())
    assert all((images[m] != images['none']).any() for m in ('cfg', 'dog', 'clr', 'hybrid'))


@pytest.mark.parametrize('kind', BACKBONES)
def test_ant_noise_and_difffit_subset(kind):
    m = make(kind, 4)
    share = trainable_subset(m, 'difffit')
    trained = [n for n, p in m.named_parameters() if p.requires_grad]
    assert 0 < share < 0.2 and trained
    assert all(n.endswith('bias') or 'norm' in n or 'embed' in n or 'emb' in n for n in trained)
    assert any('class_embedding' in n or 'embedding_table' in n for n in trained)
    trainable_subset(m, 'all')
    x0, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 4])
    t, noise = torch.tensor([10, 200, 500, 900]), torch.randn(4, 3, 8, 8)
    adv = adversarial_noise(m, x0, t, y, noise, ddpm_scheduler(), steps=2, step_size=0.05)
    assert adv.shape == noise.shape and not torch.equal(adv, noise)
    np.testing.assert_allclose(adv.flatten(1).std(1).numpy(), 1.0, atol=1e-4)  # standardised per sample
    assert all(p.requires_grad for p in m.parameters())  # flags restored
