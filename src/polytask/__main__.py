"""`python -m polytask` (also what `torchrun -m polytask` runs)."""

import sys

from polytask.cli.main import main

sys.exit(main())
