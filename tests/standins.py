"""Stand-ins in the real formats of the paper profile, small enough to build in seconds on a CPU.

- `tiny_vae`: a random diffusers `AutoencoderKL` with 4 latent channels and 8x downsampling (4 levels).
- `dit_pipeline`: a folder laid out like the hub's `facebook/DiT-XL-2-256` (`model_index.json`, `transformer/`,
  `vae/`, `scheduler/`), its transformer a small random DiT with 1000 classes + null, 4 input channels, 8 output
  channels (learned sigma), 32x32 latents, patch 2.
- `original_dit_state_dict` / `write_original_dit`: the same weights as a facebookresearch/DiT state dict (the inverse
  of `wat_nb.models.convert_original_dit`), saved with `torch.save` of a plain dict of tensors.
- `sun_dataset`: SUN397's layout (`sun/SUN397/ClassName.txt`, `SUN397/<letter>/<class>/sun_*.jpg`, 300x400 JPEGs,
  optional `Training_01.txt` / `Testing_01.txt`) under a data root.
- `image_folder`: a folder of class sub-folders of JPEGs (source-domain images for ANT).
- `fidelity_weights`: the files torch-fidelity reads from the torch hub folder for FID (Inception-V3 weights with the
  real keys and shapes, random values) and FD_DINOv2 (`facebookresearch_dinov2_main/hubconf.py` plus its
  `checkpoints/dinov2_vitl14_pretrain.pth`; a small random network with DINOv2 ViT-L/14's 1024-d output stands in
  for the 300M-parameter ViT).
- `paper_standins`: all of them under one folder, with the environment variables that point the library at them.

Used by the tests and by benchmarks/gpu_check.py; run `python tests/standins.py DIR` to build them into DIR.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

NUM_SOURCE_CLASSES = 1000            # ImageNet classes of DiT-XL/2; the null label is 1000
SUN_CLASSES = ("abbey", "bakery/shop", "canyon", "harbor")   # a nested name, as SUN397 has ("bakery/shop")
DINOV2_DIM = 1024                    # output of DINOv2 ViT-L/14, the FD_DINOv2 network of torch-fidelity


def tiny_vae(seed: int = 0, widths=(8, 8, 16, 16)):
    "A random `AutoencoderKL`: 3 -> 4 latent channels, 2^(len(widths) - 1) = 8x downsampling, small widths."
    from diffusers import AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(widths),
                            down_block_types=("DownEncoderBlock2D",) * len(widths),
                            up_block_types=("UpDecoderBlock2D",) * len(widths), layers_per_block=1,
                            norm_num_groups=min(widths), sample_size=256)
    return vae.eval()


def tiny_dit(seed: int = 0, width: int = 32, depth: int = 2, heads: int = 2, num_classes: int = NUM_SOURCE_CLASSES):
    "A random DiT shaped like DiT-XL/2 at 256x256 (32x32x4 latents, patch 2, learned sigma) but `width` wide and `depth` deep."
    from wat_nb.models import build_dit
    model = build_dit("DiT-XL/2", num_classes, seed=seed, width=width, depth=depth, heads=heads)
    with torch.random.fork_rng(devices=[]), torch.no_grad():   # adaLN-Zero starts at 0: give the zero layers values,
        torch.manual_seed(seed + 1)                            # so outputs depend on every weight (conversion checks)
        for n, p in model.named_parameters():
            if not p.abs().sum(): p.normal_(0, 0.02)
    return model.eval()


# ------------------------------------------------------------------------------------------ the pipeline folder

HUB_TRANSFORMER_KEYS = dict(  # keys of the hub's transformer/config.json (diffusers 0.12's Transformer2DModel)
    _class_name="Transformer2DModel", activation_fn="gelu-approximate", attention_bias=True, cross_attention_dim=None,
    dropout=0.0, norm_elementwise_affine=False, norm_num_groups=32, norm_type="ada_norm_zero", num_vector_embeds=None,
    only_cross_attention=False, upcast_attention=False, use_linear_projection=False)

SCHEDULER_CONFIG = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02,
                    "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
                    "prediction_type": "epsilon", "trained_betas": None, "variance_type": "learned_range"}


def save_hub_transformer(model, folder) -> Path:
    "Write a DiT as the hub's `transformer/`: untied per-block embedder copies, diffusers 0.12's config keys."
    from wat_nb.models import save_dit
    folder = save_dit(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("_timestep_freq_shift", None)          # a key of this project, not of the hub
    cfg.update(HUB_TRANSFORMER_KEYS, _diffusers_version="0.12.0.dev0")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


def dit_pipeline(folder, seed: int = 0, width: int = 32, depth: int = 2, heads: int = 2, vae=None) -> Path:
    "A pipeline folder laid out like `facebook/DiT-XL-2-256`: model_index.json, transformer/, vae/, scheduler/."
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_hub_transformer(tiny_dit(seed, width, depth, heads), folder / "transformer")
    (vae or tiny_vae(seed)).save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    index = {"_class_name": "DiTPipeline", "_diffusers_version": "0.12.0.dev0",
             "id2label": {str(i): f"class {i}" for i in range(NUM_SOURCE_CLASSES)},
             "scheduler": ["diffusers", "DDPMScheduler"], "transformer": ["diffusers", "Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------ the original DiT checkpoint

def original_dit_state_dict(model) -> dict:
    "The facebookresearch/DiT state dict of a diffusers DiT: the inverse of `wat_nb.models.convert_original_dit`."
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb."
    out = {"pos_embed": model.pos_embed.pos_embed.detach().cpu().float().clone(),   # (1, grid^2, width), fixed
           "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"]}
    ren = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
           "final_layer.linear": "proj_out_2", "t_embedder.mlp.0": emb + "timestep_embedder.linear_1",
           "t_embedder.mlp.2": emb + "timestep_embedder.linear_2"}
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}."
        ren |= {f"blocks.{i}.attn.proj": b + "attn1.to_out.0", f"blocks.{i}.mlp.fc1": b + "ff.net.0.proj",
                f"blocks.{i}.mlp.fc2": b + "ff.net.2", f"blocks.{i}.adaLN_modulation.1": b + "norm1.linear"}
        for kind in ("weight", "bias"):   # fused qkv (3d, d): rows [q; k; v]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn1.to_{n}.{kind}"] for n in "qkv"])
    for new, old in ren.items():
        for kind in ("weight", "bias"): out[f"{new}.{kind}"] = sd[f"{old}.{kind}"]
    return out


def write_original_dit(model, path) -> Path:
    "Save the model as an original DiT checkpoint (`DiT-XL-2-256x256.pt` style): torch.save of a plain state dict."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(original_dit_state_dict(model), path)
    return path


# --------------------------------------------------------------------------------------------- the datasets

def _jpeg(path: Path, rng, size=(400, 300), base=None):
    "A smooth random picture (a colour gradient plus noise), `size` = (width, height), as a JPEG."
    from PIL import Image
    w, h = size
    base = rng.uniform(40, 215, 3) if base is None else base
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = base + 60 * np.stack([np.sin(xx * rng.uniform(2, 8) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 8))
                                for _ in range(3)], -1) + rng.normal(0, 8, (h, w, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=85)


def sun_dataset(data_root, classes=SUN_CLASSES, n_train: int = 4, n_test: int = 4, partition: bool = True,
                seed: int = 0) -> Path:
    "SUN397's layout under `data_root/sun/` (what `wat_nb.data.load_dataset('sun')` reads); returns SUN397/."
    rng = np.random.default_rng(seed)
    d = Path(data_root) / "sun" / "SUN397"
    names = [f"/{c[0]}/{c}" for c in classes]
    d.mkdir(parents=True, exist_ok=True)
    (d / "ClassName.txt").write_text("".join(n + "\n" for n in names))
    train, test = [], []
    for ci, n in enumerate(names):
        base = rng.uniform(40, 215, 3)               # one colour per class, so classes differ
        for i in range(n_train + n_test):
            rel = f"{n}/sun_{ci:03d}{i:04d}{'abcdefgh'[i % 8]}.jpg"
            _jpeg(d / rel.lstrip("/"), rng, (400, 300) if i % 2 else (300, 400), base)
            (train if i < n_train else test).append(rel)
    if partition:
        (d / "Training_01.txt").write_text("".join(r + "\n" for r in train))
        (d / "Testing_01.txt").write_text("".join(r + "\n" for r in test))
    return d


def image_folder(folder, classes=("goldfish", "church", "parachute"), per_class: int = 4, size=(320, 256),
                 seed: int = 1) -> Path:
    "A folder of class sub-folders of JPEGs (`<folder>/<class>/<i>.jpg`), e.g. ImageNet-like source images for ANT."
    rng, folder = np.random.default_rng(seed), Path(folder)
    for c in classes:
        base = rng.uniform(40, 215, 3)
        for i in range(per_class): _jpeg(folder / c / f"{i:03d}.jpg", rng, size, base)
    return folder


# ------------------------------------------------------------------------------- torch-fidelity's networks

DINOV2_HUBCONF = '''"""Stand-in for facebookresearch/dinov2's hubconf.py: a small random network with the 1024-d output of
DINOv2 ViT-L/14, its weights read from the torch hub checkpoints folder as the real entry point reads its own."""
import os

import torch

dependencies = ["torch"]


def _net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 14, stride=14), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(16, 1024))


def dinov2_vitl14(*, pretrained=True, **kwargs):
    net = _net()
    if pretrained:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", "dinov2_vitl14_pretrain.pth")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()
'''


def inception_state_dict(seed: int = 0, dtype=torch.float16) -> dict:
    "Random weights with the keys and shapes of torch-fidelity's Inception-V3 (He init, unit batch-norm statistics)."
    import torch_fidelity.feature_extractor_inceptionv3 as fi
    cls, load = fi.FeatureExtractorInceptionV3, fi.FeatureExtractorInceptionV3.load_state_dict
    url = fi.load_state_dict_from_url
    try:   # build the module without its weights: no download, no file
        fi.load_state_dict_from_url, cls.load_state_dict = (lambda *a, **k: None), (lambda self, *a, **k: None)
        net = cls("inception-v3-compat", ["2048"])
    finally:
        fi.load_state_dict_from_url, cls.load_state_dict = url, load
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.state_dict().items():
        if k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1): t = torch.ones_like(v)
        elif v.ndim == 4: t = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5   # He: keeps scale
        elif v.ndim == 2: t = torch.randn(v.shape, generator=g) * v.shape[1] ** -0.5
        elif v.dtype.is_floating_point: t = torch.zeros_like(v)
        else: t = v.clone()
        out[k] = t.to(dtype) if t.dtype.is_floating_point else t
    return out


def fidelity_weights(torch_home, seed: int = 0) -> Path:
    "The files `wat_nb.metrics.hub_files` names, under `torch_home/hub` (set TORCH_HOME=torch_home to use them)."
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    hub = Path(torch_home) / "hub"
    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(inception_state_dict(seed), hub / "checkpoints" / Path(URL_INCEPTION_V3).name)
    code = hub / "facebookresearch_dinov2_main"
    code.mkdir(exist_ok=True)
    (code / "hubconf.py").write_text(DINOV2_HUBCONF)
    ns = {}
    exec(compile(DINOV2_HUBCONF, str(code / "hubconf.py"), "exec"), ns)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(ns["_net"]().state_dict(), hub / "checkpoints" / "dinov2_vitl14_pretrain.pth")
    return hub


# --------------------------------------------------------------------------------------------------- all of it

def paper_standins(root, seed: int = 0) -> dict:
    """Every stand-in under `root`: pipeline/, an original DiT .pt, data/ (SUN397), source/ (ANT source images),
    torch/ (feature networks). Returns their paths and `env`, the environment that points the library at them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pipe = dit_pipeline(root / "pipeline", seed=seed)
    # the original checkpoint format infers the head count from the width, so its stand-in has a DiT preset's
    # width (DiT-S: 384, 6 heads) at depth 1; the pipeline's transformer stays narrower, for fast class matching
    pt = write_original_dit(tiny_dit(seed + 2, width=384, depth=1, heads=6), root / "DiT-tiny-256x256.pt")
    data = root / "data"
    sun_dataset(data, seed=seed)
    source = image_folder(root / "source", seed=seed + 1)
    fidelity_weights(root / "torch", seed=seed)
    env = {"WAT_NB_DATA": str(data), "TORCH_HOME": str(root / "torch"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(root / "hf"), "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return dict(root=root, pipeline=pipe, vae=pipe / "vae", original=pt, data=data, source=source,
                torch_home=root / "torch", env=env)


# ------------------------------------------------------------------ the rehearsal's papermill runs (tiny knobs)

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "wat-t0-1000-s0"


def train_params(st: dict, out_root, pretrained=None, **over) -> dict:
    "nbs/train.ipynb parameters of the rehearsal: SUN397 stand-in, paper profile, the pipeline folder, tiny knobs."
    return dict(dict(dataset="sun", profile="paper", pretrained=str(pretrained or st["pipeline"]), vae=str(st["vae"]),
                     steps=2, batch_size=4, match_m=1, match_steps=2, match_cap=2, out_root=str(out_root)), **over)


def sample_params(run, mode: str, name: str, **over) -> dict:
    "nbs/sample.ipynb parameters: `mode` on the run folder `run`, 2 images per class, 2 DDPM steps."
    w = 0.0 if mode == "none" else 0.5
    return dict(dict(run=str(run), mode=mode, w=w, sampler="ddpm", steps=2, n_per_class=2, seed=0, batch_size=8,
                     name=name), **over)


def evaluate_params(run, name: str, metrics: str = "fid,kid,fd_dinov2", **over) -> dict:
    "nbs/evaluate.ipynb parameters: score the sample set `name` of the run folder `run`."
    return dict(dict(run=str(run), name=name, metrics=metrics, batch_size=8), **over)


def source_samples(out_root) -> tuple:
    "(class ids, shape) of the cached matching draw of the pretrained model under `out_root` (Algorithm 1's samples)."
    files = sorted(Path(out_root).rglob("source-*.npz"))
    if len(files) != 1: raise AssertionError(f"expected one cached source draw under {out_root}, found {files}")
    with np.load(files[0]) as z: return z["class_ids"].tolist(), z["x"].shape


def run_notebook(notebook: str, log, params: dict, cwd=REPO):
    "Execute `nbs/<notebook>` with papermill (kernel python3, working directory the repository), its log at `log`."
    import papermill as pm
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(Path(cwd) / "nbs" / notebook), str(log), parameters=params, kernel_name="python3",
                               cwd=str(cwd), progress_bar=False, log_output=False,
                               extra_arguments=["--IPKernelApp.log_level=ERROR"])


if __name__ == "__main__":
    if len(sys.argv) != 2: sys.exit("usage: python tests/standins.py DIR")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    got = paper_standins(sys.argv[1])
    print(json.dumps({k: str(v) for k, v in got.items() if k != "env"} | {"env": got["env"]}, indent=1))
