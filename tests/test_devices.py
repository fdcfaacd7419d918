"""Where models go: every loader places on wat_nb.core.default_device() unless told otherwise, the EMA of a
fine-tuning run lives on the prepared model's device, and samplers work on the model's device. Placement is
checked with WAT_NB_DEVICE=meta (no GPU needed)."""
import sys
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

import wat_nb.finetune as FT
from wat_nb import metrics as M
from wat_nb.ant import DomainClassifier, load_domain_classifier, save_domain_classifier
from wat_nb.codecs import VAECodec
from wat_nb.core import default_device
from wat_nb.finetune import finetune, load_finetuned, make_ema, save_checkpoint
from wat_nb.models import build_dit, load_dit, pretrained, save_dit
from wat_nb.sampling import generate, load_samples, sample

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import ToyDataset, config, tiny_model  # noqa: E402

torch.set_num_threads(1)
META = torch.device('meta')


def _device(model) -> torch.device: return next(model.parameters()).device


@pytest.fixture
def on_meta(monkeypatch):
    monkeypatch.setenv('WAT_NB_DEVICE', 'meta')


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('vae') / 'tiny-vae'
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2).save_pretrained(d)
    return d


# ---------------------------------------------------------------- loaders follow default_device()

def test_load_dit_and_pretrained_go_to_the_default_device(tmp_path, on_meta):
    save_dit(build_dit('tiny', 4, seed=0), tmp_path / 'dit')
    assert _device(load_dit(tmp_path / 'dit')) == META
    assert _device(pretrained(str(tmp_path / 'dit'))) == META
    assert _device(load_dit(tmp_path / 'dit', device='cpu')).type == 'cpu'  # an explicit device wins


def test_load_finetuned_goes_to_the_default_device(tmp_path, on_meta):
    m = build_dit('tiny', 3, seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, 2, m, make_ema(m.parameters(), config(tmp_path)), opt, {})
    assert _device(load_finetuned(tmp_path)) == META
    assert _device(load_finetuned(tmp_path, ema=False)) == META


def test_vae_codec_goes_to_the_default_device_with_the_same_key(vae_dir, monkeypatch):
    key = VAECodec(vae_dir, device='cpu').key
    monkeypatch.setenv('WAT_NB_DEVICE', 'meta')
    codec = VAECodec(vae_dir)
    assert codec.device == META and _device(codec.vae) == META
    assert codec.key == key  # the cache key does not depend on where the weights sit


def test_domain_classifier_loads_on_the_default_device(tmp_path, on_meta):
    path = save_domain_classifier(DomainClassifier(3, 8, 1, 16), tmp_path / 'clf.safetensors')
    assert _device(load_domain_classifier(path)) == META


def test_feature_networks_follow_the_default_device(monkeypatch):
    monkeypatch.setenv('WAT_NB_DEVICE', 'cpu')
    assert M._cuda(None) is False
    monkeypatch.setattr(M, 'default_device', lambda: torch.device('cuda'))  # as on a GPU machine
    assert M._cuda(None) is True
    monkeypatch.setenv('WAT_NB_DEVICE', 'meta')
    monkeypatch.setattr(M, 'default_device', default_device)
    assert M._cuda(None) is False
    assert _device(M.efficientnet_lite0()) == META
    assert _device(M.efficientnet_lite0(device='cpu')).type == 'cpu'


# ---------------------------------------------------------------- sampling runs where the model is

def test_sample_puts_noise_labels_and_timesteps_on_its_device():
    seen = []
    def eps_fn(x, t, y):
        seen.append((x.device, t.device, y.device))
        return torch.zeros_like(x)
    x0 = sample(eps_fn, (2, 3, 4, 4), torch.tensor([0, 1]), steps=3, device='meta')
    assert x0.device == META and seen and all(d == (META,) * 3 for d in seen)


def test_generate_uses_the_models_device_not_the_default(tmp_path, on_meta):
    path = generate(build_dit('tiny', 2, init='diffusers', seed=0), n_per_class=1, mode='none', w=0, steps=2,
                    out_dir=tmp_path, progress=False)
    assert load_samples(path)[0].shape == (2, 8, 8, 3)


# ---------------------------------------------------------------- the EMA lives on the prepared model's device

class MetaAccelerator(Accelerator):
    "A CPU accelerator whose `prepare` moves the model to the meta device, standing in for CUDA."
    def prepare(self, *args, **kw):
        out = super().prepare(*args, **kw)
        for o in out:
            if isinstance(o, torch.nn.Module): o.to(META)
        return out


class Stop(Exception): pass


def test_ema_is_made_on_the_prepared_models_device(tmp_path, monkeypatch):
    made = []
    def capture(params, cfg):
        made.append(make_ema(params, cfg)); raise Stop
    monkeypatch.setattr(FT, 'make_ema', capture)
    with pytest.raises(Stop):
        finetune(tiny_model(), ToyDataset(), config(tmp_path / 'run'), accelerator=MetaAccelerator(cpu=True))
    assert made and all(p.device == META for p in made[0].shadow_params)


def test_resumed_ema_stays_on_the_prepared_models_device(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        finetune(tiny_model(), ToyDataset(), config(tmp_path / 'run', steps=2))
    loaded, real_load = [], FT.load_checkpoint
    def capture(ckpt, *a, **kw):
        state = real_load(ckpt, *a, **kw)
        if kw.get('ema') is not None: loaded.append(kw['ema']); raise Stop
        return state
    monkeypatch.setattr(FT, 'load_checkpoint', capture)
    with pytest.raises(Stop), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        finetune(tiny_model(), ToyDataset(), config(tmp_path / 'run', steps=4), accelerator=MetaAccelerator(cpu=True))
    assert loaded and all(p.device == META for p in loaded[0].shadow_params)
