"""Training throughput of the mini source model on this machine: the whole `finetune` loop next to a bare step.

The loop is `wat_nb.finetune.finetune` with the mini preset (data loading, label map + dropout, EMA, loss sync,
CSV log, progress bar and checkpoints); the bare step is forward + backward + AdamW of the same model on one fixed
batch. Each measurement runs in its own process (so `ru_maxrss` is its own peak), alternating bare / loop, for
fp32 and bf16. Prints numbers; not a test.

    .venv/bin/python benchmarks/bench_train.py [--steps 30] [--warmup 5] [--reps 2] [--precisions no bf16]

It then runs the loop once more on two processes through `accelerate launch --multi_gpu --num_processes 2` (gloo
on a CPU, one thread per process, the same global batch) next to one process, unless `--no-two-processes`.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


MODEL = os.environ.get('WAT_NB_BENCH_MODEL', 'unet-mini')  # the model preset measured (set by --model)


def _setup(num_classes=32, dataset='shapes'):
    from wat_nb.data import load_dataset
    from wat_nb.models import build_model
    model = build_model(MODEL, num_classes, seed=0)
    ds = load_dataset(dataset, 'train', image_size=model.config.sample_size)
    return model, ds


def child_bare(precision: str, steps: int, warmup: int, batch: int) -> dict:
    "Forward + backward + AdamW on one fixed batch, timed over `steps` after `warmup`."
    import torch
    from wat_nb.finetune import batch_indices, ddpm_scheduler, diffusion_loss, posterior_terms, step_draws
    model, ds = _setup()
    x, y = zip(*(ds[i] for i in batch_indices(len(ds), batch, 0, 0).tolist()))
    x, y = torch.stack(x), torch.tensor(y)  # (B, 3, 16, 16)
    t, _, noise = step_draws(0, 0, batch, x.shape[1:])
    sched = ddpm_scheduler(); terms = posterior_terms(sched)
    xt = sched.add_noise(x, noise, t)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model.train()

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
            out = model(xt, timestep=t, class_labels=y).sample
        loss, _ = diffusion_loss(out, x, xt, noise, t, terms)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup): step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps): loss = step()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return dict(images_per_s=steps * batch / dt, cpu_images_per_s=steps * batch / dc, s_per_step=dt / steps,
                loss=loss.item(), threads=torch.get_num_threads())


def child_loop(precision: str, steps: int, warmup: int, batch: int) -> dict:
    "The `finetune` loop (mini preset): a run of warmup + steps minus a run of warmup steps; checkpoints amortised."
    import torch
    from wat_nb.finetune import finetune, finetune_config, make_ema, save_checkpoint
    every = finetune_config('mini').ckpt_every
    cost = {}
    for n in (warmup, warmup + steps):  # same setup and one final checkpoint in both: the difference is n steps
        model, ds = _setup()
        with tempfile.TemporaryDirectory() as d:
            cfg = finetune_config('mini', output=d, steps=n, batch_size=batch, mixed_precision=precision, ckpt_every=n)
            w0, c0 = time.perf_counter(), time.process_time()
            res = finetune(model, ds, cfg)
            cost[n] = (time.perf_counter() - w0, time.process_time() - c0)
    dt, dc = (cost[warmup + steps][i] - cost[warmup][i] for i in (0, 1))
    with tempfile.TemporaryDirectory() as d:  # a checkpoint as the loop writes it, timed on its own
        opt = torch.optim.AdamW(res.model.parameters(), lr=1e-4)
        for p in res.model.parameters(): p.grad = torch.zeros_like(p)
        opt.step()
        ema, tc = make_ema(res.model.parameters(), cfg), []
        for i in range(2):
            t1 = time.perf_counter()
            save_checkpoint(d, 10_000 + i, res.model, ema, opt, dict(config=cfg.to_dict()), keep_last=1)
            tc.append(time.perf_counter() - t1)
    ckpt_s = min(tc)
    return dict(images_per_s=steps * batch / (dt + steps / every * ckpt_s), images_per_s_no_ckpt=steps * batch / dt,
                cpu_images_per_s=steps * batch / dc, s_per_step=dt / steps, ckpt_s=ckpt_s, ckpt_every=every,
                threads=torch.get_num_threads())


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def run_child(mode, precision, steps, warmup, batch, threads=None, processes=1) -> dict:
    "One measurement in fresh process(es); with `processes` > 1, through `accelerate launch` (rank 0's timing)."
    args = [__file__, '--child', mode, '--precision', precision, '--steps', str(steps), '--warmup', str(warmup),
            '--batch', str(batch)]
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', str(processes),
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
              '--main_process_port', str(_free_port())] if processes > 1 else [sys.executable]
    env = dict(os.environ, WAT_NB_BENCH_MODEL=MODEL, **({'OMP_NUM_THREADS': str(threads)} if threads else {}))
    r = subprocess.run(launch + args, cwd=REPO, capture_output=True, text=True, env=env)
    if r.returncode: raise RuntimeError(f"{mode} {precision} failed:\n{r.stderr[-3000:]}")
    outs = sorted((json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')), key=lambda o: o['rank'])
    if len(outs) != processes or {o['world'] for o in outs} != {processes}:
        raise RuntimeError(f"expected {processes} process(es), got {[(o['rank'], o['world']) for o in outs]}")
    return dict(outs[0], peak_rss_mb=sum(o['peak_rss_mb'] for o in outs))


def main():
    global MODEL
    p = argparse.ArgumentParser()
    p.add_argument('--child', choices=['bare', 'loop'])
    p.add_argument('--precision', default='no')
    p.add_argument('--precisions', nargs='+', default=['no', 'bf16'])
    p.add_argument('--steps', type=int, default=30)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--reps', type=int, default=2)
    p.add_argument('--model', default=MODEL, help='model preset of wat_nb.models: unet-mini (the mini source model) or mini (the DiT)')
    p.add_argument('--threads', type=int, default=None, help='OMP_NUM_THREADS of the measured processes (default: torch\'s)')
    p.add_argument('--no-two-processes', dest='two', action='store_false', help='skip the two-process comparison')
    a = p.parse_args()
    if a.child:
        out = (child_bare if a.child == 'bare' else child_loop)(a.precision, a.steps, a.warmup, a.batch)
        from accelerate.state import PartialState
        st = PartialState()
        out |= dict(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rank=st.process_index,
                    world=st.num_processes)
        print(json.dumps(out), flush=True); return
    MODEL = a.model
    import torch
    from wat_nb.models import build_model
    m = build_model(MODEL, 32)
    print(f"{MODEL} ({type(m).__name__}): {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters, "
          f"{m.config.sample_size}x{m.config.sample_size}x{m.config.in_channels}; batch {a.batch}; {a.steps} timed steps after {a.warmup}; "
          f"torch {torch.__version__}, {a.threads or torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    res = {}
    for prec in a.precisions:
        for rep in range(a.reps):
            for mode in ('bare', 'loop'):
                r = run_child(mode, prec, a.steps, a.warmup, a.batch, a.threads)
                res.setdefault((prec, mode), []).append(r)
                print(f"  {prec:>4} {mode:>4} rep {rep}: {r['images_per_s']:7.1f} images/s (wall), "
                      f"{r['cpu_images_per_s']:7.1f} per CPU second, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    print(f"\n{'precision':>9} {'bare img/s':>11} {'loop img/s':>11} {'loop/bare':>9} {'(per CPU s)':>11} "
          f"{'bare MB':>8} {'loop MB':>8}")
    for prec in a.precisions:
        b, l = res[(prec, 'bare')], res[(prec, 'loop')]
        bi, li = med(b, 'images_per_s'), med(l, 'images_per_s')
        print(f"{prec:>9} {bi:11.1f} {li:11.1f} {li / bi:9.2f} {med(l, 'cpu_images_per_s') / med(b, 'cpu_images_per_s'):11.2f} "
              f"{max(r['peak_rss_mb'] for r in b):8.0f} {max(r['peak_rss_mb'] for r in l):8.0f}")
    for prec in a.precisions:
        l = res[(prec, 'loop')]
        print(f"{prec:>9}: loop without checkpoints {statistics.median(r['images_per_s_no_ckpt'] for r in l):.1f} "
              f"images/s; one checkpoint {statistics.median(r['ckpt_s'] for r in l):.2f} s, amortised over "
              f"{l[0]['ckpt_every']} steps (the mini preset's ckpt_every)")
    print("(medians over reps; the loop includes data loading, label map + dropout, EMA, loss syncs, CSV log, "
          "progress bar and amortised checkpoints)")
    if not a.two: return
    prec = a.precisions[-1]
    print(f"\nthe loop ({prec}, global batch {a.batch}) on one process vs two (accelerate launch, gloo, 1 thread each):")
    for procs, threads in ((1, a.threads), (2, 1)):
        rs = [run_child('loop', prec, a.steps, a.warmup, a.batch, threads, procs) for _ in range(a.reps)]
        print(f"  {procs} process(es) x {threads or torch.get_num_threads()} thread(s): "
              f"{med(rs, 'images_per_s'):7.1f} images/s, peak RSS {max(r['peak_rss_mb'] for r in rs):.0f} MB "
              f"(all processes)", flush=True)


if __name__ == '__main__':
    main()
