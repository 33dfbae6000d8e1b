"""`python -m hub.cli` is the `cowork` command."""

import sys

from . import main

sys.exit(main())
