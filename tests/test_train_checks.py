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
    (dict(method="clr"), ValueError, "unknown method 'clr'; known: wat, identity, reinit"),
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
