"""The reproduction driver: kill and resume, skipping finished steps, dry runs, the command line, completion checks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wat_nb.core import repo_root
from wat_nb.plan import (build_plan, metrics_complete, plan_config, run_finished, sample_set_done,
                              samples_complete)
from wat_nb.runner import Step, run_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_steps import fake_plan  # noqa: E402

TESTS = str(Path(__file__).resolve().parent)

ROOT = repo_root()
WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from fake_steps import fake_plan
from wat_nb.runner import run_plan
root, slow = Path(sys.argv[1]), float(sys.argv[2])
steps = fake_plan(root, 4)
steps[2].params["sleep"] = slow          # the third step can be made slow, to kill the driver inside it
res = run_plan(steps, root=root, progress=False)
print("papermill loaded:", "papermill" in sys.modules)
sys.exit(1 if res["failed"] else 0)
"""


def _worker(tmp_path: Path) -> Path:
    p = tmp_path / "worker.py"
    p.write_text(WORKER)
    return p


def _counts(root: Path) -> dict:
    names = [Path(m).name for m in (root / "count.txt").read_text().split()] if (root / "count.txt").exists() else []
    return {n: names.count(n) for n in set(names)}


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.slow
def test_kill_then_resume_then_skip(tmp_path):
    root = tmp_path / "plan"
    worker = _worker(tmp_path)
    proc = subprocess.Popen([sys.executable, str(worker), str(root), "60", TESTS], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.time()
    while _counts(root).get("2.txt", 0) == 0:       # wait until the slow third step has started
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() - t0 < 120, "the driver never reached the third step"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (root / "out/0.txt").is_file() and (root / "out/1.txt").is_file()
    assert not (root / "out/3.txt").exists()

    r = _run([str(worker), str(root), "0", TESTS])          # resume: only the killed step and the one after it run
    assert r.returncode == 0, r.stdout + r.stderr
    assert _counts(root) == {"0.txt": 1, "1.txt": 1, "2.txt": 2, "3.txt": 1}
    assert all((root / f"out/{i}.txt").is_file() for i in range(4))
    assert "2 done, 2 skipped" in r.stdout

    r = _run([str(worker), str(root), "0", TESTS])          # everything done: no kernel starts, papermill is not even loaded
    assert r.returncode == 0 and "0 done, 4 skipped" in r.stdout, r.stdout + r.stderr
    assert "papermill loaded: False" in r.stdout
    assert _counts(root) == {"0.txt": 1, "1.txt": 1, "2.txt": 2, "3.txt": 1}


def test_failing_step_stops_with_its_log(tmp_path):
    steps = fake_plan(tmp_path, 3)
    (tmp_path / "fail-0").touch()
    res = run_plan(steps, root=tmp_path, progress=False, echo=lambda *_: None)
    assert res["failed"] == ["fake/0"] and res["done"] == [] and res["not_run"] == 2
    log = Path(res["log"])
    assert log == tmp_path / "runs/reproduce/logs/fake/0.ipynb" and log.is_file()
    assert "asked to fail" in log.read_text()


def test_step_whose_check_still_fails_is_a_failure(tmp_path):
    steps = fake_plan(tmp_path, 1)
    steps[0].outputs = ("somewhere/else.txt",)       # the notebook runs but never writes this
    res = run_plan(steps, root=tmp_path, progress=False, echo=lambda *_: None)
    assert res["failed"] == ["fake/0"]


@pytest.mark.slow
def test_dry_run_lists_steps_and_runs_nothing(tmp_path):
    r = _run(["-m", "wat_nb.reproduce", "--smoke", "--dry-run", "--only", "paper/table3*"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(l.split()[-1:] == ["pretrain"] or "pretrain " in l for l in lines)
    assert any("paper/table3_timestep_range" in l for l in lines)
    assert any("train/shapes-near/identity-t0-600-s0" in l for l in lines)
    assert not any("table1_2" in l for l in lines)                  # --only keeps the table and what it needs
    assert "would run" in lines[-1] and "0 failed" in lines[-1]


@pytest.mark.slow
def test_paper_plan_dry_run():
    r = _run(["-m", "wat_nb.reproduce", "--profile", "paper", "--dry-run", "--only", "paper/table1*"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for t in ("food", "sun", "caltech", "cub", "cars", "df20m", "artbench"):
        assert f"train/{t}/wat-t0-1000-s2" in r.stdout
    assert "dataset=food" in r.stdout and "n_per_class=100 " in r.stdout      # 10k samples over 101 classes
    assert "metrics=fid,kid,prc,fd_dinov2" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [(["--profile", "imagenet"], "invalid choice"),
                                           (["--set", "colour=red"], "KNOB=VALUE"),
                                           (["--set", "targets=nope"], "unknown target"),
                                           (["--only", "nothing-like-this"], "no step matches")])
def test_bad_arguments(args, message):
    r = _run(["-m", "wat_nb.reproduce", "--dry-run", *args], cwd=ROOT)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def _fake_run(run: Path, steps: int, classes: int = 3):
    "A run folder as wat_nb.finetune leaves it: config.json, a checkpoint with state.json, and `latest`."
    ck = run / "checkpoints" / f"step-{steps}"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps(dict(step=steps, label_lookup=list(range(classes)))))
    (run / "config.json").write_text(json.dumps(dict(steps=steps)))
    (run / "latest").write_text(f"checkpoints/step-{steps}")


def test_completion_checks_of_the_entry_notebooks(tmp_path):
    cfg = plan_config(seeds=(0,), targets=("shapes-near",), runs_root=str(tmp_path / "runs"), n_per_class=2,
                      finetune_steps=3, regime_target="")
    plan = {s.name: s for s in build_plan(cfg)}
    train = plan["train/shapes-near/wat-t0-1000-s0"]
    sample = plan["sample/shapes-near/wat-t0-1000-s0/clr-w0.5-ddpm50-s0"]
    run = tmp_path / train.outputs[0]
    assert not run_finished(train, tmp_path)
    _fake_run(run, 3)
    assert run_finished(train, tmp_path)                          # at the configured steps
    train.params["steps"] = 10
    assert not run_finished(train, tmp_path)                      # the knob asks for more steps
    npz = tmp_path / sample.outputs[0]
    npz.parent.mkdir(parents=True)
    np.savez(npz, images=np.zeros((5, 8, 8, 3), np.uint8), labels=np.zeros(5), params=np.array("{}"))
    assert not samples_complete(sample, tmp_path)                 # 5 images, not 2 x 3 classes
    np.savez(npz, images=np.zeros((6, 8, 8, 3), np.uint8), labels=np.zeros(6), params=np.array("{}"))
    assert samples_complete(sample, tmp_path)
    os.utime(npz, (1, 1))                                         # older than the run's latest checkpoint
    assert not samples_complete(sample, tmp_path)
    os.utime(npz)
    assert sample.check is sample_set_done and not sample_set_done(sample, tmp_path)  # samples, but no scores yet
    met = tmp_path / sample.outputs[1]
    assert met.name == "clr-w0.5-ddpm50-s0.metrics.json" and sample.params["metrics"] == cfg.metrics
    met.write_text(json.dumps(dict(fid=1.0, kid_mean=0.1, precision=0.5)))
    assert not metrics_complete(sample, tmp_path)                 # fd_mid was asked for
    met.write_text(json.dumps(dict(fid=1.0, kid_mean=0.1, precision=0.5, fd_mid=2.0)))
    assert metrics_complete(sample, tmp_path) and sample_set_done(sample, tmp_path)
    os.utime(met, (1, 1))                                         # older than its samples
    assert not metrics_complete(sample, tmp_path) and not sample_set_done(sample, tmp_path)


@pytest.mark.slow
def test_paper_notebook_names_missing_results(tmp_path):
    import papermill as pm
    out = tmp_path / "table.ipynb"
    over = json.dumps(dict(runs_root=str(tmp_path / "runs"), out_dir=str(tmp_path / "fig"), seeds=[0, 1]))
    env = {k: v for k, v in os.environ.items() if k != "IN_TEST"}
    with pytest.raises(pm.PapermillExecutionError) as e:
        old = dict(os.environ); os.environ.clear(); os.environ.update(env)
        try:
            pm.execute_notebook(str(ROOT / "nbs/paper/table1_2_transfer.ipynb"), str(out), kernel_name="python3",
                                parameters=dict(overrides=over), cwd=str(ROOT), progress_bar=False)
        finally:
            os.environ.clear(); os.environ.update(old)
    msg = e.value.evalue
    assert e.value.ename == "FileNotFoundError"
    assert "54 of 54 result files are missing" in msg and "none-w0-ddpm50-s1.npz" in msg
    assert "python -m wat_nb.reproduce --profile mini" in msg and "--only 'paper/table1_2_transfer'" in msg
    assert not (tmp_path / "fig").exists()


PAIR_BODY = """import os, time
from pathlib import Path
Path(marker + ".started").write_text(os.environ.get("OMP_NUM_THREADS", "unset"))
t0 = time.time()
while not Path(other + ".started").exists():         # only a driver running both at once gets past this
    if time.time() - t0 > 60: raise RuntimeError("the other step never started")
    time.sleep(0.1)
Path(marker).write_text("ok")"""


def _pair(tmp_path: Path) -> list:
    import nbformat
    params = nbformat.v4.new_code_cell('marker = ""\nother = ""')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(PAIR_BODY)])
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, str(tmp_path / "nbs" / "pair.ipynb"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    after = Step("pair/c", "nbs/fake.ipynb", dict(marker=str(tmp_path / "c"), counter=str(tmp_path / "count.txt")),
                 None, ("pair/a", "pair/b"), ("c",))
    fake_plan(tmp_path, 1)                            # writes nbs/fake.ipynb
    return [Step("pair/a", "nbs/pair.ipynb", dict(marker=a, other=b), None, (), ("a",)),
            Step("pair/b", "nbs/pair.ipynb", dict(marker=b, other=a), None, (), ("b",)), after]


@pytest.mark.slow
def test_jobs_run_independent_steps_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cwd = os.getcwd()
    res = run_plan(_pair(tmp_path), root=tmp_path, progress=False, echo=lambda *_: None, jobs=2)
    assert os.getcwd() == cwd                                       # two kernels at once leave this process where it was
    assert res["done"][-1] == "pair/c" and sorted(res["done"][:2]) == ["pair/a", "pair/b"] and not res["failed"]
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert (tmp_path / "a.started").read_text() == str(threads)     # each kernel got its share of the cores
    assert "OMP_NUM_THREADS" not in os.environ                      # and the driver's environment is restored


def test_one_job_runs_in_order(tmp_path):
    steps = _pair(tmp_path)
    steps[0].params["other"] = str(tmp_path / "never")  # a alone cannot wait for b: it fails after its timeout
    steps[0].params["marker"] = str(tmp_path / "a")
    import nbformat
    nb = nbformat.read(str(tmp_path / "nbs" / "pair.ipynb"), as_version=4)
    nb.cells[1].source = nb.cells[1].source.replace("> 60", "> 2")
    nbformat.write(nb, str(tmp_path / "nbs" / "pair.ipynb"))
    res = run_plan(steps, root=tmp_path, progress=False, echo=lambda *_: None, jobs=1)
    assert res["failed"] == ["pair/a"] and res["done"] == [] and res["not_run"] == 2
    assert not (tmp_path / "b.started").exists()      # b never started: one step at a time, and none after a failure


def test_mini_plan_matches_in_both_spaces_the_paper_in_its_input_space_and_figure1_reads_the_table1_run():
    steps = {s.name: s for s in build_plan(plan_config())}
    wat = steps["train/shapes-near/wat-t0-1000-s0"]
    assert wat.params["match_space"] == "both" and wat.params["match_m"] == 8 and wat.params["steps"] == 1000
    long = steps["train/shapes-mid/wat-4000steps-t0-1000-s0"]                 # the regime map's run, read at 1000
    assert long.params["match_space"] == "both" and long.params["steps"] == 4000 and long.params["snapshots"] == "500,1000,4000"
    paper = {s.name: s for s in build_plan(plan_config("paper"))}
    assert {s.params.get("match_space") for n, s in paper.items() if n.startswith("train/")} == {"input"}
    fig1 = steps["paper/fig1_trajectories"]
    assert fig1.params["class_target"] == "shapes-mid" and fig1.params["wat_run"] == "wat-4000steps-t0-1000-s0"
    assert "train/shapes-mid/wat-4000steps-t0-1000-s0" in fig1.deps
    assert list(fig1.inputs) == ["runs/shapes-mid/wat-4000steps-t0-1000-s0/matching.json"]



def test_sampler_check_and_claims_read_the_tables_sets_and_the_maps_sets_of_the_same_snapshot():
    steps = {s.name: s for s in build_plan(plan_config())}
    deps = lambda name: set(steps[f"paper/{name}"].deps)
    run = "sample/shapes-mid/wat-4000steps-t0-1000-s0"
    assert {f"{run}/clr-w0.5-ddpm50-s0-k1000", f"{run}/clr-w0.5-ddim25-s0-k1000", f"{run}/none-w0-ddim25-s0-k1000"} \
        <= deps("table_sampler_check")
    tables = deps("table1_2_transfer") | deps("fig3_clr_scale") | deps("table3_timestep_range") | deps("table4_sampling_steps")
    assert deps("table_sampler_check") <= tables | deps("fig_regime")           # no sets of their own
    assert deps("table_claims") <= tables | deps("fig_regime")
    assert {"sample/shapes-mid/identity-t0-600-s0/cfg-w0.5-ddpm50-s0", f"{run}/clr-w0.5-ddpm25-s0-k1000",
            f"{run}/clr-w0.3-ddim25-s0-k1000"} <= deps("table_claims")          # [0, 600), fewer steps, the map's weights
    table = steps[f"{run}/clr-w0.5-ddpm50-s0-k1000"]
    assert (table.params["sampler"], table.params["steps"], table.params["snapshot"], table.params["n_per_class"]) \
        == ("ddpm", 50, 1000, 50)
    assert table.deps == ("train/shapes-mid/wat-4000steps-t0-1000-s0",)        # the map's run, at the plan's length
    off = {s.name for s in build_plan(plan_config(regime_target=""))}
    assert not {"paper/fig_regime", "paper/table_sampler_check", "paper/table_claims"} & off
    with pytest.raises(ValueError, match="sampler ddpm or ddim"): plan_config(regime_sampler="euler")
    with pytest.raises(ValueError, match="unknown knob"): plan_config(sampler_check_step=1000)


# ------------------------------------------------------------------ the paper profile: what the plan passes

def _plan(profile="mini", smoke=False, **kw) -> dict:
    return {s.name: s for s in build_plan(plan_config(profile, smoke, **kw))}


def test_sample_steps_read_the_model_from_the_run_and_train_steps_get_pretrained_and_vae():
    for plan in (_plan(smoke=True), _plan("paper", pretrained="/w/DiT-XL-2-256", vae="/w/sd-vae-ft-ema",
                                          ant_source="/w/imagenet")):
        samples = [s for n, s in plan.items() if n.startswith("sample/")]
        trains = [s for n, s in plan.items() if n.startswith("train/")]
        assert samples and trains
        assert not [s.name for s in samples if {"pretrained", "vae"} & set(s.params)]   # sample.ipynb reads run.json
        assert {s.params["pretrained"] for s in trains} == {plan_config_of(plan)["pretrained"]}
    paper = _plan("paper", pretrained="/w/DiT-XL-2-256", vae="/w/sd-vae-ft-ema", ant_source="/w/imagenet")
    assert {s.params["vae"] for n, s in paper.items() if n.startswith("train/")} == {"/w/sd-vae-ft-ema"}
    assert not any("vae" in s.params for n, s in _plan().items() if n.startswith("train/"))  # empty: the profile's


def plan_config_of(plan: dict) -> dict:
    "The pretrained knob a plan was built with, read back from its pretraining step or its first train step."
    first = next(s for n, s in plan.items() if n.startswith("train/"))
    return {"pretrained": first.params.get("pretrained", "")}


def _main(args, capsys) -> tuple:
    from wat_nb.reproduce import main
    try: code = main(args)
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_paper_plan_without_an_ant_source_fails_at_once_with_how_to_fix(capsys):
    code, out, err = _main(["--profile", "paper", "--dry-run"], capsys)
    assert code == 2 and "ant_source" in err and "--set ant_source=" in err and "fewshot_targets=" in err, err
    assert "train/food/identity-ant-10shot" in err                       # names a run that needs it
    code, out, err = _main(["--profile", "paper", "--dry-run", "--set", "ant_source=/data/imagenet-train"], capsys)
    assert code == 0, err
    ant = [l for l in out.splitlines() if l.startswith("to run  train/") and "ant=True" in l]
    assert len(ant) == 2 * 3 and all("ant_source=/data/imagenet-train" in l for l in ant)   # ANT, WAT + ANT x 3 seeds
    code, out, err = _main(["--profile", "paper", "--dry-run", "--set", "fewshot_targets="], capsys)
    assert code == 0 and "ant=True" not in out and "table_fewshot" not in out, err
    code, out, err = _main(["--profile", "paper", "--dry-run", "--only", "paper/table1*"], capsys)
    assert code == 0, err                                               # the steps asked for train no ANT run


def test_finetune_steps_0_means_the_profiles_preset(tmp_path):
    from wat_nb.finetune import FINETUNE_PRESETS
    for profile, extra in (("mini", {}), ("paper", dict(ant_source="/x"))):
        cfg = plan_config(profile, seeds=(0,), finetune_steps=0, runs_root=str(tmp_path / profile), **extra)
        plan = {s.name: s for s in build_plan(cfg)}
        train = next(s for n, s in plan.items() if n.startswith("train/") and "shot" not in n and "steps-" not in n)
        want = FINETUNE_PRESETS[profile]["steps"]
        assert train.params["steps"] == want                             # passed explicitly, never 0
        _fake_run(tmp_path / train.outputs[0], 4)
        assert not run_finished(train, tmp_path)                         # a 4-step run is not the preset's run
        shot = next(s for n, s in plan.items() if n.startswith("train/") and "shot" in n)
        assert shot.params["steps"] == cfg.fewshot_steps
    assert all(s.params["steps"] > 0 for n, s in _plan(smoke=True).items() if n.startswith("train/"))


def test_finished_run_at_the_preset_steps(tmp_path):
    cfg = plan_config("paper", seeds=(0,), finetune_steps=0, runs_root=str(tmp_path / "runs"), ant_source="/x")
    train = next(s for s in build_plan(cfg) if s.name.startswith("train/sun/wat"))
    _fake_run(tmp_path / train.outputs[0], 24_000)
    assert run_finished(train, tmp_path)


def test_paper_smoke_plan(tmp_path, capsys):
    from wat_nb.plan import fewshot_results
    from wat_nb.runner import check_params
    cfg = plan_config("paper", smoke=True, pretrained="/w/pipe", vae="/w/pipe/vae", ant_source="/w/src")
    plan = build_plan(cfg)
    check_params(plan)
    names = [s.name for s in plan]
    assert cfg.profile == "paper" and cfg.smoke and cfg.scores == {"fid": "FID", "fd_dinov2": "FD_DINOv2"}
    assert "pretrain" not in names                                      # DiT-XL/2's stand-in is given, not trained
    trains = [s for s in plan if s.notebook == "nbs/train.ipynb"]
    assert {s.params["dataset"] for s in trains} == {"sun"} and all(0 < s.params["steps"] <= 4 for s in trains)
    assert sum(bool(s.params.get("ant")) for s in trains) == 2          # one few-shot target and seed: ANT, WAT + ANT
    assert len(fewshot_results(cfg)) == 4 and len(cfg.seeds) == 1
    samples = [s for s in plan if s.notebook == "nbs/sample.ipynb"]
    assert all(s.params["n_per_class"] <= 2 and s.params["steps"] <= 4 for s in samples)
    assert {"fid", "kid", "fd_dinov2"} <= set(samples[0].params["metrics"].split(","))
    assert {s.name.split("/")[1] for s in plan if s.name.startswith("paper/")} >= {
        "table1_2_transfer", "table3_timestep_range", "table4_sampling_steps", "fig2_hybrid", "fig3_clr_scale",
        "table_fewshot"}
    assert all(s.outputs[0].startswith("runs/smoke-paper/") for s in plan)
    folder = tmp_path / "my photos"                                     # a user's folder as the one target
    (folder / "a").mkdir(parents=True); (folder / "b").mkdir()
    cfg = plan_config("paper", smoke=True, targets=(str(folder),), ant_source="/w/src")
    assert {cfg.fig2_target, cfg.fig3_target, *cfg.table3_targets, *cfg.table4_targets, *cfg.fewshot_targets} == {str(folder)}
    code, out, err = _main(["--profile", "paper", "--smoke", "--dry-run"], capsys)   # no ant_source: one clear error
    assert code == 2 and "--set ant_source=" in err


def test_results_md_is_the_figures_tables():
    from wat_nb.readers import results_markdown
    assert (ROOT / "RESULTS.md").read_text() == results_markdown(ROOT / "figures"), \
        "RESULTS.md differs from figures/*.md: run `python -m wat_nb.reproduce` (or write_results) to regenerate it"
