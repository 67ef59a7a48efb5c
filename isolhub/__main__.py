"""`python -m isolhub` runs the command line."""

import sys

from ._cli.main import main

__all__: list[str] = []

sys.exit(main())
