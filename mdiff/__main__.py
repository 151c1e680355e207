"""`python -m mdiff ...`: the same command line as the `mdiff` script."""

import sys

from mdiff.cli import main

sys.exit(main())
