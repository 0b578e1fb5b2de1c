"""`python -m devnet ...`: see devnet.cli."""
import sys

from devnet.cli import main

sys.exit(main())
