"""Development-only code: benchmarks, the live demo, test fakes and scratch databases.

Not shipped in the Docker image. May import `worker`, `service` and `models`; never `tests` or `scripts`.
"""
