"""MkDocs hook: render the Sphinx cross-reference roles of the docstrings (``:func:`~a.b.f```) as code.

mkdocstrings shows docstrings as Markdown, where ``:meth:`x``` would come out as ``:meth:`` followed by
code. This drops the role and, as Sphinx does for a leading ``~``, keeps only the last dotted name.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|obj|exc|const|ref):(<code>)")
_TILDE = re.compile(r"<code>~(?:[\w]+\.)*([\w]+)</code>")


def on_page_content(html: str, **kwargs) -> str:
    """Strip the role prefix before an inline code span, shorten ``~dotted.name`` to ``name``."""
    return _TILDE.sub(r"<code>\1</code>", _ROLE.sub(r"\1", html))
