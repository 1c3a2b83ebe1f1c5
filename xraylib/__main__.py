"""`python -m xraylib` is the `xraylib` command."""

import sys

from xraylib.cli import main

sys.exit(main())
