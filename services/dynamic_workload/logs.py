"""Logging as one JSON object per line: time, service, event and the fields that matter.

Quiet by default: notable events only (starts, stops, scaling, failures). With ``-v`` or
``DW_VERBOSE=1`` every job's enqueue, lease and completion is logged too, with its id.
"""

import json
import os
import sys
import threading
import time

_lock = threading.Lock()
_service = "dynamic-workload"
_verbose = False


def configure(service: str, verbose: bool = False):
    global _service, _verbose
    _service = service
    _verbose = verbose or os.environ.get("DW_VERBOSE", "").lower() in ("1", "true", "yes")


def event(name: str, **fields):
    """Log a notable event (always written)."""
    _write(name, fields)


def detail(name: str, **fields):
    """Log a routine event (written only with -v)."""
    if _verbose:
        _write(name, fields)


def _write(name, fields):
    record = {"time": round(time.time(), 3), "service": _service, "event": name}
    record.update(fields)
    line = json.dumps(record, default=str) + "\n"
    with _lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a closed log must never take a service down
