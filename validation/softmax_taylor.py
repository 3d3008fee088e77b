"""Taylor softmax moments against Monte Carlo: the ``softmax`` section of ``ppl-kbnn validate``, alone.

Usage::

    python validation/softmax_taylor.py [--quick] [--seed 0] [--out validation-out/softmax]

Writes ``softmax.json``, ``softmax.md`` and ``softmax.png`` into ``--out``, prints the markdown
table, and exits with 1 if a check failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

try:
    from ppl_kbnn.validation import softmax_section
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ppl_kbnn.validation import softmax_section


def main(argv: list[str] | None = None) -> int:
    """Run the section, print its markdown; return 0 if every check passed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2e5 Monte-Carlo samples instead of 1e6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("validation-out/softmax"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "validation/softmax_taylor.py", *argv])
    result = softmax_section(
        quick=args.quick, seed=args.seed, out_dir=args.out, progress=not args.no_progress, command=command
    )
    print((args.out / "softmax.md").read_text())
    return 0 if all(c["passed"] for c in result["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
