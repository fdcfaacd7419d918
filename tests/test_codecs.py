"""Codecs (pixel, tiny VAE) and the on-disk latent cache: keys, resume, flips, seeded reads (CPU, seconds)."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from wat_nb.codecs import (LatentCache, PixelCodec, VAECodec, cache_description, cache_key, cache_latents,
                           latent_dataset)
from wat_nb.core import from_uint8, to_uint8


class Images(Dataset):
    "A deterministic labelled image set (image float32 (3, H, W) in [-1, 1], int label) like wat_nb.data's."
    def __init__(self, n=7, size=16, k=3, seed=0, name='imgs', transform='center-crop(16)'):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.targets, self.classes, self.name, self.transform = [(i * 2) % k for i in range(n)], list('abc')[:k], name, transform
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.targets[i]


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
    "A tiny randomly initialised AutoencoderKL written by diffusers' save_pretrained (factor 2, 4 latent channels)."
    d = tmp_path_factory.mktemp('vae') / 'tiny-vae'
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2).save_pretrained(d)
    return d


class Interrupted(Exception): pass


def interrupting(codec, after):
    "Wrap `codec` so its encode_dist raises after `after` calls; count the calls."
    calls = {'n': 0}
    inner = codec.encode_dist
    def encode_dist(x):
        calls['n'] += 1
        if after is not None and calls['n'] > after: raise Interrupted()
        return inner(x)
    codec.encode_dist = encode_dist
    return codec, calls


def test_uint8_round_trip():
    u = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    x = from_uint8(u)
    assert x.shape == (2, 3, 5, 6) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), u)
    assert torch.equal(to_uint8(x, hwc=False), torch.from_numpy(u).permute(0, 3, 1, 2))
    assert torch.equal(from_uint8(torch.from_numpy(u).permute(0, 3, 1, 2)), x)


def test_vae_codec_shapes_seeded_sampling_and_decode(vae_dir):
    codec = VAECodec(vae_dir, device='cpu', dtype=torch.float32, batch_size=2)
    x = Images(n=5).x
    assert codec.latent_shape(16) == (4, 8, 8) and codec.latent_shape((3, 16, 32)) == (4, 8, 16)
    z = codec.encode(x, generator=torch.Generator().manual_seed(7))
    assert z.shape == (5, 4, 8, 8) and z.dtype == torch.float32
    assert torch.equal(codec.encode(x, generator=torch.Generator().manual_seed(7)), z)
    assert not torch.equal(codec.encode(x, generator=torch.Generator().manual_seed(8)), z)
    # the scale is applied: a codec with scale 1 gives latents 1/0.18215 times larger
    mean, _ = codec.encode_dist(x)
    mean1, _ = VAECodec(vae_dir, scale=1.0).encode_dist(x)
    torch.testing.assert_close(mean1 * 0.18215, mean, atol=1e-5, rtol=1e-5)
    # DiT's way: sample from the latent distribution, times 0.18215
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad(): ref = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(3)) * 0.18215
    torch.testing.assert_close(VAECodec(vae_dir, batch_size=64).encode(x, generator=torch.Generator().manual_seed(3)), ref)
    with torch.no_grad(): ref_dec = vae.decode(z / 0.18215).sample.clamp(-1, 1)
    dec = codec.decode(z)
    assert dec.shape == (5, 3, 16, 16) and dec.abs().max() <= 1
    torch.testing.assert_close(dec, ref_dec, atol=1e-5, rtol=1e-5)


def test_vae_offline_uncached_hub_id_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, 'HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    with pytest.raises(FileNotFoundError) as e: VAECodec('stabilityai/sd-vae-ft-ema')
    assert 'hf download stabilityai/sd-vae-ft-ema' in str(e.value) and 'download=True' in str(e.value)


def test_cache_key_changes_with_transform_size_split_codec_and_content(vae_dir):
    pix, vae = PixelCodec(), VAECodec(vae_dir)
    key = lambda ds, codec=pix, split='train', **kw: cache_key(cache_description(ds, codec, split, **kw))
    k = key(Images())
    assert key(Images()) == k
    assert key(Images(transform='center-crop(16)+normalize')) != k
    assert key(Images(), transform='explicit description') != k
    assert key(Images(size=8)) != k
    assert key(Images(), split='test') != k
    assert key(Images(), codec=vae) != k
    import shutil  # the codec key names the weights, not the folder they were read from
    assert VAECodec(shutil.copytree(vae_dir, vae_dir.parent / 'moved' / 'vae')).key == vae.key
    assert VAECodec(vae_dir, scale=1.0).key != vae.key
    assert key(Images(seed=1)) != k
    relabelled = Images(); relabelled.targets = relabelled.targets[::-1]
    assert key(relabelled) != k
    # a lambda's repr carries a memory address: the key must not depend on it
    a, b = Images(transform=None), Images(transform=None)
    a.transform, b.transform = (lambda v: v), (lambda v: v)
    assert key(a) == key(b)


def test_flip_is_really_the_flip(tmp_path, vae_dir):
    ds = Images(n=5)
    pix = LatentCache(cache_latents(ds, PixelCodec(), root=tmp_path, chunk_size=2, progress=False), flip='both')
    assert torch.equal(pix.means(), ds.x) and torch.equal(pix.means(flipped=True), torch.flip(ds.x, dims=[3]))
    assert torch.equal(pix[5 + 3][0][:, :, 0], ds.x[3][:, :, -1])  # the flip's first column is the last column
    codec = VAECodec(vae_dir)
    vae = LatentCache(cache_latents(ds, codec, root=tmp_path, chunk_size=2, progress=False), flip='both', sample=False)
    ref_m, ref_s = codec.encode_dist(torch.flip(ds.x, dims=[3]))
    torch.testing.assert_close(vae.means(flipped=True), ref_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae.std[:, 1], ref_s, atol=1e-5, rtol=1e-5)
    assert len(vae) == 10 and vae.targets == ds.targets * 2 and vae[7][1] == ds.targets[2]


@pytest.mark.parametrize('use_vae', [False, True])
def test_interrupted_cache_resumes_to_the_uninterrupted_one(tmp_path, vae_dir, use_vae):
    make = (lambda: VAECodec(vae_dir)) if use_vae else PixelCodec
    ds = Images(n=7)
    kw = dict(chunk_size=3, batch_size=2, progress=False)
    codec, calls = interrupting(make(), after=3)  # chunk 0 (2 batches) finishes, chunk 1 dies in its 2nd batch
    with pytest.raises(Interrupted): cache_latents(ds, codec, root=tmp_path / 'a', **kw)
    folder = next((tmp_path / 'a' / 'latents').iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ['chunk_00000.safetensors']
    (folder / 'chunk_00001.safetensors.tmp').write_bytes(b'half a file')  # as if killed while writing
    with pytest.raises(FileNotFoundError, match='not a finished latent cache'): LatentCache(folder)
    codec, calls = interrupting(make(), after=None)
    assert cache_latents(ds, codec, root=tmp_path / 'a', **kw) == folder
    assert calls['n'] == 3  # chunk 1 (2 batches) and chunk 2 (1 batch) only
    assert not list(folder.glob('*.tmp'))
    fresh = cache_latents(ds, make(), root=tmp_path / 'b', **kw)
    for i in range(3):
        a, b = (load_file(str(f / f'chunk_{i:05d}.safetensors')) for f in (folder, fresh))
        assert sorted(a) == sorted(b) == (['labels', 'mean', 'std'] if use_vae else ['labels', 'mean'])
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished cache is reused without encoding anything
    codec, calls = interrupting(make(), after=0)
    assert cache_latents(ds, codec, root=tmp_path / 'a', **kw) == folder and calls['n'] == 0


def test_corrupt_or_foreign_chunk_is_redone(tmp_path):
    ds, kw = Images(n=6), dict(chunk_size=3, progress=False)
    folder = cache_latents(ds, PixelCodec(), root=tmp_path, **kw)
    (folder / 'meta.json').unlink()
    (folder / 'chunk_00001.safetensors').write_bytes(b'garbage')
    codec, calls = interrupting(PixelCodec(), after=None)
    cache_latents(ds, codec, root=tmp_path, **kw)
    assert calls['n'] == 1 and torch.equal(LatentCache(folder).means(), ds.x)


def test_latent_dataset_reads_seeded_random_flips_and_fresh_draws(tmp_path, vae_dir):
    ds = Images(n=4)
    open_ = lambda **kw: latent_dataset(ds, VAECodec(vae_dir), root=tmp_path, progress=False, **kw)
    a, b, c = open_(seed=0), open_(seed=0), open_(seed=1)
    ra, rb, rc = ([d[1][0] for _ in range(8)] for d in (a, b, c))
    assert all(torch.equal(u, v) for u, v in zip(ra, rb))
    assert not all(torch.equal(u, v) for u, v in zip(ra, rc))
    assert len({tuple(z.flatten()[:4].tolist()) for z in ra}) == 8  # a fresh draw every access
    mean = open_(sample=False, flip='none')
    assert torch.equal(mean[1][0], mean.means()[1]) and mean[1][1] == ds.targets[1]
    with pytest.raises(ValueError, match="flip must be"): LatentCache(a.folder, flip='sometimes')
    with pytest.raises(IndexError): a[4]


def test_dataloader_workers_draw_differently_each_epoch_and_reproducibly(tmp_path):
    ds = Images(n=8, size=4)
    cache = latent_dataset(ds, PixelCodec(), root=tmp_path, progress=False, flip='random', seed=0)
    def epochs(seed):
        dl = DataLoader(cache, batch_size=8, num_workers=2, generator=torch.Generator().manual_seed(seed))
        return [torch.cat([x for x, _ in dl]) for _ in range(2)]
    e1, e2 = epochs(0)
    flips = lambda z: [not torch.equal(z[i], ds.x[i]) for i in range(len(z))]
    assert flips(e1) != flips(e2)  # 2^-8 chance of a false failure is avoided by the fixed seeds
    assert all(torch.equal(u, v) for u, v in zip(epochs(0), (e1, e2)))


def test_deterministic_dataset_required_and_empty_rejected():
    class Jitter(Images):
        def __getitem__(self, i): return self.x[i] + 0.01 * torch.randn(()), self.targets[i]
    with pytest.raises(ValueError, match='deterministic transform'): cache_description(Jitter(), PixelCodec())
    with pytest.raises(ValueError, match='empty'): cache_description(Images(n=0), PixelCodec())


def _png_folder(root, n_per_class=3, size=20, seed=0):
    "An image folder root/{train,test}/<class>/*.png of random, left-right asymmetric RGB images."
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ('train', 'test'):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f'{i}.png')
    return root


def test_file_backed_train_set_with_random_flip_caches_one_deterministic_view(tmp_path):
    from wat_nb.data import load_dataset
    ds = load_dataset(_png_folder(tmp_path / 'folder'), split='train', image_size=16)
    assert ds.flip  # file-backed training sets flip at random inside their transform
    folders = {latent_dataset(ds, PixelCodec(), root=tmp_path / 'data', progress=False).folder for _ in range(6)}
    assert len(folders) == 1 and len(list((tmp_path / 'data' / 'latents').iterdir())) == 1  # one key, one cache
    cache = LatentCache(folders.pop(), flip='both')
    plain = load_dataset(tmp_path / 'folder', split='train', image_size=16, flip=False)
    x = torch.stack([plain[i][0] for i in range(len(plain))])
    assert torch.equal(cache.means(), x) and torch.equal(cache.means(flipped=True), x.flip(-1))  # flip after the cache
    assert ds.flip and ds.transform.flip  # the caller's dataset is left as it was


def test_vae_codec_finds_vae_in_a_pipeline_folder(tmp_path, vae_dir):
    import json, shutil
    pipe = tmp_path / 'pipeline'
    shutil.copytree(vae_dir, pipe / 'vae')
    (pipe / 'model_index.json').write_text(json.dumps({'_class_name': 'DiTPipeline', 'vae': ['diffusers', 'AutoencoderKL']}))
    assert VAECodec(pipe).key == VAECodec(vae_dir).key
