"""JupyterLab in a real browser (benchmarks/lab_check.py): train.ipynb edited and Run All in headless Chromium, every
check passing, screenshots under a tmp dir ($LAB_CHECK_OUT instead, to keep them: CI sets .ci/out/lab). Skipped,
with the reason, where chromium or playwright is missing."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lab_check.py"
_spec = importlib.util.spec_from_file_location("lab_check", SCRIPT)
lab_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab_check)


def test_missing_browser_is_a_skip_not_a_pass(tmp_path, capsys):
    assert lab_check.main(["--chromium", str(tmp_path / "no-such-chromium"), "--out", str(tmp_path / "lab")]) == lab_check.EXIT_SKIP
    out = capsys.readouterr().out
    assert out.startswith("SKIP") and "no-such-chromium" in out and "PASS" not in out


def test_output_text_sees_warnings_and_errors():
    cell = {"outputs": [
        {"output_type": "stream", "name": "stderr", "text": ["TqdmWarning: IProgress not found. Please update jupyter and ipywidgets."]},
        {"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["Traceback (most recent call last)"]},
        {"output_type": "display_data", "data": {"text/plain": "<Figure>", "image/png": "iVBOR"}},
    ]}
    text = lab_check.output_text(cell)
    assert "IProgress not found" in text and "ValueError: bad" in text and "<Figure>" in text and "iVBOR" not in text


@pytest.mark.slow
def test_lab_runs_train_notebook_in_a_browser(tmp_path):
    why = lab_check.missing()
    if why: pytest.skip(why)
    nb_before = (ROOT / "nbs" / "train.ipynb").read_bytes()
    out = Path(os.environ.get("LAB_CHECK_OUT") or tmp_path / "lab")
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == lab_check.EXIT_PASS, f"lab check exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert not fails and "PASS  a jupyter-widgets progress bar rendered" in r.stdout, fails
    shots = {p.name for p in out.glob("*.png")}
    assert {"03_top_after_run.png", "04_matching.png", "05_finetune_progress.png", "06_loss.png", "07_sample_grid.png"} <= shots, shots
    assert (ROOT / "nbs" / "train.ipynb").read_bytes() == nb_before            # the edited notebook was never saved
