"""A tiny plan of fake notebooks for the driver's tests: each counts its executions in a file, writes a marker,
can be made slow and made to fail; the last step depends on all the others."""
from pathlib import Path

from wat_nb.runner import Step


def _fake_notebook(path: Path, body: str) -> Path:
    "A notebook with a parameters cell (marker, counter, sleep, fail) and `body`; used to show and test the driver."
    import nbformat
    params = nbformat.v4.new_code_cell('marker = ""\ncounter = ""\nsleep = 0.0\nfail = ""')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path

FAKE_BODY = """import os, time
from pathlib import Path
with open(counter, "a") as f: f.write(marker + "\\n")
time.sleep(sleep)
if fail and Path(fail).exists(): raise RuntimeError("asked to fail")
Path(marker).parent.mkdir(parents=True, exist_ok=True)
Path(marker).write_text("ok")"""

def fake_plan(root, n: int = 3, sleep: float = 0.0) -> list[Step]:
    "`n` steps of one fake notebook under `root` (step i writes out/i.txt; the last depends on all others)."
    root = Path(root); _fake_notebook(root / "nbs" / "fake.ipynb", FAKE_BODY)
    mk = lambda i, deps: Step(f"fake/{i}", "nbs/fake.ipynb", dict(marker=str(root / f"out/{i}.txt"), sleep=sleep,
                              counter=str(root / "count.txt"), fail=str(root / f"fail-{i}")), None, deps, (f"out/{i}.txt",))
    return [mk(i, ()) for i in range(n - 1)] + [mk(n - 1, [f"fake/{i}" for i in range(n - 1)])]
