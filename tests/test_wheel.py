"""A wheel built from the repository, installed outside the checkout, writes nothing into its own folder: data,
caches, figures and runs go under the working directory (or $WAT_NB_*), whether the library, a notebook or the
driver runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow          # end to end through papermill kernels: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import numpy as np, torch
import wat_nb
from wat_nb.data import load_dataset, verify_images
from wat_nb.models import pretrained
from wat_nb.sampling import generate
from wat_nb.reports import save_table
from wat_nb.metrics import evaluate
print("package", wat_nb.__file__)
ds = load_dataset("shapes-near", image_size=16, max_per_class=2)              # generated and cached
verify_images(load_dataset("shapes-near", split="test", image_size=16, max_per_class=2), progress=False)
model = pretrained("mini")                                                   # read from the package: fine
out = generate(model, None, labels=np.arange(4), mode="none", w=0.0, steps=2, seed=0, out_dir="runs/s", name="x",
               batch_size=4)
save_table([{"a": 1}], "t")                                                  # figures/ of the working root
imgs = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
evaluate(imgs, imgs[::-1].copy(), profile="mini", metrics=("fid",))          # feature cache under data/
'''


def _files(d: Path) -> set:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp / "dist").glob("wat_nb-*.whl"))
    site = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(site)], capture_output=True)
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAT_NB_")}
    env |= dict(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return site, work, env


def test_library_and_notebook_write_under_the_working_directory(installed):
    site, work, env = installed
    before = _files(site)
    assert "wat_nb/weights/mini/config.json" in before and "wat_nb/classes/imagenet1k.txt" in before
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"package {site}" in r.stdout                   # the installed copy ran, not the checkout
    nb = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "nbs" / "paper" / "theorem2.ipynb"),
                         str(work / "theorem2.ipynb"), "-p", "dim", "4", "-p", "n_pairs", "2", "--cwd", str(work),
                         "-k", "python3"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert nb.returncode == 0, nb.stderr[-3000:]
    assert _files(site) == before                          # nothing new in the installed package
    made = _files(work)
    assert any(f.startswith("data/") for f in made) and "runs/s/x.npz" in made and "runs/figures/t.md" in made, made
    assert any(f.startswith("runs/figures/theorem2") for f in made), made


def test_driver_outside_a_checkout_says_so(installed):
    site, work, env = installed
    r = subprocess.run([sys.executable, "-m", "wat_nb.reproduce", "--smoke", "--dry-run"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not a wat_nb checkout" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "wat_nb.reproduce", "--smoke", "--dry-run", "--only", "paper/table3*"],
                       cwd=work, env=env | {"WAT_NB_ROOT": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "paper/table3_timestep_range" in r.stdout, r.stderr[-2000:]
