"""Small helpers shared by the unit tests: a fake clock, free ports and bounded waiting.

tests/conftest.py puts services/ on sys.path; this module does it too (idempotently) so that it
can be imported on its own. free_port and wait_until come from tests/support.py, by that name,
so that the unit tests never depend on which ``conftest`` module Python resolved.
"""

import os
import sys
import threading

SERVICES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "services")
if SERVICES not in sys.path:
    sys.path.insert(0, SERVICES)


class FakeClock:
    """A clock that moves only when a test says so (thread-safe: the store's writer reads it)."""

    def __init__(self, start=1_000_000.0):
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            return self._now

    def advance(self, seconds):
        with self._lock:
            self._now += seconds
            return self._now


# One home for these: tests/support.py (tests/ is on sys.path through its conftest.py).
from support import free_port, wait_until  # noqa: E402,F401  (re-exported to the unit tests)
