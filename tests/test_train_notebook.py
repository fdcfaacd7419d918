"""nbs/train.ipynb through papermill, as a user runs it: bad input fails at once, a small WAT run leaves a full run folder."""
import json
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch

from wat_nb.data import load_dataset
from wat_nb.finetune import latest_checkpoint, read_log
from wat_nb.length import length_curve, list_snapshots, load_snapshot, plateau_step
from wat_nb.models import build_dit, save_dit

pytestmark = pytest.mark.slow          # end to end through papermill kernels: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "train.ipynb"


def run(tmp_path, **params):
    return pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, cwd=str(ROOT),
                               progress_bar=False, kernel_name="python3")


def test_wat_run_matches_then_finetunes(tmp_path, monkeypatch):
    # A tiny stand-in for the pretrained mini model: 32 classes at 16x16, found through WAT_NB_PRETRAINED.
    save_dit(build_dit("tiny", 32, seed=0, sample_size=16), tmp_path / "pre" / "mini")
    monkeypatch.setenv("WAT_NB_PRETRAINED", str(tmp_path / "pre"))
    runs = tmp_path / "runs"
    run(tmp_path, dataset="shapes-near", steps=4, batch_size=8, match_m=2, match_steps=2, match_cap=5,
        out_root=str(runs), mixed_precision="no")
    run_dir = runs / "shapes-near" / "wat-t0-1000-s0"
    doc = json.loads((run_dir / "matching.json").read_text())
    sigma = doc["sigma"]
    assert doc["params"]["space"] == "both"  # the mini profile's default
    assert len(sigma) == 10 and len(set(sigma)) == 10 and all(0 <= s < 32 for s in sigma)
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["label_map"] == sigma
    assert read_log(run_dir)["step"].tolist()[-1] == 4 and (run_dir / "loss.png").is_file()


def test_few_shot_ant_run_with_input_space_matching(tmp_path, monkeypatch):
    save_dit(build_dit("tiny", 32, seed=0, sample_size=16), tmp_path / "pre" / "mini")
    monkeypatch.setenv("WAT_NB_PRETRAINED", str(tmp_path / "pre"))
    runs = tmp_path / "runs"
    run(tmp_path, dataset="shapes-near", steps=2, batch_size=8, match_m=2, match_steps=2, match_cap=3, shots=3,
        ant=True, ant_noise_steps=2, ant_classifier_steps=5, match_space="input", out_root=str(runs),
        mixed_precision="no")
    run_dir = runs / "shapes-near" / "wat-ant-3shot-t0-1000-s0"
    doc = json.loads((run_dir / "matching.json").read_text())
    assert doc["params"]["space"] == "input" and len(set(doc["sigma"])) == 10
    cfg = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["config"]
    assert cfg["ant_gamma"] == 5.0 and cfg["ant_noise_steps"] == 2 and cfg["label_map"] == doc["sigma"]
    assert Path(cfg["ant_classifier"]) == run_dir / "domain_classifier.safetensors"
    assert (run_dir / "domain_classifier.safetensors").is_file()


def test_true_source_run_keeps_snapshots_for_its_length_curve(tmp_path, monkeypatch):
    save_dit(build_dit("tiny", 32, seed=0, sample_size=16), tmp_path / "pre" / "mini")
    monkeypatch.setenv("WAT_NB_PRETRAINED", str(tmp_path / "pre"))
    runs = tmp_path / "runs"
    run(tmp_path, dataset="shapes-mid", method="true-source", steps=6, snapshots="2,6", batch_size=8,
        out_root=str(runs), mixed_precision="no", grid_per_class=0)
    run_dir = runs / "shapes-mid" / "true-source-t0-1000-s0"
    target = load_dataset("shapes-mid", split="test", image_size=16)
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["config"]["label_map"] == target.source_classes and state["config"]["ckpt_every"] == 2
    assert list_snapshots(run_dir) == [2, 6] and not (run_dir / "matching.json").exists()
    final = load_snapshot(run_dir, 6, device="cpu").state_dict()
    ema = build_dit("tiny", 32, seed=0, sample_size=16)
    ema.load_state_dict(final)                                    # the snapshot at the last step is the run's EMA
    x = torch.from_numpy(target.images[:8]).permute(0, 3, 1, 2).float() / 127.5 - 1
    curve = length_curve(run_dir, x, torch.as_tensor(target.source_classes)[target.targets[:8]], n_t=2, progress=False)
    assert sorted(curve) == [2, 6] and all(v > 0 for v in curve.values()) and plateau_step(curve) in (2, 6)
    # the regime map samples each snapshot: labels are the true source classes, the name says the step
    pm.execute_notebook(str(ROOT / "nbs" / "sample.ipynb"), str(tmp_path / "s.ipynb"), cwd=str(ROOT), progress_bar=False,
                        kernel_name="python3", parameters=dict(run=str(run_dir), mode="clr", w=0.5, sampler="ddim",
                                                               steps=2, n_per_class=1, snapshot=2))
    with np.load(run_dir / "samples" / "clr-w0.5-ddim2-s0-k2.npz") as z:
        assert z["labels"].tolist() == target.source_classes
    with pytest.raises(pm.PapermillExecutionError, match=r"no snapshot at step 4; it has \[2, 6\]"):
        pm.execute_notebook(str(ROOT / "nbs" / "sample.ipynb"), str(tmp_path / "s2.ipynb"), cwd=str(ROOT),
                            progress_bar=False, kernel_name="python3", parameters=dict(run=str(run_dir), snapshot=4))
