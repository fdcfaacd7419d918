"""End-to-end checks of wat_nb.finetune: exact resume after SIGKILL, the divergence guard, two processes through
`accelerate launch`, label maps, label dropout and the timestep range."""
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wat_nb.finetune import (batch_indices, diffusion_loss, finetune, latest_checkpoint, list_checkpoints,
                             load_finetuned, posterior_terms, read_log, step_draws)
from wat_nb.gaussian import ddpm_scheduler

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import ToyDataset, config, tiny_model  # noqa: E402

torch.set_num_threads(1)  # tiny models on a shared CPU
REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / '_train_worker.py'
WEIGHTS = 'diffusion_pytorch_model.safetensors'


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))


def _worker(*args, timeout=300):
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _weights(ckpt: Path, part: str) -> dict:
    return load_file(str(ckpt / part / WEIGHTS))


def _assert_same_weights(a: Path, b: Path):
    for part in ('model', 'ema'):
        wa, wb = _weights(a, part), _weights(b, part)
        assert wa.keys() == wb.keys()
        for k in wa: assert torch.equal(wa[k], wb[k]), f"{part}/{k} differs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class Recorder:
    "Forward pre-hook that keeps the timesteps and class labels the model is called with."
    def __init__(self, model):
        self.t, self.y = [], []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.t.append(kwargs['timestep'].cpu()); self.y.append(kwargs['class_labels'].cpu())


def _run(model, ds, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return finetune(model, ds, config(out, **kw))


# ---------------------------------------------------------------- resume

@pytest.mark.slow
def test_sigkill_resume_equals_uninterrupted(tmp_path):
    killed = tmp_path / 'killed'
    r = _worker('--out', killed, '--steps', 6, '--ckpt-every', 2, '--kill-after', 4, '--learn-sigma')
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert latest_checkpoint(killed).name == 'step-0000004'
    assert [p.name for p in list_checkpoints(killed)] == ['step-0000002', 'step-0000004']
    stale = killed / 'checkpoints' / '.tmp-step-0000006-12345'  # as if killed in the middle of a save
    stale.mkdir(); (stale / 'junk').write_text('half a checkpoint')
    r = _worker('--out', killed, '--steps', 6, '--ckpt-every', 2, '--learn-sigma')
    assert r.returncode == 0, r.stderr[-3000:]
    assert not stale.exists()

    straight = tmp_path / 'straight'
    res = _run(tiny_model(learn_sigma=True), ToyDataset(), straight, steps=6, ckpt_every=2)
    assert res.step == 6 and latest_checkpoint(killed).name == res.checkpoint.name == 'step-0000006'
    _assert_same_weights(latest_checkpoint(killed), res.checkpoint)
    la, lb = read_log(killed), read_log(straight)
    assert la['step'].tolist() == lb['step'].tolist() == [1, 2, 3, 4, 5, 6]
    assert la['loss'].tolist() == lb['loss'].tolist()
    assert (la['loss'] > la['mse']).all()  # learned variance: the L_vb term is in the loss
    st = json.loads((res.checkpoint / 'state.json').read_text())
    assert st['step'] == 6 and st['config']['lr'] == 1e-3 and st['versions']['torch'] == torch.__version__
    assert st['ema']['optimization_step'] == 6


def test_rerun_of_finished_run_is_a_no_op(tmp_path):
    res = _run(tiny_model(), ToyDataset(), tmp_path, steps=2, ckpt_every=2)
    before = (res.checkpoint / 'model' / WEIGHTS).stat().st_mtime_ns
    again = _run(tiny_model(), ToyDataset(), tmp_path, steps=2, ckpt_every=2)
    assert again.checkpoint == res.checkpoint and again.step == 2
    assert (res.checkpoint / 'model' / WEIGHTS).stat().st_mtime_ns == before
    assert read_log(tmp_path)['step'].tolist() == [1, 2]


def test_resume_refuses_a_different_label_map(tmp_path):
    _run(tiny_model(), ToyDataset(), tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"label_map='identity'.*\[3, 2, 1, 0\]"):
        _run(tiny_model(), ToyDataset(), tmp_path, steps=4, label_map=[3, 2, 1, 0])


# ---------------------------------------------------------------- divergence

def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    _run(tiny_model(), ToyDataset(), tmp_path, steps=4, ckpt_every=2)
    good = latest_checkpoint(tmp_path)
    digest = {p.relative_to(good): hashlib.sha256(p.read_bytes()).hexdigest() for p in good.rglob('*') if p.is_file()}
    with pytest.raises(FloatingPointError) as e:
        _run(tiny_model(), ToyDataset(), tmp_path, steps=10, ckpt_every=2, lr=1e30)
    msg = str(e.value)
    m = re.search(r"at step (\d+) \(lr=1e\+30\)", msg)
    assert m and int(m.group(1)) > 4, msg
    assert str(good) in msg
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in list_checkpoints(tmp_path)] == ['step-0000002', 'step-0000004']
    assert not list((tmp_path / 'checkpoints').glob('.tmp-*'))
    assert digest == {p.relative_to(good): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in good.rglob('*') if p.is_file()}
    for ema in (False, True):
        assert all(torch.isfinite(p).all() for p in load_finetuned(tmp_path, ema=ema).parameters())
    log = read_log(tmp_path)
    assert not math.isfinite(log['loss'][-1]) and log['step'][-1] == int(m.group(1))


# ---------------------------------------------------------------- two processes

@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tmp_path):
    out, info = tmp_path / 'run', tmp_path / 'info'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(_free_port()), str(WORKER),
           '--out', str(out), '--steps', '4', '--ckpt-every', '2', '--batch', '8', '--info-dir', str(info)]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = {json.loads(f.read_text())['rank']: json.loads(f.read_text()) for f in info.glob('rank*.json')}
    assert sorted(ranks) == [0, 1] and all(v['world'] == 2 and v['step'] == 4 for v in ranks.values())
    assert ranks[0]['pid'] != ranks[1]['pid']
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == ['step-0000002', 'step-0000004']
    for c in ckpts:  # written by rank 0 alone
        st = json.loads((c / 'state.json').read_text())
        assert (st['writer_rank'], st['pid'], st['world_size']) == (0, ranks[0]['pid'], 2)
        assert len(json.loads((c / 'rng.json').read_text())) == 2  # RNG states of both processes
    assert not list((out / 'checkpoints').glob('.tmp-*'))
    assert sorted(os.listdir(out)) == ['checkpoints', 'config.json', 'latest', 'log.csv']
    # the global batch does not depend on the number of processes: one process sees the same losses
    one = _run(tiny_model(), ToyDataset(), tmp_path / 'one', steps=4, ckpt_every=2)
    two_log, one_log = read_log(out), read_log(one.run_dir)
    assert two_log['step'].tolist() == [1, 2, 3, 4]
    assert abs(two_log['loss'][0] - one_log['loss'][0]) < 1e-6
    assert abs(two_log['loss'] - one_log['loss']).max() < 1e-4


def test_bf16_run(tmp_path):
    r = _worker('--out', tmp_path, '--steps', 2, '--ckpt-every', 2, '--mixed-precision', 'bf16', '--learn-sigma')
    assert r.returncode == 0, r.stderr[-3000:]
    assert math.isfinite(read_log(tmp_path)['loss'][-1])
    assert json.loads((latest_checkpoint(tmp_path) / 'state.json').read_text())['config']['mixed_precision'] == 'bf16'


# ---------------------------------------------------------------- labels and timesteps

def _expected_labels(ds, lut, steps, batch, seed=0):
    targets = torch.tensor(ds.targets)
    return [lut[targets[batch_indices(len(ds), batch, s, seed)]] for s in range(steps)]


@pytest.mark.parametrize('label_map,num_classes,lut', [
    ('identity', 6, [0, 1, 2, 3]),
    ([5, 0, 3, 1], 6, [5, 0, 3, 1]),
    ({0: 2, 1: 4, 2: 0, 3: 5}, 6, [2, 4, 0, 5]),
])
def test_label_maps_reach_the_model(tmp_path, label_map, num_classes, lut):
    ds, model = ToyDataset(), tiny_model(num_classes)
    rec = Recorder(model)
    res = _run(model, ds, tmp_path, steps=4, label_map=label_map, label_dropout=0.0)
    want = _expected_labels(ds, torch.tensor(lut), 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(rec.y, want))
    st = json.loads((res.checkpoint / 'state.json').read_text())
    assert st['label_lookup'] == lut and st['null_label'] == num_classes


def test_reinit_label_map(tmp_path):
    ds, model = ToyDataset(num_classes=6), tiny_model(4)  # 6 target classes, 4 source classes
    old = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.detach().clone()
    rec = Recorder(model)
    res = _run(model, ds, tmp_path, steps=6, label_map='reinit', label_dropout=0.5)
    y = torch.cat(rec.y)
    assert y.max() == 6 and set(y.tolist()) <= set(range(7))  # 6 is the new null label
    back = load_finetuned(tmp_path)
    table = back.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert back.config.num_embeds_ada_norm == 6 and table.num_embeddings == 7 and old.shape[0] == 5
    assert json.loads((res.checkpoint / 'state.json').read_text())['null_label'] == 6
    with pytest.raises(ValueError, match='at most 4 target classes'):
        _run(tiny_model(4), ds, tmp_path / 'identity', steps=2)


@pytest.mark.parametrize('label_map,match', [
    ([0, 1, 2], '3 entries but the target has 4'),
    ([0, 1, 2, 9], 'outside the model'),
    ([0, 1, 2, 6], '6 is the null label'),
    ([0, 1, 1, 2], 'target classes 1 and 2 to the same class 1'),
    ('random', 'unknown label map'),
    ({0: 1, 1: 2, 3: 0, 4: 3}, 'missing'),
])
def test_bad_label_maps(tmp_path, label_map, match):
    with pytest.raises(ValueError, match=match):
        _run(tiny_model(6), ToyDataset(), tmp_path, steps=2, label_map=label_map)
    assert not (tmp_path / 'latest').exists()


def test_label_dropout_to_the_models_null_label(tmp_path):
    ds, model = ToyDataset(), tiny_model(7)  # null label 7, not the target's class count 4
    rec = Recorder(model)
    _run(model, ds, tmp_path, steps=40, batch_size=16, ckpt_every=40, log_every=20, label_dropout=0.1)
    y = torch.cat(rec.y)
    drop = torch.cat([step_draws(0, s, 16, (3, 8, 8), (0, 1000), 0.1)[1] for s in range(40)])
    assert torch.equal(y == 7, drop)  # exactly the step's mask, once per sample
    assert abs(drop.float().mean().item() - 0.1) < 0.04
    want = torch.cat(_expected_labels(ds, torch.arange(4), 40, 16))
    assert torch.equal(y[~drop], want[~drop]) and set(y.tolist()) <= {0, 1, 2, 3, 7}


@pytest.mark.parametrize('t_range', [(0, 600), (990, 1000)])
def test_timestep_range(tmp_path, t_range):
    model = tiny_model()
    rec = Recorder(model)
    _run(model, ToyDataset(), tmp_path, steps=30, batch_size=16, ckpt_every=30, log_every=30, t_range=t_range)
    t = torch.cat(rec.t)
    assert t.min() >= t_range[0] and t.max() < t_range[1]
    assert t.max() >= t_range[1] - 10 and t.min() <= t_range[0] + 10  # the whole range is used


def test_vb_trains_only_the_variance():
    sch = ddpm_scheduler(); terms = posterior_terms(sch)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    xt = sch.add_noise(x0, noise, t)
    out = torch.randn(4, 6, 4, 4, generator=g).requires_grad_()
    loss, mse = diffusion_loss(out, x0, xt, noise, t, terms)
    loss.backward()
    want_eps_grad = 2 * (out[:, :3] - noise) / noise.numel()  # d mse / d eps alone
    assert torch.allclose(out.grad[:, :3], want_eps_grad, atol=1e-7)
    assert out.grad[1:, 3:].abs().min() > 0 and out.grad[0, 3:].abs().max() > 0 and loss > mse  # t > 0: KL; t = 0: NLL
    fixed, fixed_mse = diffusion_loss(out[:, :3], x0, xt, noise, t, terms)
    assert torch.equal(fixed, fixed_mse)


def test_internal_label_dropout_is_switched_off(tmp_path):
    model = tiny_model()
    emb = model.transformer_blocks[0].norm1.emb.class_embedder
    emb.dropout_prob = 0.1  # as a plain diffusers DiT comes: it would drop labels a second time
    with pytest.warns(UserWarning, match='internal label dropout 0.1'):
        finetune(model, ToyDataset(), config(tmp_path, steps=2))
    assert emb.dropout_prob == 0.0


def test_resume_on_a_latent_cache_equals_uninterrupted(tmp_path):
    # Cached latents draw a random flip and a fresh sample per access; keyed by the step, resuming is still exact.
    from wat_nb.codecs import LatentCache, PixelCodec, cache_latents

    class Gaussianised(ToyDataset):
        name, transform = 'toy', 'none'
    folder = cache_latents(Gaussianised(), PixelCodec(), split='train', root=tmp_path / 'cache', progress=False)
    lat = lambda: LatentCache(folder, flip='random')
    _run(tiny_model(), lat(), tmp_path / 'resumed', steps=4, ckpt_every=2)
    resumed = _run(tiny_model(), lat(), tmp_path / 'resumed', steps=6, ckpt_every=2)
    straight = _run(tiny_model(), lat(), tmp_path / 'straight', steps=6, ckpt_every=2)
    _assert_same_weights(resumed.checkpoint, straight.checkpoint)
    flipped = _run(tiny_model(), LatentCache(folder, flip='none'), tmp_path / 'noflip', steps=6, ckpt_every=2)
    wa, wb = _weights(flipped.checkpoint, 'model'), _weights(straight.checkpoint, 'model')
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)   # the flips really reach the model


def test_warmup_and_min_snr_resume_exactly(tmp_path):
    kw = dict(ckpt_every=2, log_every=1, warmup_steps=4, min_snr_gamma=5.0, grad_clip=1.0)
    _run(tiny_model(), ToyDataset(), tmp_path / 'resumed', steps=3, **kw)
    resumed = _run(tiny_model(), ToyDataset(), tmp_path / 'resumed', steps=6, **kw)
    straight = _run(tiny_model(), ToyDataset(), tmp_path / 'straight', steps=6, **kw)
    _assert_same_weights(resumed.checkpoint, straight.checkpoint)
    lr = read_log(tmp_path / 'straight')['lr'].tolist()
    assert lr == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])   # linear warmup to lr=1e-3 over 4 steps
    _run(tiny_model(), ToyDataset(), tmp_path / 'plain', steps=6, ckpt_every=2, log_every=1)
    la, lb = read_log(tmp_path / 'straight'), read_log(tmp_path / 'plain')
    assert la['mse'][0] == pytest.approx(lb['mse'][0])      # same data and model at step 1 ...
    assert (la['loss'] < la['mse']).any()                   # ... but low-noise samples are down-weighted


# ---------------------------------------------------------------- large models: disk and file modes

def test_paper_preset_keeps_one_checkpoint_and_a_bf16_final_ema(tmp_path):
    from wat_nb.finetune import finetune_config
    paper, mini = finetune_config('paper'), finetune_config('mini')
    assert (paper.keep_last, paper.final_ema_dtype, mini.final_ema_dtype) == (1, 'bf16', None)
    with pytest.raises(ValueError, match='final_ema_dtype'): finetune_config('mini', final_ema_dtype='int8')
    res = _run(tiny_model(), ToyDataset(), tmp_path, steps=4, keep_last=1, final_ema_dtype='bf16')
    assert [p.name for p in list_checkpoints(tmp_path)] == ['step-0000004']
    final = load_file(str(tmp_path / 'final' / 'ema' / WEIGHTS))
    ema32 = _weights(res.checkpoint, 'ema')
    assert final.keys() == ema32.keys() and all(v.dtype == torch.bfloat16 for v in final.values())
    assert all(torch.equal(final[k], ema32[k].to(torch.bfloat16)) for k in final)
    sampled = load_finetuned(tmp_path, device='cpu', dtype=torch.bfloat16)  # the run's EMA for sampling: the bf16 copy
    assert next(sampled.parameters()).dtype == torch.bfloat16
    assert torch.equal(sampled.pos_embed.proj.weight, final['pos_embed.proj.weight'])
    assert torch.equal(load_finetuned(tmp_path, device='cpu').pos_embed.proj.weight, final['pos_embed.proj.weight'].float())
    for where in (tmp_path, res.checkpoint):  # the fp32 weights stay reachable
        assert next(load_finetuned(where, ema=False, device='cpu').parameters()).dtype == torch.float32
    assert next(load_finetuned(res.checkpoint, device='cpu').parameters()).dtype == torch.float32
    _run(tiny_model(), ToyDataset(), tmp_path, steps=6, keep_last=1, final_ema_dtype='bf16')  # extended: final follows
    assert json.loads((tmp_path / 'final' / 'state.json').read_text())['step'] == 6
    assert torch.equal(load_finetuned(tmp_path, device='cpu').pos_embed.proj.weight,
                       _weights(latest_checkpoint(tmp_path), 'ema')['pos_embed.proj.weight'].to(torch.bfloat16))


def _modes(root: Path) -> dict:
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in [root, *root.rglob('*')]}


def test_run_and_sample_set_are_world_readable_under_a_private_umask(tmp_path):
    from wat_nb.models import build_dit
    from wat_nb.sampling import generate
    old = os.umask(0o077)
    try:
        _run(tiny_model(), ToyDataset(), tmp_path / 'run', steps=2, final_ema_dtype='bf16')
        generate(build_dit('tiny', 2, init='diffusers', seed=0), n_per_class=1, mode='none', w=0, steps=2,
                 out_dir=tmp_path / 'samples', progress=False)
    finally:
        os.umask(old)
    for root in (tmp_path / 'run', tmp_path / 'samples'):
        modes = _modes(root)
        bad = {k: m for k, m in modes.items() if m != ('0o755' if (root / k).is_dir() else '0o644')}
        assert not bad, bad
    assert 'checkpoints/step-0000002/ema/config.json' in _modes(tmp_path / 'run')


def test_hooks_change_the_step_and_nothing_else(tmp_path):
    from wat_nb.finetune import TrainHooks
    seen = []
    def target(eps, xt, t):
        seen.append(tuple(eps.shape))
        return torch.zeros_like(eps)                      # regress onto 0: the loss is then the output's mean square
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        finetune(tiny_model(), ToyDataset(), config(tmp_path / 'plain', steps=2, ckpt_every=2, log_every=1))
        finetune(tiny_model(), ToyDataset(), config(tmp_path / 'hooked', steps=2, ckpt_every=2, log_every=1),
                 hooks=TrainHooks(target=target))
    assert len(seen) == 2 and all(s[0] > 0 for s in seen)  # called once per step, with the step's noise
    plain, hooked = read_log(tmp_path / 'plain'), read_log(tmp_path / 'hooked')
    assert not torch.allclose(torch.as_tensor(plain["mse"]), torch.as_tensor(hooked["mse"]))
    assert (tmp_path / 'hooked' / 'latest').is_file()
