"""A tiny fine-tuning run for tests/test_finetune.py, as a plain subprocess or under `accelerate launch`.

Usage: python tests/_train_worker.py --out RUN_DIR [--steps N] [--ckpt-every K] [--kill-after S] [--info-dir D] ...
With --kill-after S the process SIGKILLs itself right after checkpoint S is complete. With --info-dir D every
process writes D/rank<r>.json = {rank, world, pid} after training.
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for wat_nb

from wat_nb.finetune import FinetuneConfig, finetune  # noqa: E402
from wat_nb.models import build_dit  # noqa: E402


class ToyDataset(torch.utils.data.Dataset):
    "`n_per_class` noisy 3x`size`x`size` images per class in [-1, 1], each class its own mean colour pattern."
    def __init__(self, num_classes: int = 4, n_per_class: int = 12, size: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        means = torch.rand(num_classes, 3, size, size, generator=g) * 1.6 - 0.8
        self.targets = [c for c in range(num_classes) for _ in range(n_per_class)]
        self.images = (means[self.targets] + 0.1 * torch.randn(len(self.targets), 3, size, size, generator=g)).clamp(-1, 1)
        self.classes = [f'c{c}' for c in range(num_classes)]

    def __len__(self): return len(self.targets)
    def __getitem__(self, i): return self.images[i], self.targets[i]


def tiny_model(num_classes: int = 4, learn_sigma: bool = False):
    "The tiny tied DiT (depth 2, width 32, 8x8, patch 2) with fixed initial weights."
    return build_dit('tiny', num_classes, seed=0, learn_sigma=learn_sigma)


def config(out, **kw) -> FinetuneConfig:
    "The test runs' config: small batch, few steps, quick EMA; `kw` overrides."
    base = dict(output=str(out), steps=6, batch_size=8, lr=1e-3, ckpt_every=2, log_every=2, keep_last=5,
                ema_decay=0.9, label_dropout=0.1, seed=0)
    return FinetuneConfig(**{**base, **kw})


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--out', required=True)
    p.add_argument('--steps', type=int, default=6)
    p.add_argument('--ckpt-every', type=int, default=2)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--mixed-precision', default='no')
    p.add_argument('--learn-sigma', action='store_true')
    p.add_argument('--kill-after', type=int, default=None)
    p.add_argument('--info-dir', default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    def on_checkpoint(step, path):
        if a.kill_after is not None and step == a.kill_after: os.kill(os.getpid(), signal.SIGKILL)

    cfg = config(a.out, steps=a.steps, ckpt_every=a.ckpt_every, batch_size=a.batch, lr=a.lr,
                 mixed_precision=a.mixed_precision)
    res = finetune(tiny_model(learn_sigma=a.learn_sigma), ToyDataset(), cfg, on_checkpoint=on_checkpoint)
    if a.info_dir:
        from accelerate.state import PartialState
        st = PartialState()
        Path(a.info_dir).mkdir(parents=True, exist_ok=True)
        (Path(a.info_dir) / f'rank{st.process_index}.json').write_text(json.dumps(
            dict(rank=st.process_index, world=st.num_processes, pid=os.getpid(), step=res.step)))


if __name__ == '__main__':
    main()
