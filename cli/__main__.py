"""`python -m cli ...` is `backfill ...` (for subprocesses that must use this interpreter)."""

from cli.main import app

app()
