"""The command-line client: submit jobs, read results, see the cluster's state.

    python3 -m dynamic_workload submit FILE --iterations N [--wait]
    python3 -m dynamic_workload results [--top N]
    python3 -m dynamic_workload status
    python3 -m dynamic_workload watch [--interval S]

The endpoint comes from ``--url`` or ``DYNAMIC_WORKLOAD_URL`` (default http://127.0.0.1:5000).
Every failure is one clear line on stderr and a non-zero exit: 1 when the cluster can't be
reached or refuses, 2 for a wrong command line.
"""

import argparse
import http.client
import json
import os
import sys
import time
import urllib.parse

DEFAULT_URL = "http://127.0.0.1:5000"


class ClusterError(Exception):
    """The cluster could not be reached or answered with an error; the message says which."""


class Cluster:
    def __init__(self, url, timeout=30):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ClusterError(f"{url!r} is not an endpoint URL like {DEFAULT_URL}")
        self.url = url.rstrip("/")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self._conn = None

    def call(self, method, path, body=None, headers=None):
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                answer = self._conn.getresponse()
                data = answer.read()
                break
            except (OSError, http.client.HTTPException) as error:
                self._conn.close()
                self._conn = None
                if attempt:
                    raise ClusterError(f"cannot reach the cluster at {self.url}: {error or type(error).__name__}; "
                                       "is it running? (make fire)") from None
        try:
            payload = json.loads(data)
        except ValueError:
            raise ClusterError(f"{self.url}{path} answered {answer.status} with no JSON") from None
        if answer.status >= 400:
            message = payload.get("error", data.decode(errors="replace")) if isinstance(payload, dict) else payload
            raise ClusterError(f"{method} {path}: {answer.status}: {message}")
        return payload


def progress_bar(fraction, width=30):
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:3.0f}%"


def submit(cluster, args, out, err):
    try:
        with open(args.file, "rb") as source:
            data = source.read()
    except OSError as error:
        raise ClusterError(f"cannot read {args.file}: {error.strerror}") from None
    job = cluster.call("PUT", f"/enqueue?iterations={args.iterations}", data,
                       {"Content-Type": "application/octet-stream"})
    if not args.wait:
        print(job["id"], file=out)
        return 0
    print(f"submitted {job['id']} ({len(data)} bytes, {args.iterations} iterations)", file=err)
    started = time.monotonic()
    speed = cluster.call("GET", "/status").get("seconds_per_iteration")
    expected = args.iterations * speed if speed else None
    live = err.isatty()
    while True:
        state = cluster.call("GET", f"/jobs/{job['id']}")
        elapsed = time.monotonic() - started
        if state["status"] in ("completed", "failed"):
            break
        if expected:
            line = f"{progress_bar(elapsed / max(expected, 1e-9) * 0.99)} {state['status']} {elapsed:.1f} s"
        else:
            line = f"{state['status']} {elapsed:.1f} s"
        print(("\r" + line) if live else line, end="" if live else "\n", file=err, flush=True)
        time.sleep(args.poll)
    print(("\r" if live else "") + progress_bar(1.0) + f" {state['status']} {elapsed:.1f} s", file=err)
    if state["status"] == "failed":
        raise ClusterError(f"job {job['id']} failed: {state.get('error', 'no reason given')}")
    print(json.dumps({"id": state["id"], "result": state["result"]}), file=out)
    return 0


def results(cluster, args, out, err):
    for job in cluster.call("POST", f"/pullCompleted?top={args.top}"):
        print(f"{job['id']}  {job['result']}", file=out)
    return 0


def status_table(status):
    rows = [("queued", status["queued"]), ("running", status["running"]), ("completed", status["completed"]),
            ("failed", status["failed"]),
            ("workers", f"{status['workers']} ({status.get('workers_live', 0)} live, "
                        f"{status.get('workers_booting', 0)} booting; "
                        f"{status.get('min_workers', '?')} to {status.get('max_workers', '?')})"),
            ("fleet", status.get("fleet", "?"))]
    if status.get("fleet_error"):
        rows.append(("fleet error", status["fleet_error"]))
    decisions = status.get("decisions") or []
    if decisions:
        rows.append(("scaler", decisions[-1]["reason"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def status(cluster, args, out, err):
    print(status_table(cluster.call("GET", "/status")), file=out)
    return 0


def watch(cluster, args, out, err):
    shown = 0
    last = None
    while args.count is None or shown < args.count:
        now = cluster.call("GET", "/status")
        rate = ""
        if last is not None:
            rate = f"\ncompletions/s  {(now['completed'] - last[1]['completed']) / (time.monotonic() - last[0]):.1f}"
        last = (time.monotonic(), now)
        screen = f"dynamic-workload at {cluster.url}  ({time.strftime('%H:%M:%S')})\n\n" + status_table(now) + rate
        if out.isatty():
            out.write("\x1b[H\x1b[2J")  # home, clear screen
        print(screen, file=out, flush=True)
        shown += 1
        if args.count is None or shown < args.count:
            time.sleep(args.interval)
    return 0


def main(argv=None, out=sys.stdout, err=sys.stderr):
    parser = argparse.ArgumentParser(prog="dynamic_workload", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("DYNAMIC_WORKLOAD_URL", DEFAULT_URL),
                        help="an endpoint (default: $DYNAMIC_WORKLOAD_URL or %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    submit_parser = commands.add_parser("submit", help="send a file as a job")
    submit_parser.add_argument("file")
    submit_parser.add_argument("--iterations", type=int, required=True)
    submit_parser.add_argument("--wait", action="store_true", help="wait for the result, with a progress bar")
    submit_parser.add_argument("--poll", type=float, default=0.2, help=argparse.SUPPRESS)
    results_parser = commands.add_parser("results", help="the latest completed jobs, newest first")
    results_parser.add_argument("--top", type=int, default=10)
    commands.add_parser("status", help="queue, workers and the scaler's latest decision")
    watch_parser = commands.add_parser("watch", help="status, refreshed live")
    watch_parser.add_argument("--interval", type=float, default=1.0)
    watch_parser.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    args = parser.parse_args(argv)
    handlers = {"submit": submit, "results": results, "status": status, "watch": watch}
    try:
        return handlers[args.command](Cluster(args.url), args, out, err)
    except ClusterError as error:
        print(f"error: {error}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130
