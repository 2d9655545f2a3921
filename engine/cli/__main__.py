"""`python -m engine.cli`: the `modeldiff` command."""

import sys

from engine.cli import main

sys.exit(main())
