"""The paper profile rehearsed on the CPU with stand-ins in the real formats (tests/standins.py): a DiT pipeline folder
laid out like the hub's `facebook/DiT-XL-2-256` (1000 classes + null, learned sigma, 32x32x4 latents), a tiny SD-style
VAE, the same weights as an original DiT `.pt`, SUN397's layout with 300x400 JPEGs, ImageNet-like source images for
ANT and torch-fidelity's feature-network files under TORCH_HOME. Offline: nothing here may reach a hub.

The driver's paper smoke plan runs the steps of Tables 1-2 and a few-shot WAT run trained with ANT (every step kind: the
matching over 1000 source classes, fine-tuning, ANT's domain classifier on ImageNet-like source images, sampling with
scores, a paper notebook); the other few-shot runs and the few-shot table differ from these only in knobs, and run in
the mini smoke plan; `bash benchmarks/gpu_check.sh` runs the whole paper smoke plan."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow          # end to end through papermill kernels: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from standins import NUM_SOURCE_CLASSES, evaluate_params, paper_standins, run_notebook, train_params  # noqa: E402

ONLY = "paper/table1_2_transfer,sample/sun/wat-ant-2shot-*"   # Tables 1-2, and a few-shot WAT run trained with ANT


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    st = paper_standins(tmp_path_factory.mktemp("standins"))
    old = {k: os.environ.get(k) for k in st["env"]}
    os.environ.update(st["env"])              # papermill's kernels and the driver inherit it: offline, local files
    yield st
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


def _driver(st, root: Path, *extra):
    cmd = [sys.executable, "-m", "wat_nb.reproduce", "--profile", "paper", "--smoke", "--jobs", "2", "--only", ONLY,
           "--set", f"pretrained={st['pipeline']}", "--set", f"vae={st['vae']}", "--set", f"ant_source={st['source']}",
           "--set", f"runs_root={root}", "--set", f"out_dir={root / 'figures'}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def plan(standins, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    r = _driver(standins, root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return standins, root, r.stdout


def _stdout(nb_path: Path) -> str:
    "Everything an executed notebook printed."
    nb = json.loads(Path(nb_path).read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


def test_driver_runs_every_step_kind_and_then_has_nothing_left(plan):
    st, root, out = plan
    last = out.strip().splitlines()[-1]
    assert " 0 failed" in last and " 0 not run" in last, last
    runs = {p.name for p in (root / "sun").iterdir()}
    assert runs == {"identity-t0-1000-s0", "wat-t0-1000-s0", "wat-ant-2shot-t0-1000-s0"}, runs
    assert (root / "figures" / "table1_2_values.md").is_file(), sorted(p.name for p in (root / "figures").iterdir())
    ant = json.loads((root / "sun" / "wat-ant-2shot-t0-1000-s0" / "run.json").read_text())
    assert ant["method"] == "wat" and ant["extra"]["shots"] == 2 and ant["extra"]["ant"]["source"] == str(st["source"])
    again = _driver(st, root, "--dry-run")
    assert again.returncode == 0 and "to run" not in again.stdout, again.stdout[-2000:]


def test_wat_run_of_the_plan(plan):
    st, root, _ = plan
    run = root / "sun" / "wat-t0-1000-s0"
    draws = sorted((root / "matching").glob("source-*.npz"))   # Algorithm 1 drew every source class in latent space
    assert len(draws) == 1
    with np.load(draws[0]) as z:
        assert z["class_ids"].tolist() == list(range(NUM_SOURCE_CLASSES)) and z["x"].shape[2:] == (4, 32, 32)
    info = json.loads((run / "run.json").read_text())
    assert info["profile"] == "paper" and info["image_size"] == 256 and info["source"]["classes"] == NUM_SOURCE_CLASSES
    assert info["extra"]["vae"] == str(st["vae"])          # sample.ipynb takes its VAE from the run
    doc = json.loads((run / "matching.json").read_text())
    sigma = doc["sigma"]
    assert len(sigma) == 4 and len(set(sigma)) == 4 and max(sigma) < NUM_SOURCE_CLASSES
    assert all(e["source_name"] and "runner_up_name" in e for e in doc["matching"].values())
    assert not (run / ".incomplete").exists() and (run / "latest").is_file()
    final = run / "final" / "ema"                          # the paper preset keeps the final EMA weights for sampling
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))
    assert len(list((run / "checkpoints").glob("step-*"))) == 1   # and one resumable checkpoint
    log = _stdout(root / "reproduce" / "logs" / "train" / "sun" / "wat-t0-1000-s0.ipynb")
    assert "device: cpu" in log                            # the notebook says where it runs
    for f in run.rglob("*"):
        if f.is_file(): assert f.stat().st_mode & 0o044 == 0o044, f   # a colleague can read a shared run
    with np.load(run / "samples" / "clr-w0.5-ddpm2-s0.npz") as z:
        images, labels, params = z["images"], z["labels"], json.loads(str(z["params"]))
    assert images.shape == (8, 256, 256, 3) and images.dtype == np.uint8 and images.std() > 0
    assert labels.tolist() == [s for s in sigma for _ in range(2)]   # a WAT run is sampled at its matched labels
    assert params["mode"] == "clr" and params["guided_channels"] == 3   # DiT's released sampler guides 3 channels
    m = json.loads((run / "samples" / "clr-w0.5-ddpm2-s0.metrics.json").read_text())
    assert {"fid", "fd_dinov2"} <= set(m) and m["n_samples"] == 8 and "500" in m["warning"]


def test_evaluate_fid_kid_fd_dinov2_of_a_plan_sample_set(plan, tmp_path):
    st, root, _ = plan
    run = root / "sun" / "identity-t0-1000-s0"
    run_notebook("evaluate.ipynb", tmp_path / "evaluate.ipynb", evaluate_params(run, "cfg-w0.5-ddpm2-s0"))
    m = json.loads((run / "samples" / "cfg-w0.5-ddpm2-s0.metrics.json").read_text())
    assert all(np.isfinite(m[k]) for k in ("fid", "kid_mean", "fd_dinov2")), m
    assert m["feature_spaces"]["fd_dinov2"].startswith("dinov2-vit-l-14") and m["reference"] == "sun/test"


def test_train_from_the_original_dit_checkpoint(standins, tmp_path):
    st = standins
    p = train_params(st, tmp_path / "runs", pretrained=st["original"], method="identity", steps=1, run_name="from-pt")
    run_notebook("train.ipynb", tmp_path / "train-pt.ipynb", p)
    run = tmp_path / "runs" / "sun" / "from-pt"
    info = json.loads((run / "run.json").read_text())
    assert info["source"]["name"] == str(st["original"]) and info["source"]["classes"] == NUM_SOURCE_CLASSES
    assert (run / "latest").is_file() and (run / "final" / "ema" / "config.json").is_file()
