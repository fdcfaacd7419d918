"""nbs/train.ipynb refuses bad input in its first cells, before anything is written (run in this process)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from train_cells import train_cells_until_start  # noqa: E402


@pytest.mark.parametrize("params,exc,msg", [
    (dict(dataset="sun"), FileNotFoundError, "SUN397 not found"),
    (dict(dataset="imagenet-xl"), ValueError, "shapes-near"),            # unknown names list the known ones
    (dict(method="clr"), ValueError, "unknown method 'clr'; known: wat, identity, reinit, true-source"),
    (dict(dataset="digits", method="true-source"), ValueError, "records the source class of each of its classes"),
    (dict(snapshots="400,x"), ValueError, "snapshots must be comma-separated positive steps"),
    (dict(steps=100, snapshots="50,400"), ValueError, "snapshot steps [400] are outside the run's 1..100 steps"),
    (dict(t_min=600, t_max=600), ValueError, "t_min < t_max"),
    (dict(match_space="dino"), ValueError, "unknown match_space 'dino'; known: input, features, both"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, monkeypatch, params, exc, msg):
    monkeypatch.setenv("WAT_NB_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("IN_TEST", raising=False)
    with pytest.raises(exc) as e:
        train_cells_until_start(out_root=str(tmp_path / "runs"), **params)
    assert msg in str(e.value), str(e.value)
    assert not (tmp_path / "runs").exists()


def test_train_config_is_the_notebooks_parameters():
    "One name and one default per knob: TrainConfig's fields are exactly train.ipynb's parameters cell."
    import dataclasses
    from wat_nb.runner import notebook_parameters
    from wat_nb.runs import TrainConfig
    nb = notebook_parameters(ROOT / "nbs" / "train.ipynb")
    cfg = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert cfg == nb, {k: (cfg.get(k), nb.get(k)) for k in set(cfg) | set(nb) if cfg.get(k) != nb.get(k)}


def test_plan_ant_knobs_are_train_parameters():
    "The plan's ANT knobs are passed to train.ipynb under their own names."
    from wat_nb.plan import plan_config
    from wat_nb.runs import TRAIN_PARAMS
    assert set(plan_config().ant) <= set(TRAIN_PARAMS) and set(plan_config().train) <= set(TRAIN_PARAMS)
