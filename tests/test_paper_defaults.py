"""Running a paper notebook in JupyterLab with its defaults must reproduce the committed artefact, not overwrite it
with another: each notebook's parameter defaults equal the parameters in the sidecars of the figures it writes."""
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from wat_nb.plan import ARTEFACTS, EXTRAS, plan_config
from wat_nb.runner import notebook_parameters

ROOT = Path(__file__).resolve().parents[1]
NOT_PARAMS = {"runs_root", "out_dir", "wat_run"}     # where things are read and written, not what is computed


def _outputs(name: str) -> tuple:
    "The files whose sidecars carry the notebook's parameters: all of a plan notebook's, an extra's first (its table;"
    "the other files of the matching table record the one m of their heatmap, not the parameter)."
    return ARTEFACTS[name][1] if name in ARTEFACTS else EXTRAS[name].outputs[:1]


def _sidecars(name: str) -> list[Path]:
    "The committed sidecars of the files notebook `name` writes."
    return sorted({(ROOT / "figures" / o).with_suffix(".json") for o in _outputs(name)
                   if (ROOT / "figures" / o).with_suffix(".json").is_file()})


def _as_list(v, one: bool = False):
    "A notebook's comma-separated default as the list the notebook makes of it (`one`: a single item makes one too)."
    if not isinstance(v, str) or ("," not in v and not one): return v
    items = [x.strip() for x in v.split(",")]
    try: return [int(x) for x in items]
    except ValueError: return items


def _json(v): return json.loads(json.dumps(v))


def _train_defaults_at(commit: str) -> dict:
    "nbs/train.ipynb's parameter defaults at `commit`: what a plan's empty `train` knob meant when the figure was made."
    r = subprocess.run(["git", "show", f"{commit}:nbs/train.ipynb"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode: pytest.skip(f"commit {commit[:8]} of a committed figure is not in this clone: {r.stderr.strip()}")
    from tempfile import NamedTemporaryFile
    with NamedTemporaryFile("w", suffix=".ipynb") as f:
        f.write(r.stdout); f.flush()
        return notebook_parameters(f.name)


def _effective_train(train: dict, defaults: dict) -> dict:
    "The matching knobs a plan's train runs used: the plan's `train` knob over train.ipynb's defaults."
    return {k: train.get(k, defaults.get(k)) for k in ("match_space", "match_m", "match_cap", "match_steps", "match_w")}


@pytest.mark.parametrize("name", sorted([*ARTEFACTS, *EXTRAS]))
def test_defaults_are_the_committed_parameters(name):
    sidecars = _sidecars(name)
    if not sidecars: pytest.skip(f"figures/ holds no artefact of {name}")
    defaults = notebook_parameters(ROOT / "nbs" / "paper" / f"{name}.ipynb")
    for sc in sidecars:
        params = json.loads(sc.read_text())["params"]
        if name in ARTEFACTS:        # made from the plan: the default plan must be the plan recorded
            plan = _json(dataclasses.asdict(plan_config(defaults["profile"], defaults["smoke"],
                                                        **json.loads(defaults["overrides"] or "{}"))))
            # `extras` lists the other notebooks of the plan and `length_*` their runs: none of them feeds a transfer table
            other = {"train", "extras"} | {k for k in plan if k.startswith("length_")}
            diff = {k: (plan.get(k), v) for k, v in params["plan"].items() if plan.get(k) != v and k not in other}
            meta = json.loads(sc.read_text())
            then, now = _train_defaults_at(meta["commit"]), notebook_parameters(ROOT / "nbs" / "train.ipynb")
            a, b = _effective_train(plan["train"], now), _effective_train(params["plan"]["train"], then)
            if a != b: diff["train"] = (a, b)
            assert not diff, f"{sc.name}: the default plan differs from the committed one (default, committed): {diff}"
        else:
            lists = {k: isinstance(v, list) for k, v in params.items()}     # a list recorded: the notebook splits that parameter
            diff = {k: (_as_list(d, lists[k]), params[k]) for k, d in defaults.items()
                    if k in params and k not in NOT_PARAMS and _json(_as_list(d, lists[k])) != params[k]}
            assert not diff, f"{sc.name}: defaults differ from the committed parameters (default, committed): {diff}"


def test_the_check_sees_a_changed_default(tmp_path):
    nb = json.loads((ROOT / "nbs" / "paper" / "theorem2.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    src = "".join(cell["source"])
    assert "dim: int = 64" in src
    cell["source"] = src.replace("dim: int = 64", "dim: int = 16")
    (tmp_path / "nbs" / "paper").mkdir(parents=True)
    (tmp_path / "nbs" / "paper" / "theorem2.ipynb").write_text(json.dumps(nb))
    defaults = notebook_parameters(tmp_path / "nbs" / "paper" / "theorem2.ipynb")
    params = json.loads((ROOT / "figures" / "theorem2_w2.json").read_text())["params"]
    assert defaults["dim"] != params["dim"]
