"""`python -m hpcsgd ...` is the `hpcsgd` command."""

import sys

from .cli import main

sys.exit(main())
