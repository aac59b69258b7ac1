"""Where the services spend their CPU: py-spy sampling of the live processes under load.

    python bench/run.py --profile

samples the endpoint and the balancer during the enqueue load (wrk, concurrency 8), then the
balancer, an endpoint and a worker during the 2,000-job end-to-end run, and writes per process
the top functions by own samples and by inclusive samples to bench/out/profile/*.txt (and the
raw collapsed stacks next to them, for flamegraph tools). py-spy samples without pausing the
processes (--nonblocking), and only the thread holding the GIL (--gil): Python's CPU time, which is what
bounds a GIL-bound service. (Time inside SQLite or a system call, where the GIL is released, does not
show; without --gil py-spy counts threads blocked in recv() as busy.)
"""

import collections
import os
import shutil
import subprocess
import sys
import threading
import time

import loadgen
import sections
from common import BIN, Cluster, log

RATE = 250


def py_spy():
    found = shutil.which("py-spy") or os.path.join(BIN, "py-spy")
    return found if os.path.exists(found) else None


def record(pids, seconds, out_dir, label):
    """Start py-spy on each {name: pid}; returns a function that waits and returns the raw files."""
    procs = {}
    for name, pid in pids.items():
        path = os.path.join(out_dir, f"{label}-{name}.collapsed")
        procs[name] = (subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(RATE),
             "--nonblocking", "--gil", "--format", "raw", "--output", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path)

    def finish():
        files = {}
        for name, (proc, path) in procs.items():
            try:
                proc.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if os.path.exists(path):
                files[name] = path
            else:
                log(f"py-spy on {name} wrote nothing: {proc.stderr.read().decode()[-300:]}")
        return files
    return finish


def _frame_name(frame):
    # "function (path/to/file.py:123)" -> "file.py:function"
    function, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{os.path.basename(path)}:{function}" if function else frame


def summarize(path, top=20):
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    with open(path) as stacks:
        for line in stacks:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count)
            frames = [_frame_name(f) for f in stack.split(";")[1:]]  # the first is the thread
            if not frames:
                continue
            total += count
            own[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    lines = [f"{total} samples at {RATE} Hz (about {total / RATE:.1f} CPU-seconds)", "", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n", total


def profile(work_dir, out_dir, seconds=8):
    if py_spy() is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out_dir = os.path.join(out_dir, "profile")
    os.makedirs(out_dir, exist_ok=True)
    reports = {}

    # 1. The enqueue path: wrk at concurrency 8 on one endpoint, no workers.
    cluster = Cluster(work_dir, "profile-enqueue", cluster_min_workers=0, cluster_max_workers=0,
                      cluster_max_queued=10_000_000).fire()
    try:
        body = os.urandom(50).hex().encode()
        path = "/enqueue?iterations=10"
        loadgen.run(cluster.endpoint_port, path, body, 8, 2)  # warm-up
        pids = {"endpoint": cluster.service_pid(f"--port {cluster.endpoint_port}"),
                "balancer": cluster.service_pid("balancer")}
        finish = record(pids, seconds, out_dir, "enqueue")
        run = loadgen.run(cluster.endpoint_port, path, body, 8, seconds)
        for name, raw in finish().items():
            text, _ = summarize(raw)
            reports[f"enqueue-{name}"] = text
        log(f"profiled enqueue at {run['rps']:.0f} req/s")
    finally:
        cluster.teardown()

    # 2. End to end: 2,000 jobs, 2 workers.
    cluster = Cluster(work_dir, "profile-e2e", cluster_min_workers=2, cluster_max_workers=2).fire()
    try:
        sections.wait_until(lambda: cluster.status()["workers_live"] == 2, 60, 0.1, "2 live workers")
        workers = cluster.worker_pids()
        pids = {"balancer": cluster.service_pid("balancer"),
                "endpoint": cluster.service_pid(f"--port {cluster.endpoint_port}"),
                "worker": workers[0]}
        holder = {}
        thread = threading.Thread(target=lambda: holder.update(sections.end_to_end_ours(cluster, jobs=4000)))
        finish = record(pids, seconds, out_dir, "e2e")
        thread.start()
        thread.join()
        for name, raw in finish().items():
            text, _ = summarize(raw)
            reports[f"e2e-{name}"] = text
        log(f"profiled end to end at {holder.get('jobs_per_s', 0):.0f} jobs/s")
    finally:
        cluster.teardown()

    for name, text in reports.items():
        with open(os.path.join(out_dir, name + ".txt"), "w") as out:
            out.write(text)
    return reports
