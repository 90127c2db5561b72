"""The `backfill` command. `cli.main` assembles it from the command modules listed there.

This is the top layer: it may import `devtools`, `worker`, `service` and `models`; nothing imports it.
"""
