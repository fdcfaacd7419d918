"""A user's own folder of labelled images through the README's commands: train, sample (cfg, clr), evaluate; a second
folder with the same name is a new run; every bad input fails before anything is written."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow          # end to end through papermill kernels: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from train_cells import train_cells_until_start  # noqa: E402
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "neuf é"]  # a space, a non-ASCII letter


def make_folder(base: Path, seed: int, n: int = 12, classes=CLASSES) -> Path:
    "base/<class>/<i>.png: 28x28 grayscale digit-like blobs, one shape per class."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    for c, name in enumerate(classes):
        (base / name).mkdir(parents=True)
        for i in range(n):
            cy, cx = 14 + rng.integers(-3, 4), 14 + rng.integers(-3, 4)
            r = 4 + (c % 5) + rng.random()
            ring = np.abs(np.hypot(yy - cy, xx - cx) - r) < 1.5 + (c // 5)
            img = (ring * rng.uniform(150, 255) + rng.normal(0, 10, (28, 28))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img, "L").save(base / name / f"{i:03d}.png")
    return base


def readme_commands() -> list[list[str]]:
    "The papermill commands of the README's own-data block, split into arguments."
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- own-data -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "the README has no own-data command block"
    return [shlex.split(line.split("  #")[0]) for line in block.group(1).splitlines() if "papermill" in line]


TINY = {  # appended to the README's commands: tiny settings for a 2-core CPU
    "nbs/train.ipynb": ["-p", "steps", "4", "-p", "batch_size", "8", "-p", "match_m", "2", "-p", "match_steps", "3",
                        "-p", "match_cap", "5", "-p", "grid_per_class", "1"],
    "nbs/sample.ipynb": ["-p", "n_per_class", "2", "-p", "steps", "3", "-p", "name", "SETNAME"],
    "nbs/evaluate.ipynb": ["-p", "metrics", "fid,kid"],
}


def run_journey(folder: Path, runs: Path, logs: Path, env: dict, only_train: bool = False) -> list[Path]:
    outs = []
    for args in readme_commands():
        nb = next(a for a in args if a.startswith("nbs/"))
        if only_train and nb != "nbs/train.ipynb": continue
        i = args.index(nb)
        out = logs / f"{len(outs)}-{Path(args[i + 1]).name}"
        args = [sys.executable if a.endswith("papermill") else a for a in args]
        if args[0] == sys.executable: args.insert(1, "-m"); args.insert(2, "papermill")
        args = [str(folder) if a == "/data/my_images" else a for a in args]
        args[args.index(nb) + 1] = str(out)
        extra = list(TINY[nb])
        if nb == "nbs/sample.ipynb":   # keep the set name the README's evaluate command asks for
            mode, w = args[args.index("mode") + 1], args[args.index("w") + 1]
            extra[-1] = f"{mode}-w{float(w):g}-ddpm50-s0"
        root_key = "out_root" if nb == "nbs/train.ipynb" else "runs_root"
        args += extra + ["-p", root_key, str(runs), "--kernel", "python3"]
        r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{shlex.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outs.append(out)
    return outs


def cell_text(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    return "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) +
                     "".join(o.get("data", {}).get("text/markdown", ""))
                     for c in nb["cells"] for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("env")
    e = {k: v for k, v in os.environ.items() if k not in ("IN_TEST", "WAT_NB_DEVICE", "WAT_NB_PRETRAINED")}
    e.update(WAT_NB_DATA=str(tmp / "data"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return e


@pytest.fixture(scope="module")
def journey(tmp_path_factory, env):
    tmp = tmp_path_factory.mktemp("own")
    folder = make_folder(tmp / "first" / "my images", seed=0)
    runs, logs = tmp / "runs", tmp / "logs"
    logs.mkdir()
    return folder, runs, logs, run_journey(folder, runs, logs, env)


def test_readme_commands_train_sample_and_score_a_folder(journey):
    folder, runs, logs, outs = journey
    from wat_nb.runs import dataset_label, read_run
    run = runs / dataset_label(folder) / "wat-t0-1000-s0"
    info = read_run(run)
    assert info["profile"] == "mini" and info["dataset"]["folder"] == str(folder.resolve())
    assert info["dataset"]["classes"] == sorted(CLASSES) and info["image_size"] == 16
    match = json.loads((run / "matching.json").read_text())
    assert len(set(match["sigma"])) == 10 and match["matching"]["neuf é"]["source_name"].split()[-1] in \
        ("circle", "square", "triangle", "star", "cross", "ring", "rhombus", "hexagon")
    assert all("runner_up_name" in e for e in match["matching"].values())
    for f in ("matching.md", "matching.csv", "cost_matrix.csv", "matching.png", "samples_grid.png", "loss.png"):
        assert (run / f).is_file(), f
    assert not (run / ".incomplete").exists()
    for mode in ("cfg", "clr"):
        z = np.load(run / "samples" / f"{mode}-w0.5-ddpm50-s0.npz")
        assert z["images"].shape == (20, 16, 16, 3)
    scores = json.loads((run / "samples" / "clr-w0.5-ddpm50-s0.metrics.json").read_text())
    assert np.isfinite(scores["fid"]) and scores["n_samples"] == 20 and "500" in scores["warning"]
    log = cell_text(outs[0])
    assert "profile mini:" in log and "no GPU" in log and "not RGB" in log and "held out" in log
    assert "| neuf é |" in log and "Next: papermill nbs/sample.ipynb" in log
    assert (run / "run.json").stat().st_mode & 0o777 == 0o644
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in run.rglob("*") if p.is_file())


def test_same_folder_name_other_images_is_a_new_run(journey, tmp_path, env):
    folder, runs, logs, _ = journey
    from wat_nb.runs import dataset_label
    first = runs / dataset_label(folder) / "wat-t0-1000-s0"
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    other = make_folder(tmp_path / "second" / "my images", seed=1, n=10)
    run_journey(other, runs, tmp_path, env, only_train=True)
    after = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert after == before                                      # the first run is untouched
    second = runs / dataset_label(other) / "wat-t0-1000-s0"
    assert second != first and json.loads((second / "run.json").read_text())["key"] != \
        json.loads((first / "run.json").read_text())["key"]
    assert (second / "checkpoints").is_dir()


# Bad input: the train notebook's own cells, executed in this process up to the point where the run folder is
# opened (what papermill would run, without a kernel start per case).
@pytest.mark.parametrize("case,params,msg", [
    ("corrupt", {}, "cannot be read"),
    ("batch", dict(batch_size=100000), "batch_size 100000 is larger than the"),
    ("classes", {}, "Use method 'reinit'"),
    ("steps", dict(steps=0), "steps must be positive, or -1 for the profile's default, got 0"),
    ("crop", dict(crop="zoom"), "unknown crop 'zoom'"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, monkeypatch, case, params, msg):
    monkeypatch.setenv("WAT_NB_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("IN_TEST", raising=False)
    classes = [f"c{i}" for i in range(40)] if case == "classes" else CLASSES[:3]
    folder = make_folder(tmp_path / "imgs", seed=0, n=6, classes=classes)
    if case == "corrupt":
        (folder / classes[1] / "broken.png").write_bytes(b"\x89PNG not really")
        (folder / classes[2] / "empty.jpg").write_bytes(b"")
    runs = tmp_path / "runs"
    with pytest.raises(ValueError) as e:
        train_cells_until_start(dataset=str(folder), out_root=str(runs), profile="mini", **params)
    assert msg in str(e.value), str(e.value)
    if case == "corrupt": assert "broken.png" in str(e.value) or "empty.jpg" in str(e.value)
    assert not runs.exists()


def test_changed_knob_under_the_same_name_is_refused(journey):
    folder, runs, _, _ = journey
    with pytest.raises(ValueError) as e:
        train_cells_until_start(dataset=str(folder), out_root=str(runs), lr=3e-4, match_m=2, match_steps=3,
                                match_cap=5, batch_size=8)
    assert "finetune.lr: 0.0001 -> 0.0003" in str(e.value) and "run_name" in str(e.value)
