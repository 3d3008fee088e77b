"""The docs site builds strictly and renders the docstrings' reST math (no raw ``.. math::`` / ``:math:``)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rest_math_rewrite_unit():
    pytest.importorskip("griffe", reason="griffe (docs extra) is needed to import docs/hooks.py")
    hooks = _load_hooks()
    doc = (
        "Intro :math:`a^2` and :math:`b`.\n\n"
        ".. math:: x = 1,\n"
        "          y = 2\n\n"
        "Text.\n\n"
        "* item\n\n"
        "  .. math::\n"
        "      p &= q \\\\\n"
        "      r &= s\n\n"
        "after"
    )
    out = hooks.rest_math_to_arithmatex(doc)
    assert "math:" not in out
    assert "Intro $a^2$ and $b$." in out
    assert "$$\nx = 1,\ny = 2\n$$" in out
    assert "$$\n\\begin{aligned}\np &= q \\\\\nr &= s\n\\end{aligned}\n$$" in out
    assert out.rstrip().endswith("after") and "Text." in out


def test_mkdocs_build_strict_renders_math(tmp_path):
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e .[docs])")
    for mod in ("material", "mkdocstrings", "pymdownx"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install -e .[docs])")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) > 10
    raw = {str(p.relative_to(site)): len(re.findall(r"\.\. math::|:math:", p.read_text())) for p in pages}
    raw = {k: v for k, v in raw.items() if v}
    assert not raw, f"raw reST math in the built site: {raw}"
    # the math is there, as arithmatex output, with the vendored KaTeX loaded from the site itself
    kalman = (site / "api" / "kalman" / "index.html").read_text()
    assert kalman.count('class="arithmatex"') >= 3
    assert "assets/katex/katex.min.js" in kalman
    assert not re.search(r'(src|href)="https?://[^"]*(katex|mathjax)', kalman, re.I)  # nothing fetched at view time
    assert (site / "assets" / "katex" / "fonts" / "KaTeX_Main-Regular.woff2").exists()
