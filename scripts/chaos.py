"""The chaos run: `python scripts/chaos.py ...` is `python -m devtools.chaos ...` (see devtools/chaos/)."""

from devtools.chaos.main import main

if __name__ == "__main__":
    raise SystemExit(main())
