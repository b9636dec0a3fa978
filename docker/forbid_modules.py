"""Fail (exit 1) when any of the named modules can be imported by this interpreter.

Run it with ``python -P`` from a directory that holds no packages (the image build runs it
from ``/``): run from the repository root, the repo's ``operator/`` folder would shadow the
standard library's ``operator`` and every import would fail, so a check written as
``python -c 'import torch'`` could never fail. ``find_spec`` locates a module without
importing it, so nothing of it runs here either.

    python -P docker/forbid_modules.py torch transformers
"""

from __future__ import annotations

import importlib.util
import sys


def main(names: list[str]) -> int:
    if not names:
        print("usage: forbid_modules.py MODULE [MODULE...]", file=sys.stderr)
        return 2
    found = [n for n in names if importlib.util.find_spec(n) is not None]
    for name in found:
        print(f"{name} must not be in this image ({importlib.util.find_spec(name).origin})",
              file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
