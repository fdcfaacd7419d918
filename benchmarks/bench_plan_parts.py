"""The cheaper settings of the mini plan against the ones they replace, on one CPU thread (as each of `make reproduce`'s
two jobs runs), with how far each moves its output.

- feature network: EfficientNet-Lite0 with its BatchNorms as modules vs folded into the convolutions (`fold_batchnorms`),
  images/s and the largest relative difference of the features;
- AdamW on the mini source model's parameters: the per-tensor loop (torch's CPU default) vs `fused=True`, ms per step and
  the largest difference of the parameters after 20 steps on the same gradients;
- the matching's source samples: DDIM 50 with CFG in fp32 vs under bf16 autocast, images/s on the mini source model;
- the matching's target embeddings: `feature_embedder(cache=True)` the first time and again (the second run of a target);
- a guided sample set as the plan makes it (500 images, CFG w = 0.5, DDPM 50, bf16, batches of 100) with and without
  `compile=True`, each in a fresh process: eager, compiled with an empty compile cache, compiled again (cache filled),
  and how far the compiled images are from the eager ones; then two sets at once, eager and compiled (`--pairs`: this
  part alone).

    .venv/bin/python benchmarks/bench_plan_parts.py
"""
import copy
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from wat_nb.metrics import FeatureExtractorEfficientNetLite0, feature_embedder  # noqa: E402
from wat_nb.models import pretrained  # noqa: E402
from wat_nb.sampling import guided_eps, sample  # noqa: E402


def best_of(fn, reps: int = 3) -> float:
    "The fastest of `reps` timed calls of fn(), in seconds (after one warm-up call)."
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)


def features():
    fe = FeatureExtractorEfficientNetLite0("efficientnet-lite0", ["1280", "112"])
    plain = copy.deepcopy(fe)
    from wat_nb.metrics import efficientnet_lite0
    plain.net = efficientnet_lite0(device="cpu").to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t_plain, t_fold = best_of(lambda: plain(x)), best_of(lambda: fe(x))
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fe(x), plain(x)))
    print(f"feature network, 64 images: BatchNorm modules {64 / t_plain:.1f} images/s, folded {64 / t_fold:.1f} images/s "
          f"({t_plain / t_fold:.2f}x); largest relative feature difference {diff:.1e}")


def adamw():
    model = pretrained("mini", device="cpu")
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in model.parameters()]
    out = {}
    for name, kw in (("per-tensor", {}), ("fused", {"fused": True})):
        params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        for p, g in zip(params, grads): p.grad = g.clone()
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
        out[name] = (best_of(lambda: [opt.step() for _ in range(20)], reps=2) / 20, params)
    diff = max((a - b).abs().max().item() for a, b in zip(out["fused"][1], out["per-tensor"][1]))
    n = sum(p.numel() for p in model.parameters())
    print(f"AdamW step, {n / 1e6:.1f}M parameters: per-tensor {out['per-tensor'][0] * 1e3:.1f} ms, fused "
          f"{out['fused'][0] * 1e3:.1f} ms ({out['per-tensor'][0] / out['fused'][0]:.2f}x); largest parameter difference "
          f"after the same steps {diff:.1e}")


def source_draw():
    model = pretrained("mini", device="cpu").eval()
    eps, c, s = guided_eps(model, mode="cfg", w=1.0), model.config.in_channels, model.config.sample_size
    y = torch.arange(8).repeat_interleave(8)                                  # 8 classes x m = 8, one draw call
    def draw(bf16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return sample(eps, (len(y), c, s, s), y, sampler="ddim", steps=50, seed=0).float()
    t32, t16 = best_of(lambda: draw(False), reps=1), best_of(lambda: draw(True), reps=1)
    x32, x16 = draw(False), draw(True)
    print(f"source samples (DDIM 50, CFG w = 1, {len(y)} images): fp32 {len(y) / t32:.1f} images/s, bf16 autocast "
          f"{len(y) / t16:.1f} images/s ({t32 / t16:.2f}x); mean |difference| of the images {(x32 - x16).abs().mean():.3f} "
          f"(pixels in [-1, 1])")


def embed_cache():
    x = torch.rand(500, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1   # a target's 50 x 10 images
    with tempfile.TemporaryDirectory() as d:
        embed = feature_embedder("mini", cache=True, cache_root=d)
        t0 = time.perf_counter(); a = embed(x); cold = time.perf_counter() - t0
        t0 = time.perf_counter(); b = embed(x); warm = time.perf_counter() - t0
    print(f"target embeddings, 500 images: first {cold:.2f} s, cached {warm:.3f} s; equal: {torch.equal(a, b)}")


def generate_child(kind: str, out_dir: str):
    "One 500-image set of the mini source model (classes 0-9), eager or compiled; prints its wall time."
    from wat_nb.sampling import generate
    model = pretrained("mini", device="cpu").eval()
    t0 = time.perf_counter()
    generate(model, n_per_class=50, classes=range(10), mode="cfg", w=0.5, steps=50, seed=0, batch_size=100, bf16=True,
             compile=kind != "eager", out_dir=out_dir, name=kind, progress=False)
    print(f"{time.perf_counter() - t0:.2f}")


def compiled_sampling():
    from wat_nb.sampling import load_samples
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(d, "inductor"))   # starts empty
        def child(kind):
            out = subprocess.run([sys.executable, __file__, "--generate", kind, d], env=env, check=True,
                                 capture_output=True, text=True).stdout
            return float(out.split()[-1])
        t = {k: child(k) for k in ("eager", "compiled-cold", "compiled-cached")}
        a, b = (load_samples(os.path.join(d, f"{k}.npz"))[0].astype(int) for k in ("eager", "compiled-cached"))
        diff = abs(a - b)
        print(f"guided set, 500 images (CFG w = 0.5, DDPM 50, bf16): eager {t['eager']:.1f} s, compiled with an empty "
              f"cache {t['compiled-cold']:.1f} s, compiled with the cache filled {t['compiled-cached']:.1f} s "
              f"({t['eager'] / t['compiled-cached']:.2f}x); compiled - eager images: mean |difference| {diff.mean():.3f}, "
              f"largest {diff.max()} (of 255)")
        compiled_pairs(d, env)


def compiled_pairs(d: str, env: dict):
    "Two sets at once, as make reproduce's two jobs run: eager, then compiled (the compile cache under `d` filled)."
    def pair(kind):
        procs = [subprocess.Popen([sys.executable, __file__, "--generate", kind, os.path.join(d, f"{kind}-{i}")],
                                  env=env, stdout=subprocess.PIPE, text=True) for i in range(2)]
        return [float(p.communicate()[0].split()[-1]) for p in procs]
    e, c = pair("eager"), pair("compiled-cached")
    print(f"two guided sets at once: eager {e[0]:.1f} and {e[1]:.1f} s, compiled {c[0]:.1f} and {c[1]:.1f} s "
          f"({sum(e) / sum(c):.2f}x)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--generate"]:
        generate_child(sys.argv[2], sys.argv[3]); sys.exit()
    if sys.argv[1:2] == ["--pairs"]:      # only the two-at-once comparison (compiles first into a fresh cache)
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(d, "inductor"))
            subprocess.run([sys.executable, __file__, "--generate", "compiled-cold", d], env=env, check=True,
                           capture_output=True)
            compiled_pairs(d, env)
        sys.exit()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    features(); adamw(); source_draw(); embed_cache(); compiled_sampling()
