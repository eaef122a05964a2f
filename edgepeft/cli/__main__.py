"""`python -m edgepeft.cli ...` (how torchrun starts `edgepeft train`): the console script."""

import sys

from edgepeft.cli import main

sys.exit(main())
