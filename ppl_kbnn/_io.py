"""Output files of the commands: atomic writes, output-folder checks, removal of an earlier run's outputs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutputDirError", "prepare_out_dir", "write_text_atomic"]


class OutputDirError(ValueError):
    """The output folder cannot be used (it is a file, or it cannot be created or written)."""


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader (or an interrupted run) sees either the old file or the complete new one, never a partial
    file.

    Args:
        path: the file to write.
        text: its new content (UTF-8).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_out_dir(out_dir: str | os.PathLike[str], known_outputs: Iterable[str] = ()) -> list[str]:
    """Create ``out_dir`` (with parents), check it is writable, remove an earlier run's known outputs.

    Only the file names (or glob patterns) in ``known_outputs`` are removed, and only plain files directly
    in ``out_dir``; anything else in the folder is left alone. Removing them first means that a run that
    is interrupted cannot leave a complete-looking earlier ``results.json`` beside its own partial
    outputs.

    Args:
        out_dir: the output folder.
        known_outputs: file names or glob patterns (e.g. ``"*.png"``) of the command's outputs, removed in
            the given order (list the summary files first).

    Returns:
        The names of the files removed.

    Raises:
        OutputDirError: ``out_dir`` exists and is not a folder, or cannot be created or written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"--out {out}: the folder is not writable ({exc.strerror or exc})") from None
    removed: list[str] = []
    for pattern in known_outputs:
        for p in sorted(out.glob(pattern)):
            if p.is_file() or p.is_symlink():
                try:
                    p.unlink()
                except OSError as exc:
                    raise OutputDirError(f"--out {out}: cannot remove the earlier {p.name} ({exc.strerror})") from None
                removed.append(p.name)
    return removed
