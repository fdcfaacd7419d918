"""Paper-scale class matching on random latents: exact cost matrix + assignment, against a plain ot.emd2 loop.

Simulates Algorithm 1 at the size of the paper profile: 1000 source classes x m = 10 samples, 101 target classes
x up to 50 images, latents 4 x 32 x 32 (d = 4096). Prints wall time and peak memory of
`wat_nb.matching.class_cost_matrix` + `match_classes`, the largest difference to `ot.emd2` on float64 costs for a
random subset of class pairs, and the plain-loop baseline (one torch.cdist + one ot.emd2 per pair) timed on a
subset and extrapolated. Each part runs in its own process so that peak memory is per part.

    .venv/bin/python benchmarks/bench_matching.py            # full size
    .venv/bin/python benchmarks/bench_matching.py --source-classes 100 --baseline-pairs 500   # quick
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def make_latents(a):
    "Class-structured random latents: a shared class centre plus per-image noise, like VAE latents (unit scale)."
    g = torch.Generator().manual_seed(a.seed)
    shape = (4, 32, 32)
    centres = 0.5 * torch.randn(a.source_classes, *shape, generator=g)
    source = centres[:, None] + torch.randn(a.source_classes, a.m, *shape, generator=g)  # (K, m, 4, 32, 32)
    true = torch.randperm(a.source_classes, generator=g)[:a.target_classes]
    sizes = torch.randint(a.min_per_class, a.max_per_class + 1, (a.target_classes,), generator=g).tolist()
    target = [centres[t] + 0.3 * torch.randn(*shape, generator=g) + torch.randn(n, *shape, generator=g)
              for t, n in zip(true.tolist(), sizes)]  # each target class: a shifted copy of one source class
    return source, target, true.numpy()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s():
    "CPU seconds used by this process so far, all threads (user + system)."
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def part_fast(a):
    from wat_nb.matching import class_cost_matrix, match_classes
    source, target, true = make_latents(a)
    rss0 = peak_rss_mb()
    tracemalloc.start()
    c0, t0 = cpu_s(), time.perf_counter()
    C = class_cost_matrix(source, target, max_per_class=a.cap, seed=0, num_threads=a.threads, progress=False)
    t1 = time.perf_counter()
    sigma = match_classes(C)
    t2, c2 = time.perf_counter(), cpu_s()
    _, py_peak = tracemalloc.get_traced_memory()
    np.save(a.out, C)
    return dict(cost_matrix_s=t1 - t0, assignment_s=t2 - t1, total_s=t2 - t0, cpu_s=c2 - c0,
                load=os.getloadavg()[0], accuracy=float((sigma == true).mean()),
                rss_before_mb=rss0, rss_peak_mb=peak_rss_mb(), numpy_peak_mb=py_peak / 2**20,
                shape=list(C.shape), torch_threads=torch.get_num_threads())


def part_verify(a):
    import ot
    import scipy.optimize
    from wat_nb.matching import match_classes, subsample_class
    source, target, _ = make_latents(a)
    C = np.load(a.out)
    rng = np.random.default_rng(1)
    pairs = [(int(rng.integers(len(source))), int(rng.integers(len(target)))) for _ in range(a.verify_pairs)]
    diffs, rels = [], []
    for i, j in pairs:
        x = source[i].flatten(1).double().numpy()
        y = target[j][torch.as_tensor(subsample_class(len(target[j]), a.cap, 0, j))].flatten(1).double().numpy()
        ref = ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), ot.dist(x, y), numItermax=10**6)
        diffs.append(abs(C[i, j] ** 2 - ref)); rels.append(diffs[-1] / ref)
    sigma = match_classes(C)
    r, c = scipy.optimize.linear_sum_assignment(C.T)
    return dict(pairs=len(pairs), max_abs_diff_w2sq=float(max(diffs)), max_rel_diff_w2sq=float(max(rels)),
                assignment_total=float(C[sigma, np.arange(C.shape[1])].sum()), lsa_total=float(C[c, r].sum()))


def part_baseline(a):
    import ot
    from wat_nb.matching import subsample_class
    source, target, _ = make_latents(a)
    target = [t[torch.as_tensor(subsample_class(len(t), a.cap, 0, j))] for j, t in enumerate(target)]
    X = source.flatten(2).reshape(-1, 4096)
    Y = torch.cat([t.flatten(1) for t in target])
    yoff = np.cumsum([0] + [len(t) for t in target])
    rss0 = peak_rss_mb()
    c0, t0 = cpu_s(), time.perf_counter()
    D = (torch.cdist(X, Y) ** 2).double().numpy()  # (K m, N_t)
    t1, c1 = time.perf_counter(), cpu_s()
    rng = np.random.default_rng(2)
    pairs = [(int(rng.integers(len(source))), int(rng.integers(len(target)))) for _ in range(a.baseline_pairs)]
    c2, t2 = cpu_s(), time.perf_counter()
    for i, j in pairs:
        M = D[i * a.m:(i + 1) * a.m, yoff[j]:yoff[j + 1]]
        ot.emd2(np.full(a.m, 1 / a.m), np.full(len(M[0]), 1 / len(M[0])), M)
    t3, c3 = time.perf_counter(), cpu_s()
    n_pairs = len(source) * len(target)
    per, per_cpu = (t3 - t2) / len(pairs), (c3 - c2) / len(pairs)
    return dict(cdist_s=t1 - t0, emd2_per_pair_us=per * 1e6, emd2_pairs_timed=len(pairs),
                extrapolated_total_s=(t1 - t0) + per * n_pairs, n_pairs=n_pairs,
                extrapolated_cpu_s=(c1 - c0) + per_cpu * n_pairs, load=os.getloadavg()[0],
                rss_before_mb=rss0, rss_peak_mb=peak_rss_mb())


def part_lsa(a):
    "The assignment-solver alternative: replicate each source point n/m times and run linear_sum_assignment."
    import scipy.optimize
    from wat_nb.matching import sq_dists
    source, target, _ = make_latents(a)
    rng = np.random.default_rng(3)
    pairs = [(int(rng.integers(len(source))), int(rng.integers(len(target)))) for _ in range(a.baseline_pairs)]
    cap = min(a.cap, a.min_per_class) // a.m * a.m  # a multiple of m, so that each source point is copied cap/m times
    Ms = [sq_dists(source[i].flatten(1), target[j][:cap].flatten(1)).double().numpy() for i, j in pairs]
    t0 = time.perf_counter()
    for M in Ms:
        R = np.repeat(M, M.shape[1] // M.shape[0], axis=0)
        r, c = scipy.optimize.linear_sum_assignment(R)
    per = (time.perf_counter() - t0) / len(Ms)
    return dict(lsa_per_pair_us=per * 1e6, pairs_timed=len(Ms))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--source-classes', type=int, default=1000)
    p.add_argument('--m', type=int, default=10, help='samples per source class')
    p.add_argument('--target-classes', type=int, default=101)
    p.add_argument('--min-per-class', type=int, default=60, help='smallest target class before the cap')
    p.add_argument('--max-per-class', type=int, default=300, help='largest target class before the cap')
    p.add_argument('--cap', type=int, default=50, help='target images per class used for the cost')
    p.add_argument('--threads', type=int, default=None, help='OT solver threads (default: all usable cores)')
    p.add_argument('--verify-pairs', type=int, default=300)
    p.add_argument('--baseline-pairs', type=int, default=3000)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='/tmp/bench_matching_C.npy')
    p.add_argument('--part', choices=['fast', 'verify', 'baseline', 'lsa'], default=None)
    a = p.parse_args()
    if a.part:
        print(json.dumps(globals()[f'part_{a.part}'](a)))
        return
    print(f'cores usable: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()}')
    print(f'{a.source_classes} source classes x {a.m} samples, {a.target_classes} target classes x '
          f'{a.min_per_class}-{a.max_per_class} images capped at {a.cap}, d = 4096')
    res = {}
    for part in ['fast', 'verify', 'baseline', 'lsa']:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], '--part', part], check=True,
                             capture_output=True, text=True).stdout
        res[part] = json.loads(out.strip().splitlines()[-1])
    f, v, b, l = res['fast'], res['verify'], res['baseline'], res['lsa']
    print(f"\nexact fast path (class_cost_matrix + match_classes), {f['torch_threads']} torch threads:")
    print(f"  cost matrix {f['cost_matrix_s']:.2f} s + assignment {f['assignment_s']:.3f} s = {f['total_s']:.2f} s wall,"
          f" {f['cpu_s']:.1f} CPU s (load average {f['load']:.1f})"
          f"   C {f['shape']}, matching accuracy on the planted answer {f['accuracy']:.3f}")
    print(f"  peak RSS {f['rss_peak_mb']:.0f} MB (inputs alone {f['rss_before_mb']:.0f} MB), numpy peak (tracemalloc) {f['numpy_peak_mb']:.0f} MB")
    print(f"exactness vs ot.emd2 on float64 costs, {v['pairs']} random pairs: max |dW2^2| = {v['max_abs_diff_w2sq']:.3g}"
          f" (max relative {v['max_rel_diff_w2sq']:.2g}); assignment total {v['assignment_total']:.6f} vs"
          f" scipy linear_sum_assignment {v['lsa_total']:.6f}")
    print(f"plain loop baseline: torch.cdist {b['cdist_s']:.2f} s (full) + ot.emd2 {b['emd2_per_pair_us']:.0f} us/pair "
          f"timed on {b['emd2_pairs_timed']} pairs, EXTRAPOLATED to {b['n_pairs']} pairs: {b['extrapolated_total_s']:.1f} s wall,"
          f" {b['extrapolated_cpu_s']:.1f} CPU s (load average {b['load']:.1f}); peak RSS {b['rss_peak_mb']:.0f} MB")
    print(f"alternative, replicated-point linear_sum_assignment: {l['lsa_per_pair_us']:.0f} us/pair on {l['pairs_timed']} pairs "
          f"(x {b['n_pairs']} pairs = {l['lsa_per_pair_us'] * b['n_pairs'] / 1e6:.1f} s of solver time alone)")
    print(f"speed-up over the (extrapolated) baseline: {b['extrapolated_total_s'] / f['total_s']:.1f}x wall, "
          f"{b['extrapolated_cpu_s'] / f['cpu_s']:.1f}x CPU time")


if __name__ == '__main__':
    main()
