"""`python -m hpcsgd ...` is the `hpcsgd` command."""

from .cli import leave, main

leave(main())
