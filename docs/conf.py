"""Sphinx configuration of the wat_nb site; `docs/build.py` stages the notebooks and runs Sphinx with `-c docs`."""
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                   # autodoc imports this checkout's wat_nb

project = "wat_nb"
author = "wat_nb developers"
copyright = "2026 onwards, wat_nb developers"
root_doc = "index"                              # nbs/index.ipynb

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
exclude_patterns = ["**/.ipynb_checkpoints"]

# Notebooks are rendered with the outputs they carry: build.py executed them already (or chose not to).
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]   # widget state of an executed copy: shown as text, not an error

autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource"}
autodoc_typehints = "signature"

# the docs extra brings furo; Sphinx's own theme otherwise
html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = "wat_nb"
html_static_path = []
html_show_sourcelink = False

# nbdev docstrings are one line of Markdown ($math$, `code`); parameters are documented by comments (docments).
_INLINE = re.compile(r"`([^`\n]+)`|(?<![\\$])\$([^$\n]+?)\$")


def _plain(text: str) -> str:
    "Markdown prose -> reST prose: escape what reST would read as markup (|x|, *args, name_ references)."
    text = text.replace("\\", "\\\\")
    text = re.sub(r"([*|`])", r"\\\1", text)
    return re.sub(r"(\w)_(?=\W|$)", r"\1\\_", text)


def _markdown_to_rst(text: str) -> str:
    "`code` -> ``code``, $x$ -> :math:`x`, the rest escaped (one pass, so none rewrites another)."
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        if m.group(2) is not None and re.match(r"[A-Z][A-Z0-9_]{2,}(?=[\s,;:/)]|$)", m.group(2)): continue   # $ENV_VAR, not math
        out.append(_plain(text[pos:m.start()]))
        out.append(f"``{m.group(1)}``" if m.group(1) is not None else f":math:`{m.group(2)}`")
        pos = m.end()
    out.append(_plain(text[pos:]))
    return "".join(out)


def _docstring(app, what, name, obj, options, lines):
    lines[:] = [_markdown_to_rst(l) for l in lines]
    if what not in ("function", "method", "class"): return
    try:
        from fastcore.docments import docments
        params = {k: v for k, v in docments(obj, full=False).items() if k != "return" and v}
    except Exception:
        return
    if params:
        lines += [""] + [f":param {k}: {_markdown_to_rst(v)}" for k, v in params.items()]


def setup(app):
    app.connect("autodoc-process-docstring", _docstring)
