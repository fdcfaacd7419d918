"""Every papermill notebook's parameters cell is read whole by papermill (so `papermill --help-notebook` and
parameter type conversion see every knob): one assignment per line, each recognised with its type."""
import json
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def parameters_cell(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    return cells


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if parameters_cell(p)], ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    (cell,) = parameters_cell(path)  # exactly one parameters cell
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    names = [line.split(":")[0].split("=")[0].strip() for line in src.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    got = pm.inspect_notebook(str(path))
    assert list(got) == names
    assert all(p["inferred_type_name"] not in ("None", "") for p in got.values()), got


def test_entry_notebooks_have_parameters():
    have = {p.name for p in NOTEBOOKS if parameters_cell(p)}
    assert {"train.ipynb", "sample.ipynb", "evaluate.ipynb", "pretrain.ipynb", "table1_2_transfer.ipynb"} <= have
