"""Run nbs/train.ipynb's cells in this process up to the one that opens the run folder, as papermill would with
`params`: every check of the notebook runs, nothing after it. Seconds instead of a kernel start per case."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_cells_until_start(**params) -> dict:
    "The notebook's namespace after its checks; raises what the notebook raises."
    nb = json.loads((ROOT / "nbs" / "train.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    ns: dict = {}
    for src in cells:
        if "start_run(run_dir" in src: break
        exec(compile(src, "train.ipynb", "exec"), ns)
        if src.startswith("dataset: str"): ns.update(params)   # papermill's injected parameters
    return ns
