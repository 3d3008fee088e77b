"""Markdown lines shared by the validation sections' reports (one format for checks and findings)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

_FINDING = {True: "HOLDS", False: "DOES NOT HOLD", None: "NOTE"}


def checks_md(checks: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per check: ``- **PASS** `name`: detail`` (``FAIL`` when it did not pass)."""
    return [f"- **{'PASS' if c['passed'] else 'FAIL'}** `{c['name']}`: {c['detail']}" for c in checks]


def findings_md(findings: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per finding: ``- **HOLDS** / **DOES NOT HOLD** / **NOTE** `name`: detail``."""
    return [f"- **{_FINDING[f['holds']]}** `{f['name']}`: {f['detail']}" for f in findings]
