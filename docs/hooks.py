"""Build-time helpers of the docs site: Sphinx roles as code, reST math as KaTeX-rendered math.

Two pieces, both run by ``mkdocs build`` (nothing here runs in the browser, nothing needs a network):

* ``on_page_content`` (a MkDocs hook): mkdocstrings shows docstrings as Markdown, where ``:meth:`x```
  would come out as ``:meth:`` followed by code. This drops the role and, as Sphinx does for a leading
  ``~``, keeps only the last dotted name.
* ``ReSTMath`` (a Griffe extension, listed under the mkdocstrings handler's ``extensions``): the
  docstrings write math as reST (``.. math::`` blocks and ``:math:`…``` roles, which Sphinx renders).
  Before mkdocstrings turns a docstring into HTML, this rewrites them to the ``$$…$$`` / ``$…$``
  delimiters of ``pymdownx.arithmatex`` (generic mode); the KaTeX files vendored under
  ``docs/assets/katex/`` render them in the browser. Multi-line blocks with ``&`` or ``\\`` are wrapped
  in ``aligned`` / ``gathered``, as Sphinx wraps them in ``split``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|obj|exc|const|ref):(<code>)")
_TILDE = re.compile(r"<code>~(?:[\w]+\.)*([\w]+)</code>")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def on_page_content(html: str, **kwargs: Any) -> str:
    """Strip the role prefix before an inline code span, shorten ``~dotted.name`` to ``name``."""
    return _TILDE.sub(r"<code>\1</code>", _ROLE.sub(r"\1", html))


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _display(indent: str, body: list[str]) -> list[str]:
    """One ``$$`` block (blank lines around it) at ``indent`` for the math lines ``body``."""
    text = "\n".join(line.strip() for line in body).strip()
    if "&" in text:
        text = "\\begin{aligned}\n" + text + "\n\\end{aligned}"
    elif "\\\\" in text:
        text = "\\begin{gathered}\n" + text + "\n\\end{gathered}"
    lines = ["", indent + "$$", *(indent + line for line in text.split("\n")), indent + "$$", ""]
    return lines


def rest_math_to_arithmatex(text: str) -> str:
    """Rewrite reST ``.. math::`` blocks to ``$$`` blocks and ``:math:`x``` roles to ``$x$``.

    A block is the directive line (its own text counts as the first math line) plus every following
    line indented deeper than the directive, blank lines included; blank-line-separated paragraphs of
    a block become separate equations, as in Sphinx.

    Args:
        text: a docstring.

    Returns:
        The docstring with every reST math construct replaced by arithmatex delimiters.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_DIRECTIVE.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        base = _indent_of(lines[i])
        indent = " " * (4 * (base // 4))  # Markdown nests by 4 spaces; a 2-space list continuation is not nested
        body = [m.group("first")] if m.group("first").strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > base):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():  # trailing blank lines belong to the text after the block
            body.pop()
            i -= 1
        paragraph: list[str] = []
        for line in [*body, ""]:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                out.extend(_display(indent, paragraph))
                paragraph = []
    return _MATH_ROLE.sub(lambda mm: "$" + mm.group(1).strip() + "$", "\n".join(out))


class ReSTMath(Extension):
    """Griffe extension: rewrite the reST math of every docstring for ``pymdownx.arithmatex``."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring in place (before mkdocstrings parses and renders it)."""
        if obj.docstring is not None and "math:" in obj.docstring.value:
            obj.docstring.value = rest_math_to_arithmatex(obj.docstring.value)
