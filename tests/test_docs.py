"""The documentation site (`docs/build.py`, Sphinx + myst-nb): the quick variant (no notebook executed) builds, its
index shows every committed figure and links every notebook, every module has an API page, and a missing image
fails the build."""
import importlib.util
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
MISSING_PKGS = [m for m in ("sphinx", "myst_nb") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING_PKGS), reason=f"docs packages not installed ({', '.join(MISSING_PKGS)}): "
                                                          "pip install -e '.[docs]'")


def build(tmp: Path, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "docs" / "build.py"), "--no-execute", "--out", str(tmp / "site"),
           "--stage", str(tmp / "stage"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    res = build(tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp / "site"


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.hrefs = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("src"): self.imgs.append(a["src"])
        if tag == "a" and a.get("href"): self.hrefs.append(a["href"])


def tags(page: Path) -> Tags:
    t = Tags()
    t.feed(page.read_text())
    return t


def local(page: Path, url: str) -> Path:
    return (page.parent / unquote(urlsplit(url).path)).resolve()


def notebooks() -> list[str]:
    return sorted(p.relative_to(ROOT / "nbs").with_suffix("").as_posix() for p in (ROOT / "nbs").rglob("*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts and not p.name.startswith("_") and p.name != "index.ipynb")


def test_index_shows_every_figure(site):
    index = site / "index.html"
    assert index.is_file()
    imgs = tags(index).imgs
    shown = {local(index, u).name for u in imgs if local(index, u).is_file()}
    assert all(local(index, u).is_file() for u in imgs if not urlsplit(u).scheme), imgs
    figures = sorted(p.name for p in (ROOT / "figures").glob("*.png"))
    assert figures and not set(figures) - shown, f"figures not shown on the index: {set(figures) - shown}"


def test_index_links_every_notebook(site):
    index = site / "index.html"
    body = index.read_text()
    body = body[body.index("<article"):body.index("</article>")]     # the page itself, not the sidebar
    t = Tags()
    t.feed(body)
    linked = {local(index, h) for h in t.hrefs if not urlsplit(h).scheme}
    for nb in notebooks():
        page = (site / f"{nb}.html").resolve()
        assert page.is_file(), f"no page for nbs/{nb}.ipynb"
        assert page in linked, f"the index does not link nbs/{nb}.ipynb"


def test_unexecuted_pages_say_so(site):
    text = (site / "train.html").read_text()
    assert "not executed for this site" in text
    assert "not executed for this site" in (site / "paper" / "theorem2.html").read_text()


def test_docs_pages_are_in_the_site(site):
    "Every hand-written page docs/*.md is a page of the site, with its figures shown and its notebook links kept."
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages
    for md in pages:
        page = site / "docs" / f"{md.stem}.html"
        assert page.is_file(), f"no page for docs/{md.name}"
        t = tags(page)
        assert all(local(page, u).is_file() for u in t.imgs if not urlsplit(u).scheme), t.imgs
        linked = {local(page, h) for h in t.hrefs if not urlsplit(h).scheme}
        for nb in re.findall(r"\]\(\.\./nbs/([^)#\s]+)\.ipynb", md.read_text()):
            assert (site / f"{nb}.html").resolve() in linked, f"docs/{md.name} lost its link to nbs/{nb}.ipynb"


def test_every_module_has_an_api_page(site):
    for py in sorted((ROOT / "wat_nb").glob("*.py")):
        if py.name.startswith("_"): continue
        page = site / "api" / f"{py.stem}.html"
        assert page.is_file(), f"no API page for wat_nb.{py.stem}"
        defined = re.findall(r"^(?:def|class) ([A-Za-z]\w*)", py.read_text(), re.M)   # public functions and classes
        assert defined, f"wat_nb/{py.name} defines no public function or class"
        html = page.read_text()
        missing = [n for n in defined if f'id="wat_nb.{py.stem}.{n}"' not in html]
        assert not missing, f"not on the API page of wat_nb.{py.stem}: {missing}"
    assert (site / "api" / "index.html").is_file()


def test_missing_image_fails_the_build(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    nb["cells"] = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "id": "broken1",
                        "source": ["![gone](../figures/no_such_figure.png)\n", "[gone](no_such_notebook.ipynb)"]})
    (nbs / "index.ipynb").write_text(json.dumps(nb))
    res = build(tmp_path, "--nbs", str(nbs), "--no-api")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert re.search(r"MISSING .*no_such_figure\.png", out), out[-3000:]
    assert re.search(r"MISSING .*no_such_notebook", out), out[-3000:]
