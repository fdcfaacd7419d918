"""DiT presets, embedder tying, save/load and the original-checkpoint converter (tiny models, CPU, seconds)."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file

from wat_nb.models import (PRESETS, build_dit, convert_original_dit, is_tied, load_dit, preset_config, save_dit,
                           split_output, tie_embedders)


def randomize(model, seed=0, scale=0.1):
    "Every parameter N(0, scale^2): no zero-initialised layer hides a wrong mapping."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def untied_tiny(seed=0, same_copies=True):
    "A plain diffusers DiT (tiny, 4 classes), optionally with the same embedder weights in every block."
    torch.manual_seed(seed)
    m = randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=6,
                                        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=4), seed)
    if same_copies:
        for b in m.transformer_blocks[1:]: b.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    return m


def inputs(seed=0, c=3, size=8, k=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, c, size, size, generator=g), torch.tensor([0, 437, 999]), torch.tensor([0, k - 1, k]))


def fwd(model, x, t, y):
    with torch.no_grad(): return model(x, t, y).sample


# --- presets and construction ---------------------------------------------------------------------------------

def test_bad_preset_lists_known_presets():
    with pytest.raises(ValueError) as e: build_dit('DiT-H/2', 10)
    for name in ('tiny', 'mini', 'DiT-S/2', 'DiT-B/4', 'DiT-L/8', 'DiT-XL/2'): assert name in str(e.value)
    with pytest.raises(ValueError, match='overridable fields'): build_dit('tiny', 3, hidden=64)


def test_presets_match_dit_paper_sizes():
    for name, (d, w, h) in {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}.items():
        for p in (2, 4, 8):
            cfg = PRESETS[f'DiT-{name}/{p}']
            assert (cfg['depth'], cfg['width'], cfg['heads'], cfg['patch_size']) == (d, w, h, p)
            assert (cfg['sample_size'], cfg['in_channels'], cfg['learn_sigma']) == (32, 4, True)
    assert preset_config('tiny') == dict(sample_size=8, patch_size=2, in_channels=3, width=32, depth=2, heads=2,
                                         learn_sigma=False)


def test_build_has_null_row_no_internal_label_dropout_and_is_tied():
    m = randomize(build_dit('tiny', num_classes=3, learn_sigma=True))
    emb = m.transformer_blocks[0].norm1.emb
    assert is_tied(m) and emb.class_embedder.embedding_table.num_embeddings == 4  # 3 classes + null (index 3)
    assert emb.class_embedder.dropout_prob == 0.0
    m.train()  # in train mode diffusers would drop labels at random if the embedder's dropout were still 0.1
    x, t, y = inputs(k=3)
    with torch.no_grad(): a, b = m(x, t, y).sample, m(x, t, y).sample
    assert torch.equal(a, b) and a.shape == (3, 6, 8, 8)
    # the null label is a real, distinct row
    assert not torch.allclose(fwd(m, x, t, torch.tensor([3, 3, 3])), fwd(m, x, t, torch.tensor([0, 0, 0])))


def test_dit_init_is_adaln_zero():
    m = build_dit('tiny', 4, seed=0)
    assert torch.count_nonzero(fwd(m, *inputs())) == 0  # zero output layer and zero modulation
    for b in m.transformer_blocks:
        assert torch.count_nonzero(b.norm1.linear.weight) == 0
    assert 0.01 < m.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.std() < 0.03


# --- tying ----------------------------------------------------------------------------------------------------

def test_tying_saves_parameters_and_preserves_output():
    untied = untied_tiny()
    tied = tie_embedders(copy.deepcopy(untied), freq_shift=1)  # diffusers' timestep convention, like `untied`
    n_untied, n_tied = (sum(p.numel() for p in m.parameters()) for m in (untied, tied))
    n_emb = sum(p.numel() for p in tied.transformer_blocks[0].norm1.emb.parameters())
    assert n_untied - n_tied == 2 * n_emb > 0
    assert is_tied(tied) and not is_tied(untied)
    torch.testing.assert_close(fwd(tied, *inputs()), fwd(untied, *inputs()), atol=1e-6, rtol=0)
    # one label table: a change through block 2 is seen by block 0 (and by the output layer)
    with torch.no_grad(): tied.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[1] += 1
    assert torch.equal(tied.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight,
                       tied.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight)


def test_timestep_convention_is_a_real_choice():
    untied = untied_tiny()
    orig = tie_embedders(copy.deepcopy(untied))  # default: the original DiT frequencies
    assert orig.config._timestep_freq_shift == 0
    assert (fwd(orig, *inputs()) - fwd(untied, *inputs())).abs().max() > 1e-3


def test_tying_refuses_different_copies():
    m = untied_tiny(same_copies=False)
    with pytest.raises(ValueError, match="block 1's timestep/label embedder differs"): tie_embedders(copy.deepcopy(m))
    with pytest.warns(UserWarning, match='differs'): assert is_tied(tie_embedders(copy.deepcopy(m), mismatch='warn'))
    assert is_tied(tie_embedders(copy.deepcopy(m), mismatch='ignore'))
    with pytest.raises(ValueError, match="mismatch must be"): tie_embedders(m, mismatch='maybe')


# --- saving and loading ---------------------------------------------------------------------------------------

def test_save_load_round_trip_equal_outputs_and_still_tied(tmp_path):
    m = randomize(build_dit('tiny', 4, learn_sigma=True), seed=3)
    save_dit(m, tmp_path / 'dit')
    assert sorted(p.name for p in (tmp_path / 'dit').iterdir()) == ['config.json', 'diffusion_pytorch_model.safetensors']
    back = load_dit(tmp_path / 'dit')
    assert is_tied(back) and back.config._timestep_freq_shift == 0
    assert torch.equal(fwd(back, *inputs()), fwd(m, *inputs()))
    # the written layout is diffusers' standard untied one: identical copies under every block
    plain = DiTTransformer2DModel.from_pretrained(tmp_path / 'dit')
    assert not is_tied(plain) and plain.config._timestep_freq_shift == 0
    e0, e1 = (plain.transformer_blocks[i].norm1.emb.state_dict() for i in (0, 1))
    assert all(torch.equal(e0[k], e1[k]) for k in e0)
    # a second save over the first, after training-like changes, replaces it
    with torch.no_grad(): m.proj_out_2.bias += 1
    save_dit(m, tmp_path / 'dit')
    assert torch.equal(fwd(load_dit(tmp_path / 'dit'), *inputs()), fwd(m, *inputs()))


def test_load_folder_from_plain_diffusers_save_pretrained(tmp_path):
    untied = untied_tiny()
    untied.save_pretrained(tmp_path / 'plain')  # no wat_nb involved; config lacks _timestep_freq_shift
    loaded = load_dit(tmp_path / 'plain', freq_shift=1)
    assert is_tied(loaded)
    torch.testing.assert_close(fwd(loaded, *inputs()), fwd(untied, *inputs()), atol=1e-6, rtol=0)
    assert load_dit(tmp_path / 'plain').config._timestep_freq_shift == 0  # default: original DiT convention
    untied_tiny(same_copies=False).save_pretrained(tmp_path / 'diverged')
    with pytest.raises(ValueError, match='differs from block 0'): load_dit(tmp_path / 'diverged')


def test_offline_uncached_hub_id_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, 'HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    with pytest.raises(FileNotFoundError) as e: load_dit('facebook/DiT-XL-2-256')
    msg = str(e.value)
    assert 'hf download facebook/DiT-XL-2-256 --include "transformer/*"' in msg and 'download=True' in msg
    with pytest.raises(FileNotFoundError, match='no folder'): load_dit(tmp_path / 'nothing' / 'here')


# --- the converter against an independent forward pass of the original DiT ---------------------------------------

def ref_pos_embed(width, grid):
    "Fixed 2D sin-cos position table of the original DiT (numpy, float64), shape (1, grid^2, width)."
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # w first
    return torch.from_numpy(np.concatenate([one_d(width // 2, gw), one_d(width // 2, gh)], axis=1)[None]).float()


def ref_timestep_embedding(t, dim=256, max_period=10000):
    "[cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2)), as in the original DiT."
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_dit_forward(sd, x, t, y, heads):
    "The original DiT architecture written out functionally from its paper, reading the original state dict."
    lin = lambda h, name: F.linear(h, sd[f'{name}.weight'], sd[f'{name}.bias'])
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)
    B, p = x.shape[0], sd['x_embedder.proj.weight'].shape[-1]
    h = F.conv2d(x, sd['x_embedder.proj.weight'], sd['x_embedder.proj.bias'], stride=p)  # (B, D, H/p, W/p)
    gh, gw = h.shape[-2:]
    h = h.flatten(2).transpose(1, 2) + sd['pos_embed']  # (B, N, D)
    D, N = h.shape[-1], h.shape[1]
    temb = lin(F.silu(lin(ref_timestep_embedding(t), 't_embedder.mlp.0')), 't_embedder.mlp.2')
    c = temb + sd['y_embedder.embedding_table.weight'][y]  # (B, D)
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    for i in range(depth):
        pre = f'blocks.{i}'
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = lin(F.silu(c), f'{pre}.adaLN_modulation.1').chunk(6, 1)
        a = ln(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        q, k, v = lin(a, f'{pre}.attn.qkv').reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * (D // heads) ** -0.5, dim=-1) @ v  # (B, heads, N, hd)
        h = h + gate_msa[:, None] * lin(att.transpose(1, 2).reshape(B, N, D), f'{pre}.attn.proj')
        m = ln(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = h + gate_mlp[:, None] * lin(F.gelu(lin(m, f'{pre}.mlp.fc1'), approximate='tanh'), f'{pre}.mlp.fc2')
    shift, scale = lin(F.silu(c), 'final_layer.adaLN_modulation.1').chunk(2, 1)
    h = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], 'final_layer.linear')  # (B, N, p*p*C)
    C = h.shape[-1] // (p * p)
    return h.reshape(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, gh * p, gw * p)


def original_state_dict(width=64, depth=2, patch=2, in_ch=4, grid=4, classes=3, learn_sigma=True, seed=0):
    "Random weights in facebookresearch/DiT's layout."
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    W, out = width, patch * patch * in_ch * (2 if learn_sigma else 1)
    sd = {'x_embedder.proj.weight': r(W, in_ch, patch, patch), 'x_embedder.proj.bias': r(W),
          'pos_embed': ref_pos_embed(W, grid),
          't_embedder.mlp.0.weight': r(W, 256), 't_embedder.mlp.0.bias': r(W),
          't_embedder.mlp.2.weight': r(W, W), 't_embedder.mlp.2.bias': r(W),
          'y_embedder.embedding_table.weight': r(classes + 1, W),
          'final_layer.adaLN_modulation.1.weight': r(2 * W, W), 'final_layer.adaLN_modulation.1.bias': r(2 * W),
          'final_layer.linear.weight': r(out, W), 'final_layer.linear.bias': r(out)}
    for i in range(depth):
        for name, shape in (('attn.qkv', (3 * W, W)), ('attn.proj', (W, W)), ('mlp.fc1', (4 * W, W)),
                            ('mlp.fc2', (W, 4 * W)), ('adaLN_modulation.1', (6 * W, W))):
            sd[f'blocks.{i}.{name}.weight'], sd[f'blocks.{i}.{name}.bias'] = r(*shape), r(shape[0])
    return sd


def test_converter_matches_independent_original_forward():
    sd = original_state_dict()
    model = convert_original_dit(sd, num_heads=4)
    c = model.config
    assert (c.num_layers, c.num_attention_heads, c.attention_head_dim, c.patch_size, c.sample_size) == (2, 4, 16, 2, 8)
    assert (c.in_channels, c.out_channels, c.num_embeds_ada_norm) == (4, 8, 3) and is_tied(model)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 1, 500, 999]), torch.tensor([0, 2, 3, 1])
    ref = ref_dit_forward(sd, x, t, y, heads=4)
    out = fwd(model, x, t, y)
    assert ref.abs().mean() > 0.1  # a meaningful, non-degenerate output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the comparison is sensitive: a swapped mapping or diffusers' timestep frequencies would fail it
    bad = copy.deepcopy(model)
    a = bad.transformer_blocks[1].attn1
    with torch.no_grad(): a.to_q.weight, a.to_k.weight = torch.nn.Parameter(a.to_k.weight.clone()), torch.nn.Parameter(a.to_q.weight.clone())
    assert (fwd(bad, x, t, y) - ref).abs().max() > 1e-3
    assert (fwd(convert_original_dit(sd, num_heads=4, freq_shift=1), x, t, y) - ref).abs().max() > 1e-3
    assert (fwd(convert_original_dit(sd, num_heads=2), x, t, y) - ref).abs().max() > 1e-3  # wrong head count


def test_converter_reads_pt_and_safetensors_and_infers_heads(tmp_path):
    sd = original_state_dict(width=384, depth=1, in_ch=4, classes=5, learn_sigma=False, seed=2)
    torch.save({'model': sd, 'ema': sd, 'opt': {}}, tmp_path / 'ckpt.pt')
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'ckpt.safetensors'))
    x, t, y = inputs(c=4, k=5)
    ref = ref_dit_forward(sd, x, t, y, heads=6)
    for f in ('ckpt.pt', 'ckpt.safetensors'):
        m = load_dit(tmp_path / f)
        assert m.config.num_attention_heads == 6 and m.config.out_channels == 4 and is_tied(m)
        torch.testing.assert_close(fwd(m, x, t, y), ref, atol=1e-5, rtol=1e-5)


def test_converter_rejects_unsafe_and_malformed_checkpoints(tmp_path):
    import argparse
    sd = original_state_dict()
    torch.save({'model': sd, 'args': argparse.Namespace(lr=1e-4)}, tmp_path / 'train.pt')
    with pytest.raises(ValueError, match='weights_only=True'): convert_original_dit(tmp_path / 'train.pt', num_heads=4)
    with pytest.raises(ValueError, match='not an original DiT state dict'): convert_original_dit({'a.weight': torch.ones(1)})
    with pytest.raises(ValueError, match='pass num_heads'): convert_original_dit(sd)  # width 64 is no DiT size
    with pytest.raises(FileNotFoundError): convert_original_dit(tmp_path / 'missing.pt')


def test_split_output():
    m = build_dit('tiny', 4, in_channels=4, learn_sigma=True)
    out = m(*inputs(c=4))
    eps, v = split_output(m, out)
    assert eps.shape == v.shape == (3, 4, 8, 8) and torch.equal(torch.cat([eps, v], 1), out.sample)
    e2, none = split_output(3, torch.zeros(2, 3, 4, 4))
    assert none is None and e2.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match='expected 3 or 6'): split_output(3, torch.zeros(2, 5, 4, 4))


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", [("mini", "UNet2DModel"), ("mini-dit", "DiTTransformer2DModel")])
def test_committed_mini_weights_load_and_draw_their_classes(monkeypatch, name, kind):
    """The weights shipped in wat_nb/weights/<name>: small enough to commit, fp32 on load, the right backbone (a tied
    DiT for mini-dit), and a real model: its class-conditional samples are recognised far above chance (1/32) by a
    classifier trained on real shapes."""
    from pathlib import Path
    import wat_nb
    from wat_nb.models import null_label, pretrained
    from wat_nb.recognition import judge_model, shapes_factors, train_recognizer
    folder = Path(wat_nb.__file__).resolve().parent / "weights" / name
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 20 * 2**20
    monkeypatch.delenv("WAT_NB_PRETRAINED", raising=False)
    model = pretrained(name)
    assert type(model).__name__ == kind and null_label(model) == 32 and model.config.sample_size == 16
    assert kind != "DiTTransformer2DModel" or is_tied(model)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    torch.manual_seed(0)
    judge, acc = train_recognizer("shapes", image_size=16, epochs=4, progress=False)  # the cached one of 08a, if made
    assert acc > 0.9
    res = judge_model(model, judge, per_class=1, steps=25, factors=shapes_factors, progress=False)  # 32 samples
    assert res["hue"] > 0.9 and res["overall"] > 0.5, {k: res[k] for k in ("overall", "shape", "hue")}


def test_load_dit_finds_transformer_in_a_pipeline_folder(tmp_path):
    "`hf download facebook/DiT-XL-2-256 --local-dir X` gives X/model_index.json, X/transformer/, X/vae/, X/scheduler/."
    import json
    m = build_dit('tiny', 4, seed=0)
    save_dit(m, tmp_path / 'pipeline' / 'transformer')
    (tmp_path / 'pipeline' / 'model_index.json').write_text(json.dumps({'_class_name': 'DiTPipeline',
                                                                        'transformer': ['diffusers', 'DiTTransformer2DModel']}))
    back = load_dit(tmp_path / 'pipeline', device='cpu')
    assert is_tied(back) and all(torch.equal(v, m.state_dict()[k]) for k, v in back.state_dict().items())
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='has no config.json'): load_dit(tmp_path / 'empty')
