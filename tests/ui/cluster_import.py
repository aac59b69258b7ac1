"""Makes tests/integration's cluster helpers importable from here."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration"))

from cluster import LocalCluster  # noqa: E402

__all__ = ["LocalCluster"]
