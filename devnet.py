#!/usr/bin/env python3
"""./devnet.py ...: the devnet command from the repo root (same as `python -m devnet`).

Runs itself with the repo's .venv interpreter (run `make setup` first) so it
works from a plain shell."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_PY = os.path.join(HERE, ".venv", "bin", "python")
if os.path.exists(VENV_PY) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(HERE, ".venv")):
    os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])
sys.path.insert(0, HERE)

try:
    from devnet.cli import main  # noqa: E402
except ImportError as e:
    if e.name is None or e.name.startswith("devnet"):
        raise
    print(f"devnet.py: the Python package {e.name!r} is missing: run `make setup` in {HERE} first", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(main())
