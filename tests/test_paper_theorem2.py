"""The Theorem 2 notebook end to end through papermill, as a user runs it, and the errors of its parameters."""
import json
import re
from pathlib import Path

import papermill as pm
import pytest

from wat_nb.gaussian import alpha_bar_schedule, theorem2_pairs


ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "paper" / "theorem2.ipynb"


def run(tmp_path, **params):
    return pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, cwd=str(ROOT),
                               progress_bar=False, kernel_name="python3")


@pytest.mark.slow          # end to end through a papermill kernel: `make test`, not `make test-fast`
def test_theorem2_writes_figure_and_table(tmp_path):
    figs = tmp_path / "figs"
    run(tmp_path, dim=64, n_pairs=2, out_dir=str(figs))
    names = sorted(p.name for p in figs.iterdir())
    assert names == ["theorem2_table.csv", "theorem2_table.json", "theorem2_table.md",
                     "theorem2_w2.json", "theorem2_w2.pdf", "theorem2_w2.png"]
    meta = json.loads((figs / "theorem2_w2.json").read_text())
    assert meta["params"]["dim"] == 64 and meta["versions"]["torch"]
    table = (figs / "theorem2_table.csv").read_text().splitlines()
    assert len(table) == 3 and table[1].startswith("random 0,64,")
    assert all(line.endswith("True,True") for line in table[1:])   # non-increasing, contraction holds


@pytest.mark.slow
def test_a_bad_parameter_stops_the_notebook_before_it_writes(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as e:
        run(tmp_path, out_dir=str(tmp_path / "figs"), schedule="sigmoid")
    assert e.value.ename == "ValueError" and "unknown schedule 'sigmoid'; known: ddpm-linear, vp-linear, cosine" in e.value.evalue
    assert not (tmp_path / "figs").exists()     # nothing written for a run that fails validation


@pytest.mark.parametrize("kw,msg", [
    (dict(dim=0), "dim must be a positive integer"),
    (dict(n_pairs=0), "n_pairs must be positive"),
    (dict(max_cond=0.5), "max_cond must be >= 1"),
    (dict(n_pairs=0, pair_json='{"m0": [0, 0], "S0": [[1, 2], [2, 1]], "m1": [0, 0], "S1": [[1, 0], [0, 1]]}'),
     "covariance is not positive semi-definite"),
    (dict(pair_json='{"m0": [0], "S0": [[1]]}'), "pair_json lacks ['S1', 'm1']"),
])
def test_bad_pairs_fail_with_one_clear_message(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        theorem2_pairs(**kw)


@pytest.mark.parametrize("schedule,steps,msg", [("sigmoid", 10, "unknown schedule 'sigmoid'"), ("cosine", 1, "at least 2")])
def test_bad_schedules_fail_with_one_clear_message(schedule, steps, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        alpha_bar_schedule(schedule, steps)
