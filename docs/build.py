"""Build the documentation site from the notebooks, without quarto: `python docs/build.py` (or `make docs`).

1. Stage every notebook of `nbs/` under `_proc/docs/nbs/` (git-ignored):
   - `index.ipynb` and the library notebooks `nbs/0*.ipynb`, `nbs/1*.ipynb` are executed with nbclient (IN_TEST
     unset, from `nbs/` as nbdev_test does), skipping the cells flagged with settings.ini's `tst_flags`
     (`#| slow`, `#| notest`), which are shown without output;
   - the entry notebooks (`pretrain`, `train`, `sample`, `evaluate`) and `nbs/paper/*` train or read long runs, so
     they are never executed here: each is shown from its executed copy under `runs/reproduce/logs/` (made by
     `make reproduce`) when there is one, else as committed, without outputs;
   - each page gets a note saying which of these it is; nbdev directives (`#| export`, ...) are dropped from the
     shown code and `#| hide` / `#| default_exp` cells are removed.
2. Write one API page per module of `wat_nb/` (sphinx autodoc on the exported docstrings) under `api/`.
3. Copy `figures/` beside the staged notebooks, so the `../figures/*.png` links of the index resolve, and stage the
   Markdown pages `docs/*.md` under `docs/` of the site: their links are written for the repository (`../figures/`,
   `../nbs/`, sibling pages), so they are rewritten to the staged layout, and a link to a repository file the site
   does not hold (`../README.md`, `../RESULTS.md`, a table's `.md`) becomes its text.
4. Run Sphinx (myst-nb reads the notebooks as they are, it executes nothing) into `_docs/`.
5. Fail (exit 1) on any warning about a missing file, image, document or reference, and on any `src` / `href` of
   the built HTML that points to a file that is not in the site.

`--no-execute` skips step 1's execution (every notebook as committed): the quick variant the tests and CI run.
"""
from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
ENTRY = ("pretrain", "train", "sample", "evaluate")   # papermill entry points: long runs, never executed here
# Sphinx warnings that mean something the site links to is not there: these fail the build.
MISSING = re.compile(r"image file not readable|image file not found|download file not readable|"
                     r"nonexisting document|cross-reference target not found|xref_missing|reference target not found|"
                     r"undefined label|unknown document|Unknown target name|failed to import|"
                     r"isn't included in any toctree|File not found", re.I)


def tst_flags() -> set[str]:
    "The cell flags nbdev_test skips (settings.ini `tst_flags`)."
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return set(cfg["DEFAULT"].get("tst_flags", "").split())


def directives(source: str) -> tuple[dict, str]:
    "nbdev/quarto `#| ` directives at the top of a cell -> ({name: args}, the source without them)."
    lines, found = source.splitlines(), {}
    i = 0
    while i < len(lines) and (lines[i].startswith("#|") or not lines[i].strip()):
        if lines[i].startswith("#|"):
            name, _, args = lines[i][2:].strip().partition(" ")
            found[name.rstrip(":")] = args.strip()
        i += 1
    return found, "\n".join(lines[i:])


def skipped(cell, flags: set[str]) -> bool:
    "A code cell nbdev_test would not run: flagged `#| slow` / `#| notest`, or `#| eval: false`."
    d, _ = directives(cell.source)
    return bool(flags & d.keys()) or d.get("eval", "").lower() == "false"


def execute(src: Path, flags: set[str], timeout: int, log: Path):
    """Run one notebook with nbclient from its own folder, skipping flagged cells; returns (notebook, error or None).

    The kernel's own stderr (not the cells' output) goes to `log`."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    class Client(NotebookClient):
        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            if cell.cell_type == "code" and skipped(cell, flags): return cell
            return await super().async_execute_cell(cell, cell_index, execution_count, store_history)

    nb = nbformat.read(src, as_version=4)
    client = Client(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(src.parent)}})
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "w") as fh:
            client.execute(stderr=fh)
        return nb, None
    except CellExecutionError as e:
        return nb, re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip().splitlines()[-1])[:300]   # the error line, no colours
    except Exception as e:                      # a timeout or a dead kernel
        return nb, f"{type(e).__name__}: {e}"[:300]


def executed_log(rel: str, logs: Path) -> Path | None:
    "The executed copy `make reproduce` kept of an entry or paper notebook, if any (newest first)."
    name = rel[:-len(".ipynb")]
    exact = logs / f"{name}.ipynb"
    if exact.is_file(): return exact
    found = sorted((logs / name).rglob("*.ipynb"), key=lambda p: p.stat().st_mtime, reverse=True) if (logs / name).is_dir() else []
    return found[0] if found else None


def note(text: str):
    import nbformat
    return nbformat.v4.new_markdown_cell(f"```{{note}}\n{text}\n```")


def tidy(nb, rel: str, how: str) -> None:
    "Shown code without nbdev directives, hidden cells removed, and a note saying how the page was made."
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        d, rest = directives(cell.source)
        tags = cell.metadata.setdefault("tags", [])
        if "hide" in d or "default_exp" in d or ("exporti" in d and not rest.strip()): tags.append("remove-cell")
        keep = [f"#| {k}" for k in d if k in ("slow", "notest")]   # say why a cell has no output
        cell.source = "\n".join(keep + ([rest] if rest else []))
    if rel == "index.ipynb": return                # the landing page needs no note
    title = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")), -1)
    # the note goes right after the title cell (which holds the blockquote subtitle too)
    nb.cells.insert(title + 1, note(how))


def toctree(caption: str, entries: list[str]) -> str:
    return "```{toctree}\n:hidden:\n:caption: " + caption + "\n:maxdepth: 1\n\n" + "\n".join(entries) + "\n```\n"


def module_pages(dest: Path) -> list[str]:
    "One autodoc page per module of wat_nb/ (reST: autodoc writes reST), linked to the notebook it is exported from."
    api = dest / "api"
    api.mkdir(parents=True)
    names = []
    for py in sorted((ROOT / "wat_nb").glob("*.py")):
        if py.name.startswith("_"): continue
        mod = py.stem
        src = re.search(r"File to edit: \.\./nbs/(\S+?)\.ipynb", py.read_text())
        title = f"wat_nb.{mod}"
        link = f"Exported from the notebook :doc:`{src.group(1)} <../{src.group(1)}>`.\n\n" if src else ""
        (api / f"{mod}.rst").write_text(f"{title}\n{'=' * len(title)}\n\n{link}.. automodule:: wat_nb.{mod}\n   :members:\n")
        names.append(mod)
    rows = "\n".join(f"- [wat_nb.{m}]({m}.rst)" for m in names)
    (api / "index.md").write_text(f"# API reference\n\nOne page per module of `wat_nb`, from its exported docstrings.\n\n"
                                  f"{rows}\n\n" + toctree("Modules", names))
    return names


PAGES = ROOT / "docs"                          # hand-written Markdown pages, linked as in the repository
IMAGES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def page_links(text: str, nbs_dir: Path, missing: list[str], name: str) -> str:
    "A docs/*.md page's links, written for the repository, rewritten for the page staged at <site>/docs/<name>."
    def one(m):
        bang, label, url = m.groups()
        u = urlsplit(url)
        if u.scheme or u.netloc or url.startswith(("#", "mailto:")): return m.group(0)
        frag = f"#{u.fragment}" if u.fragment else ""
        target = (PAGES / unquote(u.path)).resolve()
        if target.parent == PAGES and target.suffix == ".md" and target.is_file(): return m.group(0)   # a sibling page
        if bang and target.is_relative_to(ROOT / "figures") and target.suffix in IMAGES and target.is_file():
            return f"{bang}[{label}](../../figures/{target.relative_to(ROOT / 'figures').as_posix()})"
        if target.is_relative_to(ROOT / "nbs") and target.suffix == ".ipynb":
            rel = target.relative_to(ROOT / "nbs").as_posix()
            if (nbs_dir / rel).is_file(): return f"{bang}[{label}](../{rel}{frag})"
        if not target.exists(): missing.append(f"docs/{name}: {url}")
        return label                            # a repository file the site does not hold: its text, no link
    parts = re.split(r"(^```.*?^```)", text, flags=re.S | re.M)       # leave fenced code alone
    return "".join(p if i % 2 else LINK.sub(one, p) for i, p in enumerate(parts))


def stage_pages(dest: Path, nbs_dir: Path) -> tuple[list[str], list[str]]:
    "Stage docs/*.md under dest/docs/; returns (their document names, links to files that do not exist)."
    names, missing = [], []
    for md in sorted(PAGES.glob("*.md")):
        out = dest / "docs" / md.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page_links(md.read_text(), nbs_dir, missing, md.name))
        names.append(f"docs/{md.stem}")
    return names, missing


def stage(dest: Path, execute_nbs: bool, logs: Path, jobs: int, timeout: int, nbs_dir: Path = NBS,
          api: bool = True) -> tuple[list[str], list[str]]:
    """Stage the notebooks (executed where asked), the API pages and the docs/*.md pages under dest; returns the
    notebooks that failed and the links of the pages to files that do not exist."""
    import nbformat

    flags = tst_flags()
    nbs = sorted(p.relative_to(nbs_dir).as_posix() for p in nbs_dir.rglob("*.ipynb")
                 if ".ipynb_checkpoints" not in p.parts and not p.name.startswith("_"))
    library = [r for r in nbs if "/" not in r and r[:1].isdigit()]
    runnable = (["index.ipynb"] if "index.ipynb" in nbs else []) + library
    failed, when = [], datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def one(rel: str):
        t0, src = time.time(), nbs_dir / rel
        if rel in runnable and execute_nbs:
            nb, err = execute(src, flags, timeout, dest.parent / "kernels" / f"{rel.replace('/', '_')}.log")
            short = f"executed in {time.time() - t0:.0f} s"
            how = (f"Executed for this site on {when} in {time.time() - t0:.0f} s (IN_TEST unset); cells flagged "
                   f"{' or '.join(f'`#| {f}`' for f in sorted(flags))} are shown without running them, as under nbdev_test.")
            if err: short, how = f"FAILED: {err}", f"Execution failed for this site ({err}); outputs are shown up to the failing cell."
        elif rel in runnable:
            nb, err, short = nbformat.read(src, as_version=4), None, "as committed"
            how = "Shown as committed, without outputs (a build with `--no-execute`)."
        else:
            log = executed_log(rel, logs)
            kind = ("This entry notebook trains, samples or scores for minutes to hours" if "/" not in rel else
                    "Paper notebooks are run by `make reproduce`, after the runs they read")
            nb, err = nbformat.read(log or src, as_version=4), None
            if log:
                shown = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log
                short = f"executed copy {shown}"
                how = f"{kind}, so it is not executed for this site: this page shows the executed copy `{shown}`."
            else:
                short = "not executed, as committed"
                how = (f"{kind}, so it is not executed for this site: this page shows it as committed, without outputs "
                       f"(when `runs/reproduce/logs/` holds an executed copy from `make reproduce`, the page shows that).")
        tidy(nb, rel, how)
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        sys.stdout.write(f"  {rel:36} {short}\n")
        sys.stdout.flush()
        return rel, err

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        biggest_first = sorted(runnable, key=lambda r: -(nbs_dir / r).stat().st_size)   # the slow ones start first
        for rel, err in pool.map(one, biggest_first + [r for r in nbs if r not in runnable]):
            if err: failed.append(rel)

    modules = module_pages(dest) if api else []
    pages, missing = stage_pages(dest, nbs_dir)
    index = dest / "index.ipynb"
    nb = nbformat.read(index, as_version=4)
    entry = [r[:-6] for r in nbs if r[:-6] in ENTRY]
    paper = [r[:-6] for r in nbs if r.startswith("paper/")]
    library = [r[:-6] for r in library]
    other = [r[:-6] for r in nbs if r[:-6] not in {*library, *entry, *paper, "index"}]
    nb.cells.append(nbformat.v4.new_markdown_cell(
        (toctree("Guides", pages) if pages else "") + toctree("Library", library) + toctree("Entry notebooks", entry)
        + toctree("Paper", paper)
        + (toctree("Other notebooks", other) if other else "") + (toctree("Reference", ["api/index"]) if api else "")))
    nbformat.write(nb, index)
    print(f"  api/: {len(modules)} module pages; docs/: {len(pages)} pages")
    return failed, missing


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if v and ((tag == "a" and k == "href") or (tag in ("img", "script", "source") and k == "src")
                      or (tag == "link" and k == "href")):
                self.urls.append((tag, v))


def broken_links(site: Path) -> list[str]:
    "Every relative href / src in the built site that names a file the site does not have."
    bad = []
    for page in site.rglob("*.html"):
        parser = Links()
        parser.feed(page.read_text(errors="replace"))
        for tag, url in parser.urls:
            u = urlsplit(url)
            if u.scheme or u.netloc or url.startswith(("#", "mailto:", "data:", "javascript:")) or not u.path: continue
            target = (page.parent / unquote(u.path)).resolve()
            if target.is_dir(): target = target / "index.html"
            if not target.exists(): bad.append(f"{page.relative_to(site)}: <{tag}> {url}")
    return bad


def wipe(folder: Path, marker: str) -> None:
    "Remove a folder this script made before (it holds `marker`); refuse any other non-empty folder."
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / marker).exists() or folder in (ROOT, *ROOT.parents):
            sys.exit(f"docs/build.py: {folder} is not empty and was not made by this script; not removing it")
        shutil.rmtree(folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_docs"), help="the site (default _docs/)")
    ap.add_argument("--stage", default=str(ROOT / "_proc" / "docs"), help="staging folder, wiped first (default _proc/docs/)")
    ap.add_argument("--no-execute", action="store_true", help="stage every notebook as committed (quick check)")
    ap.add_argument("--nbs", default=str(NBS), help="the notebooks (default nbs/)")
    ap.add_argument("--no-api", action="store_true", help="no API reference pages (quicker; for tests of the build itself)")
    ap.add_argument("--logs", default=str(ROOT / "runs" / "reproduce" / "logs"), help="executed copies of the entry / paper notebooks")
    ap.add_argument("--jobs", type=int, default=2, help="notebooks executed at once (default 2)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds a cell may run (default 600)")
    args = ap.parse_args(argv)
    os.environ.pop("IN_TEST", None)             # the site shows the notebooks as a reader runs them, not nbdev_test's
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are noise in a static page
    if args.jobs > 1: os.environ.setdefault("OMP_NUM_THREADS", "1")   # notebooks in parallel share the cores
    stage_dir, out = Path(args.stage).resolve(), Path(args.out).resolve()
    t0 = time.time()
    wipe(stage_dir, ".docs-stage")
    src = stage_dir / "nbs"
    src.mkdir(parents=True)
    (stage_dir / ".docs-stage").touch()
    shutil.copytree(ROOT / "figures", stage_dir / "figures")
    print(f"staging notebooks in {src} ({'as committed' if args.no_execute else 'executing the library notebooks'})")
    failed, missing = stage(src, not args.no_execute, Path(args.logs), args.jobs, args.timeout, Path(args.nbs).resolve(), not args.no_api)
    t1 = time.time()
    print(f"staged in {t1 - t0:.1f} s; running sphinx into {out}")
    warnings, html = stage_dir / "warnings.log", stage_dir / "html"   # myst-nb writes beside its outdir: keep it staged
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(ROOT / "docs"), "-q", "--keep-going",
           "-w", str(warnings), "-d", str(stage_dir / "doctrees"), str(src), str(html)]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wipe(out, ".buildinfo")                     # Sphinx's mark on an HTML build
    if html.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(html), str(out))
    t2 = time.time()
    lines = warnings.read_text().splitlines() if warnings.exists() else []
    fatal = [l for l in lines if MISSING.search(l)]
    bad = broken_links(out) if out.is_dir() else ["no site was written"]
    print(f"sphinx: {t2 - t1:.1f} s, exit {rc}, {len(lines)} warning line(s) ({warnings}), {len(fatal)} about missing files or references")
    for l in fatal: print("  MISSING", l)   # (every warning was printed above as it came, and is in the log)
    for l in bad[:50]: print("  BROKEN LINK", l)
    for l in missing: print("  MISSING link in", l)
    if failed: print(f"notebooks that failed to execute: {', '.join(failed)}")
    ok = rc == 0 and not fatal and not bad and not failed and not missing
    print(f"docs: {'built' if ok else 'FAILED'}: {out / 'index.html'} in {time.time() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
