"""JupyterLab in a real browser: open `nbs/train.ipynb`, edit its parameters cell as a person would, Run All, and
check what the page shows. Prints a PASS / FAIL line per check and exits 0 (all passed), 1 (a check failed) or
3 (SKIP: chromium or playwright is missing). Run it through `make lab-check` (about a minute on 2 CPU cores).

What it does:
1. starts JupyterLab on 127.0.0.1 at a free port with a random token, root dir = the repository root, with
   temporary Jupyter config / data / runtime / settings / workspace folders (your own settings are not read or
   touched; autosave is off there), `WAT_NB_DEVICE=cpu`;
2. drives headless Chromium through Playwright (`--chromium`, default the Debian `chromium` on PATH): opens
   `/lab/tree/nbs/train.ipynb`, clicks into the cell tagged `parameters`, types override lines at its end (a tiny
   mini-profile run on CPU whose `out_root` is a temporary folder), then Run > Run All Cells and waits for the
   kernel to be idle;
3. checks: every code cell has an execution count, no cell has an error output, the run is the mini profile on
   the CPU and wrote its run folder under the temporary `out_root`, the matching heatmap, the loss plot and the
   sample grid are images in their cells' outputs, no output says "TqdmWarning" or "IProgress not found", and a
   jupyter-widgets progress bar rendered;
4. takes screenshots into `--out` (default `.ci/out/lab/`): the page after the edit, the page after the run,
   and the parameters, matching, fine-tuning (progress bar), loss and sample-grid cells;
5. always stops the browser and the server (also on Ctrl-C / SIGTERM) and never saves the notebook: the file's
   bytes are compared with a snapshot taken before, and restored (with a FAIL) if anything wrote it.

Install: `apt-get install -y chromium` and `.venv/bin/pip install playwright` (no `playwright install`: the
Debian chromium is used through `executable_path`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "nbs/train.ipynb"
EXIT_PASS, EXIT_FAIL, EXIT_SKIP, EXIT_INTERRUPTED = 0, 1, 3, 130
# The tiny run typed into the parameters cell (out_root is added at run time): the mini profile on the CPU.
OVERRIDES = dict(profile="mini", dataset="shapes-near", steps=4, batch_size=8, match_m=2, match_steps=3,
                 match_cap=5, grid_per_class=1)
MARK = "# lab check: a tiny run on the mini profile"             # first typed line, so a saved edit is recognised
# Lab settings for the temporary settings folder: nothing saved behind our back, every cell in the DOM, no popups.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "recordTiming": True},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
}


def find_chromium(given: str = "") -> str:
    "The browser: `given` (a path or a name on PATH), else $CHROMIUM, else chromium / chromium-browser / google-chrome; '' if none."
    def resolve(c):
        return shutil.which(c) or (c if Path(c).is_file() and os.access(c, os.X_OK) else "")
    given = given or os.environ.get("CHROMIUM", "")
    if given: return resolve(given)
    return next((p for c in ("chromium", "chromium-browser", "google-chrome") if (p := resolve(c))), "")


def missing(chromium: str = "") -> str:
    "Why the check cannot run here ('' when it can): no playwright in this Python, or no chromium."
    from importlib.util import find_spec
    reasons = []
    if find_spec("playwright") is None:
        reasons.append(f"playwright is not installed in {sys.executable} (pip install playwright)")
    if not find_chromium(chromium):
        reasons.append(f"no chromium browser at {chromium or os.environ['CHROMIUM']!r}" if chromium or os.environ.get("CHROMIUM")
                       else "no chromium browser on PATH (apt-get install -y chromium, or --chromium PATH / $CHROMIUM)")
    if find_spec("jupyterlab") is None:
        reasons.append(f"jupyterlab is not installed in {sys.executable}")
    return "; ".join(reasons)


class Report:
    "PASS / FAIL lines as the checks come, and the verdict."
    def __init__(self): self.results = []
    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, bool(ok)))
        print(f"{'PASS' if ok else 'FAIL'}  {name}{f' ({detail})' if detail else ''}", flush=True)
        return bool(ok)
    @property
    def failed(self): return [n for n, ok in self.results if not ok]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()


def lab_env(tmp: Path) -> dict:
    "The server's (and so the kernel's) environment: every Jupyter / IPython folder under `tmp`, the CPU, no IN_TEST."
    env = {k: v for k, v in os.environ.items() if k not in ("IN_TEST", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH")}
    dirs = dict(JUPYTER_CONFIG_DIR="config", JUPYTER_DATA_DIR="data", JUPYTER_RUNTIME_DIR="runtime",
                JUPYTERLAB_SETTINGS_DIR="settings", JUPYTERLAB_WORKSPACES_DIR="workspaces", IPYTHONDIR="ipython")
    for var, name in dirs.items():
        (tmp / name).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / name)
    for plugin, values in LAB_SETTINGS.items():
        ext, name = plugin.rsplit("/", 1)
        f = tmp / "settings" / ext / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    env.update(WAT_NB_DEVICE="cpu", JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1")
    return env


def start_lab(port: int, token: str, tmp: Path, log) -> subprocess.Popen:
    "JupyterLab on 127.0.0.1:port serving the repository root, in its own session so Ctrl-C here reaches only us."
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0: cmd.append("--allow-root")
    return subprocess.Popen(cmd, cwd=ROOT, env=lab_env(tmp), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def api(base: str, token: str, path: str, method: str = "GET", timeout: float = 5):
    req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        return json.loads(body) if body else None


def wait_ready(proc: subprocess.Popen, base: str, token: str, timeout: float = 90):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f"jupyter lab exited with code {proc.returncode} (see server.log)")
        try:
            api(base, token, "/api/status")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer within {timeout:.0f} s (see server.log)")


def stop_lab(proc: subprocess.Popen, base: str, token: str):
    "Shut the kernels and the server down through the API; SIGTERM, then SIGKILL the server's process group."
    if proc.poll() is None:
        try:
            for k in api(base, token, "/api/kernels") or []: api(base, token, f"/api/kernels/{k['id']}", "DELETE", 15)
            api(base, token, "/api/shutdown", "POST")
        except Exception as e:
            print(f"note: API shutdown failed ({e}); terminating the server", flush=True)
    for sig, wait in ((None, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None: break
        if sig is not None:
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: break
        try: proc.wait(wait)
        except subprocess.TimeoutExpired: pass


# JavaScript run in the page. The notebook model (window.jupyterapp, exposed by --LabApp.expose_app_in_browser)
# is what the checks read; the DOM is what they look at.
JS_MODEL = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  return w && w.content && w.content.model ? w.content.model.toJSON() : null;
}"""
JS_STATE = """() => {
  const ind = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
  const prompts = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')]
    .map(p => p.textContent.trim());
  return {status: ind ? ind.getAttribute('data-status') : null, prompts};
}"""


def cells(page):
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")


def wait_idle(page, timeout: float, started_by: float = 60) -> tuple[bool, str]:
    "Wait until no code cell is queued or running ([*]) and the kernel reports idle twice in a row."
    t0, seen_busy, calm = time.monotonic(), False, 0
    while time.monotonic() - t0 < timeout:
        st = page.evaluate(JS_STATE)
        running = any("*" in p for p in st["prompts"])
        seen_busy = seen_busy or running or st["status"] == "busy"
        calm = calm + 1 if (seen_busy and not running and st["status"] == "idle") else 0
        if calm >= 2: return True, f"{time.monotonic() - t0:.0f} s"
        if not seen_busy and time.monotonic() - t0 > started_by: return False, "nothing started running"
        time.sleep(1)
    return False, f"still running after {timeout:.0f} s"


def output_text(cell_json) -> str:
    "Everything a code cell printed or returned, as text (errors included)."
    parts = []
    for o in cell_json.get("outputs", []):
        t = o.get("output_type")
        if t == "stream": parts.append("".join(o.get("text", "")))
        elif t == "error": parts.append(f"{o.get('ename')}: {o.get('evalue')}\n" + "\n".join(o.get("traceback", [])))
        else:
            for mime, v in (o.get("data") or {}).items():
                if mime.startswith("text/") or mime.endswith("json"):
                    parts.append(v if isinstance(v, str) else "".join(v) if isinstance(v, list) else json.dumps(v))
    return "\n".join(parts)


def cell_times(model_cells) -> list[tuple[int, float]]:
    "Seconds each code cell ran, from the execution timing JupyterLab records (recordTiming)."
    from datetime import datetime
    out = []
    for i, c in enumerate(model_cells):
        ex = c.get("metadata", {}).get("execution", {})
        a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if a and b:
            a, b = (datetime.fromisoformat(x.replace("Z", "+00:00")) for x in (a, b))
            out.append((i, (b - a).total_seconds()))
    return out


def find_cell(source_cells, needle: str) -> int:
    "Index of the first cell whose source contains `needle` (-1 if none)."
    return next((i for i, c in enumerate(source_cells) if needle in "".join(c["source"])), -1)


def shot(page, target, path: Path):
    "Screenshot of the page (target None) or of one element; the viewport grows for an element taller than it."
    size = page.viewport_size
    try:
        if target is None:
            page.screenshot(path=str(path))
        else:
            target.scroll_into_view_if_needed(timeout=5000)
            box = target.bounding_box()
            if box and box["height"] > size["height"] - 150:      # JupyterLab scrolls inside a viewport-high panel
                page.set_viewport_size({"width": size["width"], "height": int(box["height"]) + 250})
                page.wait_for_timeout(300)
                target.scroll_into_view_if_needed(timeout=5000)
            target.screenshot(path=str(path), timeout=15000)
        print(f"screenshot {path}", flush=True)
    except Exception as e:
        print(f"note: screenshot {path.name} failed: {e}", flush=True)
    finally:
        if page.viewport_size != size: page.set_viewport_size(size)


def drive(rep: Report, base: str, token: str, chromium: str, out: Path, runs_root: Path, timeout: float, headed: bool):
    from playwright.sync_api import sync_playwright

    nb_file = json.loads((ROOT / NOTEBOOK).read_text())
    src = nb_file["cells"]
    i_par = next((i for i, c in enumerate(src) if "parameters" in c.get("metadata", {}).get("tags", [])), -1)
    if not rep.check("the notebook has a cell tagged parameters", i_par >= 0): return
    par_src = "".join(src[i_par]["source"])
    names = set(re.findall(r"^([A-Za-z_]\w*)\s*[:=]", par_src, flags=re.M))
    wanted = dict(OVERRIDES, out_root=str(runs_root))
    unknown = sorted(set(wanted) - names)
    if not rep.check("the parameters cell defines every knob the check sets", not unknown,
                     f"missing: {', '.join(unknown)}" if unknown else ", ".join(wanted)): return
    lines = [MARK] + [f"{k} = {v!r}" for k, v in wanted.items()]
    i_match, i_loss, i_grid, i_ft = (find_cell(src, s) for s in ('"matching.png"', "plot_loss(", "show_class_grid(", "finetune("))

    console = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=not headed,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.set_default_timeout(60_000)
            t0 = time.monotonic()
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", wait_until="domcontentloaded")
            page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(len(src) - 1).wait_for(state="attached", timeout=90_000)
            page.wait_for_function("() => { const e = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
                                   ".jp-Notebook-ExecutionIndicator'); return e && e.getAttribute('data-status') === 'idle'; }",
                                   timeout=90_000)
            rep.check("JupyterLab opened nbs/train.ipynb and its kernel is idle",
                      cells(page).count() == len(src), f"{cells(page).count()} cells, {time.monotonic() - t0:.0f} s")

            # Edit the parameters cell as a person would: click into it, go to its end, type the overrides.
            par = cells(page).nth(i_par)
            editor = par.locator(".cm-content")
            editor.scroll_into_view_if_needed()
            editor.click()
            page.keyboard.press("Control+End")
            for ln in lines:
                page.keyboard.press("Enter")
                page.keyboard.type(ln, delay=5)
            page.keyboard.press("Escape")                                 # back to command mode
            typed = page.evaluate(JS_MODEL)
            got = "".join(typed["cells"][i_par]["source"]) if typed else editor.inner_text()
            rep.check("the parameters cell holds the typed overrides", got.rstrip().endswith("\n".join(lines)),
                      "" if got.rstrip().endswith("\n".join(lines)) else f"cell ends with {got[-300:]!r}")
            shot(page, None, out / "01_edited.png")
            shot(page, par, out / "02_parameters_cell.png")

            # Run > Run All Cells from the menu bar.
            t_run = time.monotonic()
            page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            ok, how = wait_idle(page, timeout)
            rep.check("Run All Cells finished and the kernel is idle", ok, how)
            time.sleep(1)                                                # let the last outputs render
            print(f"time: run all {time.monotonic() - t_run:.1f} s", flush=True)

            model = page.evaluate(JS_MODEL)
            if not rep.check("the notebook model is readable from the page (window.jupyterapp)", model is not None):
                return
            (out / "train.lab.ipynb").write_text(json.dumps(model, indent=1))   # what the page held, for a look afterwards
            mcells = model["cells"]
            code = [(i, c) for i, c in enumerate(mcells) if c["cell_type"] == "code"]
            not_run = [i for i, c in code if c.get("execution_count") is None]
            rep.check("every code cell ran (has an execution count)", not not_run,
                      f"{len(code)} code cells" if not not_run else f"cells without a count: {not_run}")
            errors = [(i, o) for i, c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
            rep.check("no cell has an error output", not errors,
                      "; ".join(f"cell {i}: {o.get('ename')}: {str(o.get('evalue'))[:200]}" for i, o in errors))
            dom_tb = page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)").count()
            rep.check("no traceback shows on the page", dom_tb == 0, f"{dom_tb} outputs with a traceback" if dom_tb else "")

            print("time per cell: " + ", ".join(f"[{i}] {t:.1f} s" for i, t in cell_times(mcells)), flush=True)
            texts = {i: output_text(c) for i, c in code}
            shown = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea").all_inner_texts()
            texts[-1] = "\n".join(shown)                                 # what the page shows, checked alongside the model
            alltext = "\n".join(texts.values())
            rep.check("the run is the mini profile on the CPU",
                      re.search(r"^profile mini\b", alltext, re.M) is not None and re.search(r"^device: cpu\b", alltext, re.M) is not None,
                      next((ln for ln in alltext.splitlines() if ln.startswith(("profile ", "device: "))), "no profile line"))
            made = sorted(p.name for p in runs_root.rglob("*") if p.name in ("run.json", "loss.png", "samples_grid.png", "matching.png"))
            rep.check("the run folder is under the temporary out_root", {"run.json", "loss.png", "samples_grid.png", "matching.png"} <= set(made),
                      f"{runs_root}: {', '.join(made) or 'nothing'}")
            for bad in ("TqdmWarning", "IProgress not found"):
                where = [i for i, t in texts.items() if bad in t]
                rep.check(f'no output contains "{bad}"', not where, ", ".join("the page" if i < 0 else f"cell {i}" for i in where))

            def imgs(i):
                return cells(page).nth(i).locator(".jp-OutputArea-output img").count() if i >= 0 else 0
            for name, i in (("the matching heatmap", i_match), ("the loss plot", i_loss), ("the sample grid", i_grid)):
                n = imgs(i)
                rep.check(f"{name} is an image in its cell's output", n >= 1, f"cell {i}, {n} img" if i >= 0 else "cell not found")
            bar_css = ".jupyter-widgets :is(.widget-hprogress, .widget-progress) .progress-bar"   # ipywidgets 8 (and 7)
            n_bars = page.locator(f".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output {bar_css}").count()
            n_ft = cells(page).nth(i_ft).locator(f".jp-OutputArea-output {bar_css}").count() if i_ft >= 0 else 0
            views = sum("application/vnd.jupyter.widget-view+json" in (o.get("data") or {}) for _, c in code for o in c.get("outputs", []))
            rep.check("a jupyter-widgets progress bar rendered (tqdm.auto as a widget)", n_bars >= 1 and n_ft >= 1,
                      f"{n_bars} on the page, {n_ft} in the fine-tuning cell, {views} widget views in the outputs")

            cells(page).nth(0).scroll_into_view_if_needed()
            shot(page, None, out / "03_top_after_run.png")
            outputs = ".jp-Cell-outputWrapper"                           # the outputs alone: these inputs are long
            for name, i, part in (("04_matching", i_match, outputs), ("05_finetune_progress", i_ft, None),
                                  ("06_loss", i_loss, None), ("07_sample_grid", i_grid, outputs)):
                if i >= 0: shot(page, cells(page).nth(i).locator(part) if part else cells(page).nth(i), out / f"{name}.png")
        finally:
            (out / "console.log").write_text("\n".join(console) + "\n")
            try: browser.close()
            except Exception as e: print(f"note: closing the browser: {e}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".ci" / "out" / "lab"), help="screenshots and logs (default .ci/out/lab/)")
    ap.add_argument("--chromium", default="", help="browser executable (default: $CHROMIUM or chromium on PATH)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds Run All may take (default 420)")
    ap.add_argument("--headed", action="store_true", help="show the browser (needs a display)")
    args = ap.parse_args(argv)

    why = missing(args.chromium)
    if why:
        print(f"SKIP  lab check: {why}", flush=True)
        return EXIT_SKIP
    chromium = find_chromium(args.chromium)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"): old.unlink()

    def on_term(signum, frame): raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    nb_path = ROOT / NOTEBOOK
    nb_bytes, nb_hash = nb_path.read_bytes(), sha256(nb_path)
    ckpt_dir = nb_path.parent / ".ipynb_checkpoints"
    had_ckpt = ckpt_dir.exists()
    rep, t0 = Report(), time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="wat_nb_lab_"))
    port, token = free_port(), secrets.token_urlsafe(24)
    base = f"http://127.0.0.1:{port}"
    proc, interrupted = None, False
    log = open(out / "server.log", "w")
    try:
        print(f"lab check: JupyterLab {base} (root {ROOT}), chromium {chromium}, out {out}", flush=True)
        proc = start_lab(port, token, tmp, log)
        wait_ready(proc, base, token)
        print(f"time: server up {time.monotonic() - t0:.1f} s", flush=True)
        drive(rep, base, token, chromium, out, tmp / "runs", args.timeout, args.headed)
    except KeyboardInterrupt as e:
        interrupted = True
        rep.check("the check ran to the end", False, f"interrupted ({str(e) or 'Ctrl-C'})")
    except Exception as e:
        rep.check("the check ran to the end", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)                     # a second Ctrl-C must not skip the cleanup
        if proc is not None: stop_lab(proc, base, token)
        log.close()
        rep.check("the server stopped", proc is None or proc.poll() is not None)
        if sha256(nb_path) != nb_hash:
            ours = MARK in nb_path.read_text(errors="replace")             # our edit saved; else someone else's work
            if ours: nb_path.write_bytes(nb_bytes)
            rep.check(f"{NOTEBOOK} was not saved", not ours, "saved with the check's edit; restored from the snapshot" if ours
                      else "it changed on disk during the check without the check's edit; left as it is")
        else:
            rep.check(f"{NOTEBOOK} was not saved", True, "unchanged on disk")
        if not had_ckpt and ckpt_dir.exists(): shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    took = time.monotonic() - t0
    n_fail = len(rep.failed)
    print(f"lab check: {len(rep.results) - n_fail} passed, {n_fail} failed in {took:.0f} s; screenshots in {out}", flush=True)
    return EXIT_INTERRUPTED if interrupted else EXIT_FAIL if n_fail else EXIT_PASS


if __name__ == "__main__":
    sys.exit(main())
