"""`python -m ingestd` is the `ingestd` command."""

import sys

from ingestd.cli import main

sys.exit(main())
