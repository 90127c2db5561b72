"""SIGTERM and SIGINT during the API's start-up stop the process at once.

uvicorn only notes a signal (`should_exit`) and acts on it once the lifespan's start-up has finished, and
that start-up can block for a minute or more (a database that does not answer, an index build): the process
looked deaf to SIGTERM. While `interruptible_startup()` is active (the main thread only: signal handlers
can be set nowhere else) a signal ends the process with 128 + its number; uvicorn's handlers come back
afterwards. Nothing is lost: start-up writes nothing that a restart would not redo, and the embedded Redis
child, if this process started it, dies with it (service.redis_conn)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _leave(sig: int, frame: FrameType | None) -> None:
    log.warning("signal %d during start-up: stopping now", sig)
    from service.redis_conn import stop_embedded

    stop_embedded()
    logging.shutdown()
    os._exit(128 + sig)


@contextmanager
def interruptible_startup() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _leave) for sig in SIGNALS}
    for handler in previous.values():
        # A signal that came while uvicorn imported the app is already noted by its handler (a bound method
        # of its Server): honour it now, before anything can block.
        server = getattr(handler, "__self__", None)
        if getattr(server, "should_exit", False):
            captured = getattr(server, "_captured_signals", None) or [signal.SIGTERM]
            _leave(int(captured[-1]), None)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
