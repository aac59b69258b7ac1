"""pytest's set-up for the whole suite: the helpers of support.py, importable as before."""

from support import ROOT, SERVICES, free_port, wait_until  # noqa: F401  (re-exported to the tests)
