"""`python -m devtools.chaos ...`: the chaos run (see the package's docstring)."""

from devtools.chaos.main import main

raise SystemExit(main())
