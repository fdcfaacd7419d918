"""The paper profile on one GPU, offline: a rehearsal with stand-ins in the real formats, device checks, and the
throughput of DiT-XL/2 training, guided sampling and the VAE. Prints a PASS / FAIL line per stage and the numbers;
no timed assertions. Run it through `bash benchmarks/gpu_check.sh` (about 8 minutes on one GPU).

Stages:
1. stand-ins (tests/standins.py): a DiT pipeline folder laid out like `facebook/DiT-XL-2-256` (small random
   transformer, tiny VAE), an original DiT `.pt`, a SUN397 folder, source images for ANT, torch-fidelity's files;
2. the entry notebooks on them through papermill: `train.ipynb` (VAE latents, matching over 1000 source classes),
   `sample.ipynb` with CFG and CLR, `evaluate.ipynb` with FID, KID and FD_DINOv2, `train.ipynb` from the `.pt`;
3. the reproduction driver's paper smoke plan (`python -m wat_nb.reproduce --profile paper --smoke`; `--no-plan`
   skips it);
4. device checks: every model the library loads sits on `wat_nb.core.default_device()` (cuda on a GPU);
5. DiT-XL/2 (random init, real size): images/s and peak GPU memory of the fine-tuning loop
   (`wat_nb.finetune.finetune`) against a bare forward + backward + AdamW step at batch 32, bf16 and TF32
   (goal: loop / bare >= 0.9);
6. sampling images/s with no guidance, CFG and CLR, DDPM-50 with learned sigma (goal: CLR / CFG >= 0.9);
7. VAE encode / decode images/s at 256x256 (the tiny stand-in, or `--vae PATH` for a real one).

Without a CUDA GPU it stops with a FAIL line, unless ALLOW_CPU=1: then every stage runs on the CPU at tiny sizes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

RESULTS: list[tuple[str, bool, float, str]] = []   # (stage, passed, seconds, note)
NUMBERS: dict[str, dict] = {}

SIZES = {  # benchmark sizes: full on a GPU, tiny on a CPU (ALLOW_CPU=1)
    "full": dict(width=1152, depth=28, heads=16, batch=32, train_steps=30, warmup=10, log_every=5,
                 sample_batch=32, sample_steps=50, vae_batch=16, vae_reps=3),
    "tiny": dict(width=32, depth=2, heads=2, batch=4, train_steps=4, warmup=2, log_every=2,
                 sample_batch=4, sample_steps=4, vae_batch=2, vae_reps=1),
}


def stage(name: str, fn, *args, **kw):
    "Run one stage: print PASS or FAIL with its time (and the error's last lines); its value, or None on failure."
    t0 = time.time()
    try:
        out = fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 -- every stage reports and the check goes on
        dt = time.time() - t0
        tb = traceback.format_exc().strip().splitlines()
        note = f"{type(e).__name__}: {str(getattr(e, 'evalue', e)).strip()[:400]}"
        RESULTS.append((name, False, dt, note))
        print(f"FAIL  {name} ({dt:.1f} s): {note}\n      " + "\n      ".join(tb[-8:]), flush=True)
        return None
    dt = time.time() - t0
    note = out if isinstance(out, str) else ""
    RESULTS.append((name, True, dt, note))
    print(f"PASS  {name} ({dt:.1f} s){': ' + note if note else ''}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ rehearsal

def rehearse(st: dict, work: Path, plan: bool):
    "The entry notebooks (and the driver's paper smoke plan) on the stand-ins; one stage each."
    import numpy as np
    from standins import NUM_SOURCE_CLASSES, RUN_NAME, evaluate_params, run_notebook, sample_params, source_samples, train_params
    runs, logs = work / "runs", work / "logs"
    run = runs / "sun" / RUN_NAME

    def train():
        run_notebook("train.ipynb", logs / "train.ipynb", train_params(st, runs))
        ids, shape = source_samples(runs)
        assert ids == list(range(NUM_SOURCE_CLASSES)) and shape[2:] == (4, 32, 32), (ids[:3], shape)
        sigma = json.loads((run / "matching.json").read_text())["sigma"]
        assert (run / "run.json").is_file(), f"no run.json in {run}"
        return f"run {run.name}; matched {len(sigma)} classes among {len(ids)} source classes ({shape[1]} latents each)"
    if stage("train.ipynb: SUN397 stand-in, pipeline folder, VAE latents, 1000-class matching", train) is None:
        return None

    def sample(mode):
        name = f"{mode}-rehearsal"
        run_notebook("sample.ipynb", logs / f"sample-{mode}.ipynb", sample_params(run, mode, name))
        with np.load(run / "samples" / f"{name}.npz") as z: shape = z["images"].shape
        assert shape[1:] == (256, 256, 3), shape
        return f"{shape[0]} images of {shape[1]}x{shape[2]}"
    for mode in ("cfg", "clr"): stage(f"sample.ipynb: {mode}", sample, mode)

    def evaluate():
        run_notebook("evaluate.ipynb", logs / "evaluate.ipynb", evaluate_params(run, "clr-rehearsal"))
        m = json.loads((run / "samples" / "clr-rehearsal.metrics.json").read_text())
        vals = {k: m[k] for k in ("fid", "kid_mean", "fd_dinov2")}
        assert all(np.isfinite(v) for v in vals.values()), vals
        return ", ".join(f"{k} {v:.3g}" for k, v in vals.items())
    stage("evaluate.ipynb: FID, KID, FD_DINOv2", evaluate)

    def train_pt():
        p = train_params(st, runs, pretrained=st["original"], method="identity", steps=1, run_name="from-pt")
        run_notebook("train.ipynb", logs / "train-pt.ipynb", p)
        assert (runs / "sun" / "from-pt" / "latest").is_file()
        return "identity run from the original DiT checkpoint"
    stage("train.ipynb: pretrained = original DiT .pt", train_pt)

    if plan:
        def smoke():
            cmd = [sys.executable, "-m", "wat_nb.reproduce", "--profile", "paper", "--smoke",
                   "--set", f"pretrained={st['pipeline']}", "--set", f"vae={st['vae']}",
                   "--set", f"ant_source={st['source']}", "--set", f"runs_root={work / 'plan'}",
                   "--set", f"out_dir={work / 'plan' / 'figures'}"]
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
            last = r.stdout.strip().splitlines()[-1:] or [r.stderr.strip()[-300:]]
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            return last[0]
        stage("python -m wat_nb.reproduce --profile paper --smoke", smoke)
    return run


def device_checks(st: dict, run: Path | None):
    "Every model the library loads is on wat_nb.core.default_device()."
    from wat_nb.codecs import VAECodec
    from wat_nb.core import default_device
    from wat_nb.models import load_dit, pretrained
    want = default_device()
    where = lambda m: next(m.parameters()).device

    def check(what, dev):
        if dev.type != want.type: raise AssertionError(f"{what} is on {dev}, expected {want}")
        return f"{what}: {dev}"
    stage("device: pretrained DiT (pipeline folder)", lambda: check("load_dit", where(load_dit(st["pipeline"] / "transformer"))))
    stage("device: pretrained() of the pipeline folder", lambda: check("pretrained", where(pretrained(str(st["pipeline"])))))
    stage("device: original .pt", lambda: check("load_dit(.pt)", where(load_dit(st["original"]))))
    stage("device: VAE codec", lambda: check("VAECodec", where(VAECodec(str(st["vae"])).vae)))
    if run is not None:
        from wat_nb.finetune import load_finetuned
        stage("device: fine-tuned EMA weights", lambda: check("load_finetuned", where(load_finetuned(run))))

    def features():
        from torch_fidelity.utils import create_feature_extractor
        from wat_nb import metrics as M
        cuda = M._cuda(None)
        out = []
        for ext, layer in (M.METRIC_SPACES["paper"]["fid"], M.METRIC_SPACES["paper"]["fd_dinov2"]):
            fe = create_feature_extractor(ext, [layer], cuda=cuda)
            out.append(check(ext, where(fe)))
        return "; ".join(out)
    stage("device: FID / FD_DINOv2 feature networks", features)


# ------------------------------------------------------------------------------------------------ benchmarks

def _sync(dev):
    import torch
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def _reset_memory(dev):
    import torch
    gc.collect()
    if dev.type == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev) -> float:
    import torch
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")


def _dit(z: dict, dev, seed: int = 0):
    import torch
    from wat_nb.models import build_dit
    with torch.device(dev):   # built where it runs: no 675M-parameter copy through the CPU
        return build_dit("DiT-XL/2", 1000, seed=seed, width=z["width"], depth=z["depth"], heads=z["heads"])


class Latents:
    "Random latents (N, 4, 32, 32) with labels in 0..999: the loop's data without a VAE."
    def __init__(self, n: int, seed: int = 0):
        import torch
        g = torch.Generator().manual_seed(seed)
        self.x, self.targets = torch.randn(n, 4, 32, 32, generator=g), torch.randint(0, 1000, (n,), generator=g).numpy()
        self.classes = [str(i) for i in range(1000)]
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], int(self.targets[i])


def bench_bare(z: dict, dev, precision: str) -> dict:
    "Forward + backward + AdamW of DiT-XL/2 on one fixed batch (B, 4, 32, 32): images/s and peak memory."
    import torch
    from wat_nb.finetune import ddpm_scheduler, diffusion_loss, posterior_terms, step_draws
    _reset_memory(dev)
    model, B = _dit(z, dev).train(), z["batch"]
    data = Latents(B)
    x, y = data.x.to(dev), torch.as_tensor(data.targets, device=dev)
    t, _, noise = step_draws(0, 0, B, x.shape[1:])
    t, noise = t.to(dev), noise.to(dev)
    sched = ddpm_scheduler(); sched.alphas_cumprod = sched.alphas_cumprod.to(dev)
    terms = {k: v.to(dev) for k, v in posterior_terms(sched).items()}
    xt = sched.add_noise(x, noise, t)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(xt, timestep=t, class_labels=y).sample
        loss, _ = diffusion_loss(out, x, xt, noise, t, terms)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(z["warmup"]): step()
    _sync(dev); t0 = time.perf_counter()
    for _ in range(z["train_steps"]): step()
    _sync(dev); dt = time.perf_counter() - t0
    return dict(images_per_s=z["train_steps"] * B / dt, peak_gib=_peak_gib(dev))


def bench_loop(z: dict, dev, precision: str, work: Path) -> dict:
    "The fine-tuning loop (paper preset: EMA, label dropout, data loader, log, final checkpoint) on random latents."
    import numpy as np
    from wat_nb.finetune import finetune, finetune_config, read_log
    _reset_memory(dev)
    model, B, L = _dit(z, dev), z["batch"], z["log_every"]
    warm = -(-z["warmup"] // L) * L                    # whole log windows: the first ones hold the warm-up
    out_dir = work / f"loop-{precision}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = finetune_config("paper", output=str(out_dir), steps=warm + z["train_steps"], batch_size=B, num_classes=1000,
                          mixed_precision="bf16" if precision == "bf16" else "no", allow_tf32=True, log_every=L,
                          ckpt_every=10**9, num_workers=4 if dev.type == "cuda" else 0, cpu=dev.type == "cpu")
    t0 = time.perf_counter()
    finetune(model, Latents(4 * B), cfg)
    wall = time.perf_counter() - t0
    log = read_log(out_dir)
    ips = log["images_per_s"][log["step"] > warm]       # one value per step, constant within a log window
    out = dict(images_per_s=float(np.median(ips)), peak_gib=_peak_gib(dev), wall_s=wall,
               after_loop_s=wall - float(log["time"][-1]))
    del model
    shutil.rmtree(out_dir, ignore_errors=True)
    return out


def bench_train(z: dict, dev, work: Path):
    import torch
    res = {}
    for precision in ("bf16", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        b, l = bench_bare(z, dev, precision), bench_loop(z, dev, precision, work)
        res[precision] = dict(bare=b, loop=l, ratio=l["images_per_s"] / b["images_per_s"])
        print(f"      {precision}: bare {b['images_per_s']:8.1f} images/s, peak {b['peak_gib']:.1f} GiB | loop "
              f"{l['images_per_s']:8.1f} images/s, peak {l['peak_gib']:.1f} GiB | loop/bare {res[precision]['ratio']:.2f} "
              f"(goal >= 0.9); setup + final checkpoint {l['after_loop_s']:.1f} s of {l['wall_s']:.1f} s", flush=True)
    NUMBERS["train"] = res
    return ", ".join(f"{p} loop/bare {r['ratio']:.2f}" for p, r in res.items())


def bench_sampling(z: dict, dev):
    "Images/s of none / CFG / CLR (w = 0.5), DDPM with learned sigma, bf16 autocast as nbs/sample.ipynb."
    import torch
    from wat_nb.sampling import guided_eps, sample
    _reset_memory(dev)
    ft, pre = _dit(z, dev, 0).eval(), _dit(z, dev, 1).eval()
    B, n = z["sample_batch"], z["sample_steps"]
    labels = torch.arange(B, device=dev) * 7 % 1000
    res = {}
    for mode, w in (("none", 0.0), ("cfg", 0.5), ("clr", 0.5)):
        fn = guided_eps(ft, pre, mode=mode, w=w)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            sample(fn, (B, 4, 32, 32), labels, "ddpm", 2, device=dev)          # warm-up
            _sync(dev); t0 = time.perf_counter()
            x = sample(fn, (B, 4, 32, 32), labels, "ddpm", n, device=dev)
            _sync(dev); dt = time.perf_counter() - t0
        assert torch.isfinite(x).all()
        res[mode] = B / dt
    res["clr_over_cfg"] = res["clr"] / res["cfg"]
    res["peak_gib"] = _peak_gib(dev)
    NUMBERS["sampling"] = res
    del ft, pre
    print(f"      DDPM-{n}, batch {B}: none {res['none']:.1f}, CFG {res['cfg']:.1f}, CLR {res['clr']:.1f} images/s; "
          f"CLR/CFG {res['clr_over_cfg']:.2f} (goal >= 0.9); peak {res['peak_gib']:.1f} GiB", flush=True)
    return f"CLR/CFG {res['clr_over_cfg']:.2f}"


def bench_vae(z: dict, dev, vae_path):
    "Encode / decode images/s of the VAE codec at 256x256."
    import torch
    from wat_nb.codecs import VAECodec
    _reset_memory(dev)
    codec = VAECodec(str(vae_path), device=dev, batch_size=z["vae_batch"])
    B = z["vae_batch"]
    x = torch.rand(B, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z_ = codec.encode(x); codec.decode(z_)                                 # warm-up
    _sync(dev); t0 = time.perf_counter()
    for _ in range(z["vae_reps"]): z_ = codec.encode(x, sample=False)
    _sync(dev); enc = z["vae_reps"] * B / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(z["vae_reps"]): img = codec.decode(z_)
    _sync(dev); dec = z["vae_reps"] * B / (time.perf_counter() - t0)
    assert tuple(z_.shape[1:]) == (4, 32, 32) and tuple(img.shape[1:]) == (3, 256, 256)
    NUMBERS["vae"] = dict(encode=enc, decode=dec, path=str(vae_path))
    print(f"      {vae_path}: encode {enc:.1f}, decode {dec:.1f} images/s (batch {B}, fp32)", flush=True)
    return f"encode {enc:.1f}, decode {dec:.1f} images/s"


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), help="benchmark sizes (default: full on a GPU, tiny on a CPU)")
    p.add_argument("--vae", help="a real VAE folder (diffusers AutoencoderKL) for the VAE rates; default: the stand-in")
    p.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--no-plan", dest="plan", action="store_false", help="skip the driver's paper smoke plan")
    p.add_argument("--no-rehearsal", dest="rehearsal", action="store_false", help="only the benchmarks")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="only the rehearsal and device checks")
    for k in SIZES["full"]: p.add_argument(f"--{k.replace('_', '-')}", type=int, dest=k, help=f"override the size's {k}")
    a = p.parse_args(argv)
    t_start = time.time()

    import torch
    allow_cpu = os.environ.get("ALLOW_CPU", "") not in ("", "0")
    if torch.cuda.is_available():
        os.environ.setdefault("WAT_NB_DEVICE", "cuda")
        dev = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    elif allow_cpu:
        dev = torch.device("cpu")
        print(f"device: cpu ({os.cpu_count()} cores; ALLOW_CPU=1, tiny sizes); torch {torch.__version__}", flush=True)
    else:
        print("FAIL  device: no CUDA GPU visible to torch "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); set ALLOW_CPU=1 to run the tiny CPU "
              "version of every stage", flush=True)
        return 2
    z = dict(SIZES[a.size or ("full" if dev.type == "cuda" else "tiny")])
    z.update({k: getattr(a, k) for k in SIZES["full"] if getattr(a, k) is not None})

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working folder: {work}; sizes: {json.dumps(z)}", flush=True)
    try:
        from standins import paper_standins
        st = stage("stand-ins: DiT pipeline folder, original .pt, SUN397, ANT source, feature networks",
                   lambda: paper_standins(work / "standins"))
        if st is not None:
            os.environ.update(st["env"])            # offline; the notebooks' kernels inherit it
            run = rehearse(st, work, a.plan) if a.rehearsal else None
            device_checks(st, run)
        if a.bench:
            stage(f"train throughput: DiT-XL/2 shape (width {z['width']}, depth {z['depth']}), batch {z['batch']}",
                  bench_train, z, dev, work)
            stage(f"sampling throughput: none / CFG / CLR, DDPM-{z['sample_steps']}, learned sigma", bench_sampling, z, dev)
            vae = a.vae or (st["vae"] if st is not None else None)
            if vae is None: stage("VAE throughput", lambda: (_ for _ in ()).throw(RuntimeError("no VAE: the stand-ins failed")))
            else: stage("VAE throughput: encode / decode 256x256", bench_vae, z, dev, vae)
    finally:
        if not a.work and not a.keep: shutil.rmtree(work, ignore_errors=True)
    (REPO / "runs").mkdir(exist_ok=True)
    report = REPO / "runs" / "gpu_check.json"
    from wat_nb.core import atomic_write_text
    atomic_write_text(report, json.dumps(dict(device=str(dev), sizes=z, numbers=NUMBERS, wall_s=time.time() - t_start,
                                      stages=[dict(stage=s, passed=ok, seconds=round(t, 1), note=n)
                                              for s, ok, t, n in RESULTS]), indent=1, default=str) + "\n")
    failed = [s for s, ok, _, _ in RESULTS if not ok]
    print(f"gpu_check: {len(RESULTS) - len(failed)} passed, {len(failed)} failed in {time.time() - t_start:.0f} s; "
          f"numbers in {report}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
