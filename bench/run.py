"""dynamic-workload benchmarks (issue 6): one command, a table, a plot, results.json.

    python bench/run.py                      # everything (what `make bench` runs)
    python bench/run.py --only enqueue,e2e   # some sections: enqueue, e2e, worker, scaling, memory
    python bench/run.py --quick              # shorter runs, smaller numbers (for development)
    python bench/run.py --profile            # also py-spy profiles of the enqueue and end-to-end paths
    python bench/run.py --only profile       # only the profiles (results.json and the plot are left alone)
    python bench/run.py --report             # print the table and redraw the plot from results.json

Writes bench/out/results.json, bench/out/bench.png and (with --profile) bench/out/profile/.
Every process it starts (clusters, the bare server, redis-server, RQ workers, load generators)
is stopped before it exits, on failure and on Ctrl-C too.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadgen  # noqa: E402
import report  # noqa: E402
import sections  # noqa: E402
from common import BENCH, CLEANUP, Cluster, load_average, log, machine  # noqa: E402

SECTIONS = ("enqueue", "e2e", "worker", "scaling", "memory")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_sections(chosen, work_dir, results, quick):
    if "enqueue" in chosen:
        results["enqueue"] = sections.enqueue(
            work_dir, seconds=2 if quick else 5, rounds=1 if quick else 2, warmup=1 if quick else 2,
            concurrencies=(8, 64) if quick else (1, 8, 64))
        save(results)
    if "e2e" in chosen or "worker" in chosen:
        cluster = Cluster(work_dir, "e2e", cluster_min_workers=2, cluster_max_workers=2).fire()
        try:
            if "e2e" in chosen:
                jobs = 500 if quick else 2000
                ours = sections.end_to_end_ours(cluster, jobs=jobs)
                log(f"end to end, ours: {ours['seconds']:.2f} s, {ours['jobs_per_s']:.0f} jobs/s")
                results["e2e"] = {"jobs": jobs, "threads": 8, "iterations": 10, "ours": ours}
            if "worker" in chosen:
                results["worker"] = sections.worker_efficiency(cluster, rounds=2 if quick else 5)
                log(f"worker efficiency: cluster {results['worker']['cluster_best']:.3f} s, "
                    f"bare {results['worker']['bare_best']:.3f} s")
        finally:
            cluster.teardown()
        if "e2e" in chosen:
            port, connection, closer, redis_pid = sections.start_redis(work_dir)
            try:
                for key, worker_class in (("rq_simple", "rq.worker.SimpleWorker"), ("rq_forking", "rq.worker.Worker")):
                    rq = sections.end_to_end_rq(work_dir, port, connection, redis_pid, worker_class, jobs=jobs)
                    rq["worker_class"] = worker_class
                    results["e2e"][key] = rq
                    log(f"end to end, RQ {worker_class}: {rq['seconds']:.2f} s, {rq['jobs_per_s']:.0f} jobs/s")
            finally:
                CLEANUP.pop(closer)
            import redis
            import rq
            results["e2e"]["peer_versions"] = {"rq": rq.__version__, "redis-py": redis.__version__,
                                               "redis-server": connection_version(connection)}
        save(results)
    if "scaling" in chosen:
        results["scaling"] = sections.scaling(work_dir)
        save(results)
    if "memory" in chosen:
        results["memory"] = sections.memory(work_dir, jobs=10_000 if quick else 100_000)
        save(results)


def code_version():
    """The commit the services were measured at, "+changes" when services/ differs from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../services"], cwd=BENCH,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+changes" if dirty else "")) or None


def connection_version(connection):
    try:
        return connection.info("server")["redis_version"]
    except Exception:
        return "?"


OUT = os.path.join(BENCH, "out")
RESULTS = os.path.join(OUT, "results.json")


def save(results):
    os.makedirs(OUT, exist_ok=True)
    with open(RESULTS + ".tmp", "w") as out:
        json.dump(results, out, indent=1, default=str)
    os.replace(RESULTS + ".tmp", RESULTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS) + " (and profile)")
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller numbers")
    parser.add_argument("--profile", action="store_true", help="also profile the services with py-spy")
    parser.add_argument("--report", action="store_true", help="only print the table and plot from results.json")
    parser.add_argument("--load", choices=("wrk", "python"), help="load generator (default: wrk if installed)")
    args = parser.parse_args(argv)

    if args.report:
        with open(RESULTS) as saved:
            results = json.load(saved)
        print(report.table(results))
        report.plot(results, os.path.join(OUT, "bench.png"))
        return 0

    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    if "profile" in chosen:
        chosen.remove("profile")
        args.profile = True
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.load == "python" or (args.load is None and not loadgen.have_wrk()):
        os.environ["BENCH_LOAD"] = "python"
    # Ctrl-C stops the run (and everything it started) even when a shell started it in the
    # background with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    os.makedirs(OUT, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="dw-bench-")
    CLEANUP.push("work directory", lambda: shutil.rmtree(work_dir, ignore_errors=True))
    results = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(), "load_average_start": load_average(), "commit": code_version(),
        "quick": args.quick, "sections": chosen,
        "load_generator": "wrk" if os.environ.get("BENCH_LOAD") != "python" else "python",
        "load_generator_core": loadgen.load_core(),
    }
    started = time.monotonic()
    failed = None
    try:
        run_sections(chosen, work_dir, results, args.quick)
        if args.profile:
            import profiling
            results["profile"] = profiling.profile(work_dir, OUT)
    except KeyboardInterrupt:
        failed = "interrupted"
        log("interrupted: stopping everything the bench started")
    except Exception:
        failed = traceback.format_exc()
        log("failed:\n" + failed)
    finally:
        CLEANUP.run()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["load_average_end"] = load_average()
    if failed:
        results["failed"] = failed
    results["targets"] = [{"what": w, "target": t, "measured": m, "met": ok} for w, t, m, ok in report.targets(results)]
    if not chosen:  # profiles only: keep the last results.json and plot
        for name, text in (results.get("profile") or {}).items():
            print(f"\n===== {name}\n{text}")
        if failed:
            print("THE RUN DID NOT FINISH: " + failed.strip().splitlines()[-1])
        return 1 if failed else 0
    save(results)
    print(report.table(results))
    try:
        report.plot(results, os.path.join(OUT, "bench.png"))
        print(f"\nplot: {os.path.relpath(os.path.join(OUT, 'bench.png'))}; numbers: {os.path.relpath(RESULTS)}")
    except ImportError:
        print("\n(matplotlib is not installed: no plot; pip install matplotlib)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
