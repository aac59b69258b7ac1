"""Keep-alive HTTP load: wrk when it is installed, else Python processes with http.client.

Either way the load generator is pinned to the machine's last core (taskset / sched_setaffinity),
so that on a 2-core machine it takes at most one core and the servers under test always have
the other one (plus whatever the load generator leaves of its own).
"""

import http.client
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time

from common import percentile

WRK_SCRIPT = r"""
wrk.method = "PUT"
wrk.body = "%(body)s"
wrk.headers["Content-Type"] = "application/octet-stream"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nRESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d,'
    .. ' "max_us": %%d, "mean_us": %%f, "errors": {"connect": %%d, "read": %%d, "write": %%d,'
    .. ' "status": %%d, "timeout": %%d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def load_core():
    """The core the load generator is pinned to (None on a 1-core machine: no pinning)."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[-1] if len(cores) > 1 else None


def have_wrk():
    return shutil.which("wrk") is not None


def run(port, path, body, connections, seconds, tool=None):
    """Load 127.0.0.1:port with PUT `path` and `body` on `connections` keep-alive connections.

    Returns {"tool", "requests", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "errors"}.
    """
    tool = tool or os.environ.get("BENCH_LOAD") or ("wrk" if have_wrk() else "python")
    if tool == "wrk":
        return _run_wrk(port, path, body, connections, seconds)
    return _run_python(port, path, body, connections, seconds)


def _run_wrk(port, path, body, connections, seconds):
    text = body.decode("ascii")
    assert '"' not in text and "\\" not in text
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"body": text})
    try:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", script.name,
                f"http://127.0.0.1:{port}{path}"]
        core = load_core()
        if core is not None:
            argv = ["taskset", "-c", str(core)] + argv
        run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                             start_new_session=False)
    finally:
        os.unlink(script.name)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {run.stdout[-1000:]} {run.stderr[-1000:]}")
    result = json.loads(line[len("RESULT "):])
    errors = sum(result["errors"].values())
    return {
        "tool": "wrk", "requests": result["requests"],
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000, "p90_ms": result["p90_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000, "max_ms": result["max_us"] / 1000, "errors": errors,
    }


def _client(port, path, body, threads, start, stop, out):
    import threading

    core = load_core()
    if core is not None:
        os.sched_setaffinity(0, {core})
    latencies, errors = [], [0]
    lock = threading.Lock()

    def loop():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine, failed = [], 0
        headers = {"Content-Type": "application/octet-stream"}
        while True:
            now = time.time()
            if now >= stop:
                break
            try:
                conn.request("PUT", path, body=body, headers=headers)
                answer = conn.getresponse()
                answer.read()
                ok = 200 <= answer.status < 300
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                ok = False
            if now >= start:
                if ok:
                    mine.append(time.time() - now)
                else:
                    failed += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((latencies, errors[0]))


def _run_python(port, path, body, connections, seconds):
    processes = min(connections, 8)
    threads = connections // processes
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    warm = 1.0
    start = time.time() + warm
    stop = start + seconds
    procs = [ctx.Process(target=_client, args=(port, path, body, threads, start, stop, out), daemon=True)
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    latencies, errors, received = [], 0, 0
    try:
        for _ in procs:
            lat, err = out.get(timeout=seconds + warm + 60)
            latencies.extend(lat)
            errors += err
            received += 1
    finally:
        for proc in procs:
            if received < len(procs):
                proc.kill()  # interrupted or failed
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return {
        "tool": f"python ({processes} processes x {threads} threads, http.client)",
        "requests": len(latencies), "rps": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 50) * 1000, "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000, "max_ms": max(latencies) * 1000, "errors": errors,
    }
