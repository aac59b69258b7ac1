"""The scaler on the local fleet: out to the cap and never past it, back to zero when idle."""

import os
import threading
import time

import pytest

from cluster import LocalCluster, contract_work
from conftest import wait_until

pytestmark = pytest.mark.cluster


def test_a_backlog_reaches_3_workers_never_4_and_0_after_the_idle_timeout(tmp_path):
    idle_timeout = 3
    cluster = LocalCluster(tmp_path, cluster_max_workers=3, cluster_worker_idle_timeout=idle_timeout)
    cluster.fire()
    try:
        seen = {"max_status": 0, "max_processes": 0}
        watching = threading.Event()

        def watch():
            while not watching.is_set():
                seen["max_status"] = max(seen["max_status"], cluster.status()["workers"])
                seen["max_processes"] = max(seen["max_processes"], len(cluster.worker_pids()))
                watching.wait(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        jobs = {}
        started = time.monotonic()
        for n in range(24):
            data = os.urandom(32)
            jobs[cluster.enqueue(data, 1_000_000).json()["id"]] = data
        wait_until(lambda: cluster.status()["workers"] == 3, 10, message="3 workers")
        scaled_out = time.monotonic() - started
        last_done = cluster.wait_completed(jobs, timeout=90)
        wait_until(lambda: cluster.status()["workers"] == 0 and not cluster.worker_pids(),
                   idle_timeout + 10, message="0 workers")
        scaled_in = time.monotonic() - last_done
        watching.set()
        watcher.join()
        assert seen["max_status"] == 3 and seen["max_processes"] == 3, seen
        results = {job["id"]: job["result"] for job in cluster.completed(top=100)}
        assert all(results[i] == contract_work(d, 1_000_000) for i, d in jobs.items())
        assert scaled_out < 5
        assert scaled_in < idle_timeout + 5
        print(f"\n3 workers {scaled_out:.2f} s after the backlog began; 0 workers {scaled_in:.2f} s "
              f"after the last completion (idle timeout {idle_timeout} s)")
    finally:
        cluster.teardown()


def test_min_workers_are_kept_and_replaced_when_they_die(tmp_path):
    cluster = LocalCluster(tmp_path, cluster_min_workers=1, cluster_max_workers=2, cluster_worker_idle_timeout=1)
    cluster.fire()
    try:
        wait_until(lambda: len(cluster.worker_pids()) == 1, 10, message="the minimum worker")
        (worker_id, pid), = cluster.worker_pids().items()
        wait_until(lambda: cluster.status()["workers_live"] == 1, 10, message="the worker to report in")
        # Watch it through three idle timeouts: the balancer asks it to stay, as the floor needs it.
        deadline = time.monotonic() + 3
        wait_until(lambda: time.monotonic() > deadline or worker_id not in cluster.worker_pids(), 5,
                   message="three idle timeouts")
        assert worker_id in cluster.worker_pids(), "the minimum worker ended itself"
        cluster.kill(pid)
        wait_until(lambda: cluster.worker_pids() and worker_id not in cluster.worker_pids(), 10,
                   message="a replacement worker")
    finally:
        cluster.teardown()
