"""Prometheus text exposition (format 0.0.4) with the few metric kinds the services need."""

import bisect
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(labels):
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value):
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value):
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def family(name, kind, help_text, samples):
    """Render one metric family; `samples` is a list of (labels dict, value).

    In this text format a counter's HELP and TYPE lines name it with its ``_total`` suffix,
    exactly as its samples do.
    """
    if kind == "counter" and not name.endswith("_total"):
        name += "_total"
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


class Histogram:
    """A thread-safe histogram with fixed buckets (upper bounds, in seconds)."""

    def __init__(self, name, help_text, buckets, label_names=()):
        self.name = name
        self.help_text = help_text
        self.buckets = tuple(sorted(buckets))
        self.label_names = tuple(label_names)
        self._series = {}  # label values -> [bucket counts..., sum, count]
        if not self.label_names:
            self._series[()] = [0] * (len(self.buckets) + 2)  # exposed before the first sample
        self._lock = threading.Lock()

    def observe(self, value, *label_values):
        with self._lock:
            series = self._series.get(label_values)
            if series is None:
                series = self._series[label_values] = [0] * (len(self.buckets) + 2)
            index = bisect.bisect_left(self.buckets, value)
            if index < len(self.buckets):
                series[index] += 1
            series[-2] += value
            series[-1] += 1

    def render(self):
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for label_values, series in items:
            labels = dict(zip(self.label_names, label_values))
            cumulative = 0
            for bound, count in zip(self.buckets, series):
                cumulative += count
                lines.append(f"{self.name}_bucket{_labels({**labels, 'le': _number(float(bound))})} {cumulative}")
            lines.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {series[-1]}")
            lines.append(f"{self.name}_sum{_labels(labels)} {_number(float(series[-2]))}")
            lines.append(f"{self.name}_count{_labels(labels)} {series[-1]}")
        return "\n".join(lines) + "\n"


JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
