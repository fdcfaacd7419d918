"""Sampling throughput of each guidance mode on this CPU with a mini model preset (random weights; `--model unet-mini`, the mini source model, or `mini`, the DiT).

CFG runs one model on a doubled batch (cond + null); DoG and CLR run two different models on the batch each;
hybrid with w > 0 runs CFG on whichever model is active. All four evaluate 2B samples per step; `none` (B per
step) is shown for reference. Every mode samples the same B images with DDPM for the same number of steps;
modes run in a rotating order, `--repeats` times, and the median is reported (the CPU is shared). Besides
wall-clock images/s it prints the median of per-repeat time ratios to CFG and images per CPU-second of this
process (with 1 thread the latter counts the work done, whatever else runs on the machine; with more threads
it also counts threads spinning while they wait).

    .venv/bin/python benchmarks/bench_sampling.py                       # B = 16, 8 steps, 7 repeats, 1 and 2 threads
    .venv/bin/python benchmarks/bench_sampling.py --threads 2 --repeats 3
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from wat_nb.models import build_model  # noqa: E402
from wat_nb.sampling import guided_eps, sample  # noqa: E402

MODES = {  # mode: (w, model evaluations per image per step)
    'none': (0.0, 1), 'cfg': (0.5, 2), 'dog': (0.5, 2), 'clr': (0.5, 2), 'hybrid': (0.5, 2)}


def run(threads: int, a) -> dict:
    torch.set_num_threads(threads)
    kw = dict(init='diffusers') if a.model in ('tiny', 'mini') else {}
    ft = build_model(a.model, 32, seed=0, **kw).eval()
    pre = build_model(a.model, 32, seed=1, **kw).eval()
    c, s = ft.config.in_channels, ft.config.sample_size
    labels = torch.arange(a.batch) % 32
    fns = {m: guided_eps(ft, pre, mode=m, w=w) for m, (w, _) in MODES.items()}
    # hybrid: t_switch = 600 sits inside the run (DDPM steps 999..0), so both models take part
    sample(fns['cfg'], (a.batch, c, s, s), labels, steps=2)  # warm-up
    times, cpu = {m: [] for m in MODES}, {m: [] for m in MODES}
    names = list(MODES)
    for r in range(a.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for m in order:
            t0, c0 = time.perf_counter(), time.process_time()
            sample(fns[m], (a.batch, c, s, s), labels, sampler='ddpm', steps=a.steps, seed=r)
            times[m].append(time.perf_counter() - t0); cpu[m].append(time.process_time() - c0)
    res = {m: dict(median_s=statistics.median(v), images_per_s=a.batch / statistics.median(v),
                   images_per_cpu_s=a.batch / statistics.median(cpu[m]), spread=(min(v), max(v)))
           for m, v in times.items()}
    for m in MODES:  # per-repeat ratio to the CFG run of the same repeat: less sensitive to slow drifts in load
        res[m]['paired'] = statistics.median(c / t for c, t in zip(times['cfg'], times[m]))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='unet-mini', help='unet-mini (the mini source model) or mini (the DiT)')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--threads', type=str, default='1,2', help='comma-separated torch thread counts to try')
    a = p.parse_args()
    print(f"mini DiT (16x16x3, width 256, depth 6), batch {a.batch}, DDPM {a.steps} steps, median of {a.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for threads in map(int, a.threads.split(',')):
        res = run(threads, a)
        cfg = res['cfg']['images_per_s']
        print(f"\ntorch threads = {threads}")
        cfg_cpu = res['cfg']['images_per_cpu_s']
        print(f"{'mode':8s} {'evals/img/step':>14s} {'median s':>9s} {'images/s':>9s} {'x CFG':>6s} "
              f"{'paired x CFG':>12s} {'img/CPU-s':>9s} {'x CFG':>6s}  min..max s")
        for m, r in res.items():
            print(f"{m:8s} {MODES[m][1]:14d} {r['median_s']:9.2f} {r['images_per_s']:9.2f} "
                  f"{r['images_per_s'] / cfg:6.2f} {r['paired']:12.2f} {r['images_per_cpu_s']:9.2f} "
                  f"{r['images_per_cpu_s'] / cfg_cpu:6.2f}  {r['spread'][0]:.2f}..{r['spread'][1]:.2f}")
        wall, paired, per_cpu = (res['clr']['images_per_s'] / cfg, res['clr']['paired'],
                                 res['clr']['images_per_cpu_s'] / cfg_cpu)
        print(f"CLR / CFG: wall {wall:.2f}, median per-repeat {paired:.2f}, per CPU-second {per_cpu:.2f} "
              f"(target >= 0.9); DoG / CFG: wall {res['dog']['images_per_s'] / cfg:.2f}, "
              f"per CPU-second {res['dog']['images_per_cpu_s'] / cfg_cpu:.2f}")


if __name__ == '__main__':
    main()
