"""The five measurements of issue 6, each a function returning a dict (see run.py for the order).

Each section fires the cluster it needs with ansible-playbook (bench/common.py Cluster), with
the settings it says, and tears it down before the next section starts.
"""

import http.client
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import loadgen
from common import (BENCH, BIN, SERVICES, CLEANUP, Cluster, CpuMeter, Http, contract_work, free_port, load_average, log,
                    percentile, rss_kib, start_process, wait_until)

OCTETS = {"Content-Type": "application/octet-stream"}


# --- 1. enqueue throughput and latency ------------------------------------------------------------

def enqueue(work_dir, seconds=5, rounds=2, warmup=2, concurrencies=(1, 8, 64), tool=None):
    """An endpoint's PUT /enqueue vs a bare ThreadingHTTPServer, same load, alternating rounds.

    Concurrency 8 and 64 are the issue's; 1 shows the latency of a lone request (CPU + commit)."""
    body = os.urandom(50).hex().encode()  # 100 bytes (ASCII, so that wrk's Lua script can carry it)
    bare_port = free_port()
    bare, _ = start_process("bare server", [sys.executable, os.path.join(BENCH, "bare_server.py"), str(bare_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    bare.stdout.readline()
    # No workers: the enqueue path alone. The queue takes everything the load sends.
    cluster = Cluster(work_dir, "enqueue", cluster_min_workers=0, cluster_max_workers=0,
                      cluster_max_queued=10_000_000).fire()
    path = "/enqueue?iterations=10"
    targets = {"bare": bare_port, "endpoint": cluster.endpoint_port}
    processes = {"bare": {"bare server": bare.pid},
                 "endpoint": {"endpoint": cluster.service_pid(f"--port {cluster.endpoint_port}"),
                              "balancer": cluster.service_pid("balancer")}}
    results = {}
    try:
        for concurrency in concurrencies:
            runs = {"bare": [], "endpoint": []}
            for round_ in range(rounds):
                for name, port in targets.items():
                    loadgen.run(port, path, body, concurrency, warmup, tool)  # warm-up, discarded
                    meter = CpuMeter(processes[name]).start()
                    run = loadgen.run(port, path, body, concurrency, seconds, tool)
                    run["cpu_cores"] = meter.stop()
                    run["load_average"] = load_average()
                    runs[name].append(run)
                    log(f"enqueue c={concurrency} round {round_ + 1} {name}: {run['rps']:.0f} req/s, "
                        f"p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms, errors {run['errors']}")
            best = {name: max(r, key=lambda run: run["rps"]) for name, r in runs.items()}
            results[f"c{concurrency}"] = {
                "concurrency": concurrency, "bare": best["bare"], "endpoint": best["endpoint"],
                "ratio": best["endpoint"]["rps"] / best["bare"]["rps"], "rounds": runs,
            }
        status = cluster.status()
        results["jobs_stored"] = status["queued"]
    finally:
        cluster.teardown()
    results["tool"] = results[f"c{concurrencies[0]}"]["bare"]["tool"]
    results["seconds"] = seconds
    results["rounds_per_server"] = rounds
    return results


# --- 2. end to end, against RQ --------------------------------------------------------------------

def drive(submitters, datas, done_count, poll=0.02, timeout=300):
    """Submit `datas` from len(submitters) threads (thread i calls submitters[i](data)); poll
    done_count() until every job is done. Returns (seconds first enqueue -> last completion seen,
    seconds to enqueue them all, the submitters' return values)."""
    counter = itertools.count()
    returned = [None] * len(datas)
    errors = []
    barrier = threading.Barrier(len(submitters) + 1)
    finished = []

    def client(submit):
        barrier.wait()
        try:
            while True:
                i = next(counter)
                if i >= len(datas):
                    break
                returned[i] = submit(datas[i])
        except Exception as error:
            errors.append(error)
        finished.append(time.monotonic())

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in submitters]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if errors:
            raise errors[0]
        if done_count() >= len(datas):
            ended = time.monotonic()
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(datas)} jobs not done after {timeout} s")
        time.sleep(poll)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return ended - started, max(finished) - started, returned


def end_to_end_ours(cluster, jobs=2000, threads=8, iterations=10):
    """`jobs` jobs through both endpoints from `threads` client threads, 2 workers already running."""
    wait_until(lambda: cluster.status()["workers_live"] == 2, 60, 0.1, "2 live workers")
    poller = Http(cluster.endpoint_port)
    base = poller.json("GET", "/status")
    base_done = base["completed"] + base["failed"]

    def submitter(i):
        conn = Http(cluster.endpoints[i % 2])

        def submit(data):
            status, body = conn.request("PUT", f"/enqueue?iterations={iterations}", data, OCTETS)
            if status != 201:
                raise RuntimeError(f"enqueue answered {status}: {body[:200]!r}")
            return json.loads(body)["id"]
        return submit

    def done():
        status = poller.json("GET", "/status")
        return status["completed"] + status["failed"] - base_done

    datas = [os.urandom(100) for _ in range(jobs)]
    meter = CpuMeter({"endpoints": [cluster.service_pid(f"--port {p}") for p in cluster.endpoints],
                      "balancer": cluster.service_pid("balancer"), "workers": cluster.worker_pids()}).start()
    seconds, enqueue_seconds, ids = drive([submitter(i) for i in range(threads)], datas, done)
    cpu = meter.stop()
    status = poller.json("GET", "/status")
    # The results are right (a sample: the newest 1000 completions).
    expected = dict(zip(ids, datas))
    checked = 0
    for job in poller.json("POST", "/pullCompleted?top=1000"):
        if job["id"] in expected:
            assert job["result"] == contract_work(expected[job["id"]], iterations), job
            checked += 1
    return {"seconds": seconds, "jobs_per_s": jobs / seconds, "enqueue_seconds": enqueue_seconds,
            "failed": status["failed"] - base["failed"], "results_checked": checked,
            "cpu_cores": cpu, "load_average": load_average()}


def start_redis(work_dir):
    port = free_port()
    redis_dir = tempfile.mkdtemp(prefix="redis-", dir=work_dir)
    process, token = start_process("redis-server", [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--daemonize", "no", "--dir", redis_dir, "--logfile", os.path.join(redis_dir, "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    connection = redis.Redis(host="127.0.0.1", port=port)
    wait_until(lambda: _ping(connection), 10, 0.05, "redis-server")
    return port, connection, token, process.pid


def _ping(connection):
    try:
        return connection.ping()
    except Exception:
        return False


def end_to_end_rq(work_dir, redis_port, connection, redis_pid, worker_class, jobs=2000, threads=8,
                  iterations=10, workers=2):
    """The same jobs through RQ: `workers` workers of `worker_class` already running."""
    import rq
    import rq_jobs

    connection.flushall()
    queue = rq.Queue("bench", connection=connection)
    logs = os.path.join(work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    started, pids = [], []
    try:
        for n in range(workers):
            log_file = open(os.path.join(logs, f"rq-{worker_class.rsplit('.', 1)[-1]}-{n}.log"), "ab")
            # Quiet logging (-q, no job descriptions): RQ at its best, not writing a line per job.
            process, token = start_process(f"rq worker {n}", [
                os.path.join(BIN, "rq"), "worker", "--url", f"redis://127.0.0.1:{redis_port}",
                "--worker-class", worker_class, "--path", BENCH, "--quiet", "--disable-job-desc-logging",
                "--name", f"bench-{os.getpid()}-{n}", "bench"], stdout=log_file, stderr=log_file)
            log_file.close()
            started.append(token)
            pids.append(process.pid)
        wait_until(lambda: rq.Worker.count(connection=connection) == workers, 30, 0.05, "RQ workers")

        finished = queue.finished_job_registry
        failed = queue.failed_job_registry

        def submitter(i):
            def submit(data):
                return queue.enqueue(rq_jobs.work, data, iterations).id
            return submit

        def done():
            return finished.get_job_count(cleanup=False) + failed.get_job_count(cleanup=False)

        datas = [os.urandom(100) for _ in range(jobs)]
        meter = CpuMeter({"redis": redis_pid, "workers": pids}).start()
        seconds, enqueue_seconds, ids = drive([submitter(i) for i in range(threads)], datas, done)
        cpu = meter.stop()
        checked = 0
        for job_id, data in list(zip(ids, datas))[:: max(1, jobs // 50)]:
            job = rq.job.Job.fetch(job_id, connection=connection)
            assert job.return_value() == contract_work(data, iterations)
            checked += 1
        return {"seconds": seconds, "jobs_per_s": jobs / seconds, "enqueue_seconds": enqueue_seconds,
                "failed": failed.get_job_count(cleanup=False), "results_checked": checked,
                "cpu_cores": cpu, "load_average": load_average()}
    finally:
        for token in reversed(started):
            CLEANUP.pop(token)


# --- 3. worker efficiency -------------------------------------------------------------------------

# The same computation in a bare Python process: the worker's own function (work.py, what the
# target compares with), or the contract's loop exactly as written (for reference: it looks up
# hashlib.sha512 on every iteration, which the worker's loop does not). The process lives through
# all the rounds, like a worker, and computes what it is sent on stdin: a fresh process per round
# would get the idlest core at each start, a long-lived worker does not.
BARE_LOOP = """
import hashlib, sys, time
sys.path.insert(0, sys.argv[1])
from dynamic_workload.work import work_interruptibly
for line in sys.stdin:
    data, iterations, loop = line.split()
    buffer, iterations = bytes.fromhex(data), int(iterations)
    started = time.perf_counter()
    if loop == "worker":
        output = work_interruptibly(buffer, iterations, lambda: False)
    else:
        output = hashlib.sha512(buffer).digest()
        for _ in range(iterations - 1):
            output = hashlib.sha512(output).digest()
    print(time.perf_counter() - started, output.hex(), flush=True)
"""


class BareLoop:
    """A bare Python process that runs the loop on request."""

    def __init__(self):
        self.process, self.closer = start_process(
            "bare loop", [sys.executable, "-c", BARE_LOOP, SERVICES],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, data, iterations, loop):
        self.process.stdin.write(f"{data.hex()} {iterations} {loop}\n")
        self.process.stdin.flush()
        seconds, result = self.process.stdout.readline().split()
        return float(seconds), result

    def close(self):
        CLEANUP.pop(self.closer)


def worker_efficiency(cluster, iterations=2_000_000, rounds=3):
    """One long job through the cluster (from sending the enqueue to the balancer recording the
    result) vs the same loop in a bare Python process, alternating; plus OpenSSL's raw SHA-512 speed."""
    http_ = Http(cluster.endpoint_port)
    wait_until(lambda: http_.json("GET", "/status")["workers_live"] >= 1, 30, 0.1, "a live worker")
    cluster_s, worker_s, bare_s, contract_s = [], [], [], []
    bare = BareLoop()
    try:
        bare.run(b"warm-up", 1000, "worker")
        for _ in range(rounds):
            data = os.urandom(100)
            started = time.time()
            job_id = http_.json("PUT", f"/enqueue?iterations={iterations}", data, OCTETS)["id"]
            # Polled slowly (each poll costs the endpoint and the balancer CPU the worker could
            # use); the time is the balancer's record of the completion (same machine, same clock).
            while True:
                time.sleep(0.05)
                job = http_.json("GET", f"/jobs/{job_id}")
                if job["status"] in ("completed", "failed"):
                    break
            assert job["status"] == "completed", job
            cluster_s.append(job["finished_at"] - started)
            worker_s.append(job.get("duration"))
            seconds, result = bare.run(data, iterations, "worker")
            bare_s.append(seconds)
            assert job["result"] == result, (job, result)
            seconds, result = bare.run(data, iterations, "contract")
            contract_s.append(seconds)
            assert job["result"] == result, (job, result)
    finally:
        bare.close()
    openssl_ns = openssl_sha512_ns()
    best_cluster, best_bare = min(cluster_s), min(bare_s)
    beyond = [c - w for c, w in zip(cluster_s, worker_s) if w is not None]
    return {
        "iterations": iterations, "rounds": rounds,
        "cluster_seconds": cluster_s, "worker_compute_seconds": worker_s, "bare_seconds": bare_s,
        "bare_contract_loop_seconds": contract_s, "bare_contract_loop_best": min(contract_s),
        "cluster_best": best_cluster, "bare_best": best_bare,
        "cluster_median": percentile(cluster_s, 50), "bare_median": percentile(bare_s, 50),
        "overhead": best_cluster / best_bare - 1,
        # What the cluster adds around the computing itself: enqueue, lease, result (median).
        "cluster_seconds_beyond_compute": percentile(beyond, 50) if beyond else None,
        "ns_per_iteration_bare": best_bare / iterations * 1e9,
        "ns_per_iteration_cluster": best_cluster / iterations * 1e9,
        "openssl_ns_per_64_byte_block": openssl_ns,
        "openssl_seconds_for_job": openssl_ns * iterations / 1e9 if openssl_ns else None,
        "load_average": load_average(),
    }


def openssl_sha512_ns(seconds=3):
    """Nanoseconds per 64-byte SHA-512 from `openssl speed` (one compression: the physical limit)."""
    try:
        run = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "-bytes", "64", "sha512"],
                             capture_output=True, text=True, timeout=seconds + 30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^sha512\s+([0-9.]+)k\s*$", run.stdout, re.M)
    if not match:
        return None
    bytes_per_s = float(match.group(1)) * 1000
    return 64 / bytes_per_s * 1e9


# --- 4. scaling reaction ----------------------------------------------------------------------------

def scaling(work_dir, cap=4, idle_timeout=3, jobs=16, iterations=1_000_000):
    """A burst of jobs on an idle cluster (0 workers): first launch decision, cap reached,
    and from the last completion to 0 workers. The scaler's tick is the default (0.5 s)."""
    cluster = Cluster(work_dir, "scaling", cluster_min_workers=0, cluster_max_workers=cap,
                      cluster_worker_idle_timeout=idle_timeout).fire()
    try:
        http_ = Http(cluster.endpoint_port)
        wait_until(lambda: http_.json("GET", "/status")["workers"] == 0, 30, 0.1, "0 workers")
        samples = []  # (time.time(), workers, live, completed, processes)
        watching = threading.Event()

        def watch():
            conn = Http(cluster.endpoint_port)
            while not watching.is_set():
                status = conn.json("GET", "/status")
                samples.append((time.time(), status["workers"], status["workers_live"], status["completed"],
                                len(cluster.worker_pids())))
                watching.wait(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        datas = [os.urandom(100) for _ in range(jobs)]
        conns = [Http(cluster.endpoints[i % 2]) for i in range(8)]
        burst_at = time.time()
        ids = [None] * jobs

        def send(i):
            ids[i] = conns[i % 8].json("PUT", f"/enqueue?iterations={iterations}", datas[i], OCTETS)["id"]

        senders = [threading.Thread(target=lambda k=k: [send(i) for i in range(k, jobs, 8)]) for k in range(8)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        burst_sent = time.time() - burst_at
        wait_until(lambda: samples and samples[-1][3] >= jobs, 120, 0.02, "the burst to complete")
        last_completion = http_.json("POST", "/pullCompleted?top=1")[0]["completed_at"]
        wait_until(lambda: samples[-1][0] > last_completion and samples[-1][1] == 0 and samples[-1][4] == 0,
                   idle_timeout + 30, 0.02, "0 workers")
        watching.set()
        watcher.join()
        status = http_.json("GET", "/status")
        launches = [(d["time"], d["launch"]) for d in status["decisions"] if d["launch"] and d["time"] >= burst_at]
        total, cap_decision = 0, None
        for at, launch in launches:
            total += launch
            if total >= cap and cap_decision is None:
                cap_decision = at
        first = lambda cond: next((t - burst_at for t, *rest in samples if t >= burst_at and cond(*rest)), None)
        zero_at = next(t for t, w, l, c, p in samples if t > last_completion and w == 0 and p == 0)
        results = {
            "cap": cap, "idle_timeout": idle_timeout, "jobs": jobs, "iterations": iterations,
            "scaler_interval": 0.5, "burst_enqueue_seconds": burst_sent,
            "first_launch_decision": launches[0][0] - burst_at if launches else None,
            "cap_decision": cap_decision - burst_at if cap_decision else None,
            "first_worker_seen": first(lambda w, l, c, p: w >= 1),
            "cap_seen": first(lambda w, l, c, p: w >= cap),
            "cap_live": first(lambda w, l, c, p: l >= cap),
            "max_workers_seen": max(max(w, p) for t, w, l, c, p in samples),
            "last_completion": last_completion - burst_at,
            "zero_after_last_completion": zero_at - last_completion,
            "load_average": load_average(),
            "timeline": [[round(t - burst_at, 3), w, l, c, p] for t, w, l, c, p in samples if t >= burst_at - 0.5],
        }
        results_ok = {job["id"] for job in http_.json("POST", "/pullCompleted?top=100")}
        assert set(ids) <= results_ok
        return results
    finally:
        cluster.teardown()


# --- 5. memory and scale ------------------------------------------------------------------------------

def _filler(ports, token, count, size, offset, out, direct):
    """Enqueue `count` jobs of `size` bytes with keep-alive connections from one process."""
    threads, done, errors = 4, [0], []
    counter = itertools.count()
    lock = threading.Lock()

    def loop(k):
        conn = Http(ports[k % len(ports)], timeout=120)
        data = os.urandom(size)
        while True:
            i = next(counter)
            if i >= count:
                return
            job_data = (offset + i).to_bytes(8, "big") + data[8:]
            if direct:
                path = f"/jobs/fill{offset + i:08d}?iterations=10"
                headers = {"Authorization": f"Bearer {token}", **OCTETS}
            else:
                path, headers = "/enqueue?iterations=10", OCTETS
            for _ in range(20):
                status, body = conn.request("PUT", path, job_data, headers)
                if status in (200, 201):
                    break
                time.sleep(0.2)
            else:
                with lock:
                    errors.append(f"HTTP {status} {body[:200]!r}")
                return
            with lock:
                done[0] += 1

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((done[0], errors))


def fill(ports, token, jobs, size, processes=4, direct=False):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    share = [jobs // processes + (1 if k < jobs % processes else 0) for k in range(processes)]
    offsets = [sum(share[:k]) for k in range(processes)]
    procs = [ctx.Process(target=_filler, args=(ports, token, share[k], size, offsets[k], out, direct), daemon=True)
             for k in range(processes)]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    done, errors, received = 0, [], 0
    try:
        for _ in procs:
            n, e = out.get(timeout=1800)
            done += n
            errors += e
            received += 1
    finally:
        for proc in procs:
            if received < len(procs):
                proc.kill()  # interrupted or failed: don't let them go on filling
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise RuntimeError(f"fill failed: {errors[:3]}")
    return done, time.monotonic() - started


def lease_rate(store, jobs=2000, threads=8):
    """Jobs leased per second by `threads` threads leasing one job at a time (as workers do)."""
    share = jobs // threads
    barrier = threading.Barrier(threads + 1)
    leased = []

    def loop(k):
        barrier.wait()
        got = 0
        while got < share:
            got += len(store.lease(f"bench-{k}", 3600, 1))
        leased.append(got)

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.monotonic()
    for worker in workers:
        worker.join()
    return sum(leased) / (time.monotonic() - started)


def memory(work_dir, jobs=100_000, size=16 * 1024, lease_jobs=4000, rounds=8, direct=True):
    """Balancer RSS and disk with `jobs` queued jobs of `size` bytes (no workers), and the lease
    rate behind that backlog vs a queue that holds only the jobs being leased.

    The fill goes straight to the balancer's PUT /jobs/<id> (what an endpoint forwards) unless
    `direct` is false: the balancer sees the same requests, in half the time. The lease rate is
    measured on store.py's Store itself (8 threads leasing one job at a time, as 8 workers
    would, each lease committed), alternating between the two queues."""
    from dynamic_workload.store import Store

    # The comparison queue: a store of its own holding `lease_jobs` jobs, nothing else.
    baseline_dir = tempfile.mkdtemp(prefix="lease-baseline-", dir=work_dir)
    baseline = Store(os.path.join(baseline_dir, "jobs.db"), max_queued=10_000_000)
    baseline_closer = CLEANUP.push("baseline store", baseline.close)
    data = os.urandom(size)
    fillers = [threading.Thread(target=lambda k=k: [baseline.enqueue(f"b{k}-{i}", 10, data)
                                                    for i in range(lease_jobs // 8)]) for k in range(8)]
    for filler in fillers:
        filler.start()
    for filler in fillers:
        filler.join()

    cluster = Cluster(work_dir, "memory", cluster_min_workers=0, cluster_max_workers=0,
                      cluster_max_queued=max(1_000_000, jobs * 2)).fire()
    try:
        balancer = cluster.service_pid("balancer")
        rss_before, _ = rss_kib(balancer)
        ports = [cluster.balancer_port] if direct else cluster.endpoints
        done, fill_seconds = fill(ports, cluster.token, jobs, size, direct=direct)
        rss_after, rss_peak = rss_kib(balancer)
        status = cluster.status()
        db = os.path.join(cluster.state_dir, "jobs.db")
        disk = {suffix or "db": os.path.getsize(db + suffix) if os.path.exists(db + suffix) else 0
                for suffix in ("", "-wal", "-shm")}
        log(f"filled {done} jobs of {size} bytes in {fill_seconds:.0f} s ({done / fill_seconds:.0f}/s); "
            f"balancer RSS {rss_after / 1024:.0f} MiB")
        # Behind the backlog: the balancer's own database (the balancer stays up, idle: no
        # workers, no traffic).
        store = Store(db, max_queued=10_000_000)
        try:
            empty_rates, backlog_rates = [], []
            chunk = lease_jobs // rounds
            for _ in range(rounds):
                empty_rates.append(lease_rate(baseline, chunk))
                backlog_rates.append(lease_rate(store, chunk))
        finally:
            store.close()
        empty_rate, backlog_rate = percentile(empty_rates, 50), percentile(backlog_rates, 50)
        log(f"lease rate: {empty_rate:.0f}/s with {lease_jobs} queued, {backlog_rate:.0f}/s with "
            f"{status['queued']} queued")
    finally:
        cluster.teardown()
        CLEANUP.pop(baseline_closer)
    return {
        "jobs": jobs, "job_bytes": size, "queued": status["queued"], "fill_seconds": fill_seconds,
        "fill_rate": done / fill_seconds,
        "fill_path": "balancer PUT /jobs/<id>" if direct else "endpoints PUT /enqueue",
        "balancer_rss_mib_before": rss_before / 1024, "balancer_rss_mib": rss_after / 1024,
        "balancer_rss_peak_mib": rss_peak / 1024, "disk_bytes": disk, "disk_mib": sum(disk.values()) / 2**20,
        "lease_jobs": lease_jobs, "lease_rounds": rounds, "lease_rates_empty": empty_rates,
        "lease_rates_backlog": backlog_rates, "lease_rate_empty": empty_rate, "lease_rate_backlog": backlog_rate,
        "lease_ratio": backlog_rate / empty_rate, "load_average": load_average(),
    }
