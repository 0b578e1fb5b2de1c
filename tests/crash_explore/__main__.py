import sys

from .explore import main

sys.exit(main())
