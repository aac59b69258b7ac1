"""Small helpers shared by the unit tests: a fake clock, free ports and bounded waiting.

tests/conftest.py puts services/ on sys.path; this module does it too (idempotently) so that it
can be imported on its own. free_port and wait_until mirror the ones tests/conftest.py offers,
kept here so that the unit tests never depend on which ``conftest`` module Python resolved.
"""

import os
import socket
import sys
import threading
import time

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


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout, interval=0.02, message="condition"):
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)
