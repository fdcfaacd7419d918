"""The Theorem 2 notebook end to end through papermill, as a user runs it, and its bad-parameter errors."""
import json
from pathlib import Path

import papermill as pm
import pytest

pytestmark = pytest.mark.slow          # end to end through papermill kernels: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "paper" / "theorem2.ipynb"


def run(tmp_path, **params):
    return pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, cwd=str(ROOT),
                               progress_bar=False, kernel_name="python3")


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


@pytest.mark.parametrize("params,msg", [
    (dict(dim=0), "dim must be a positive integer"),
    (dict(schedule="sigmoid"), "unknown schedule 'sigmoid'; known: ddpm-linear, vp-linear, cosine"),
    (dict(n_pairs=0, pair_json='{"m0": [0, 0], "S0": [[1, 2], [2, 1]], "m1": [0, 0], "S1": [[1, 0], [0, 1]]}'),
     "covariance is not positive semi-definite"),
])
def test_bad_parameters_fail_with_one_clear_message(tmp_path, params, msg):
    with pytest.raises(pm.PapermillExecutionError) as e:
        run(tmp_path, out_dir=str(tmp_path / "figs"), **params)
    assert e.value.ename == "ValueError" and msg in e.value.evalue
    assert not (tmp_path / "figs").exists()     # nothing written for a run that fails validation
