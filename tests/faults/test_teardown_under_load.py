"""Graceful stop of the whole cluster: `teardown.yml` while clients enqueue and workers compute.

What happens is what the README documents: teardown stops every process (workers get a warm stop
first) and then removes the state directory, job database included, so jobs that were acknowledged
but not completed are discarded with it. This test measures that and checks the rest: clients
never get a 5xx other than 503 while it happens, teardown finishes within its grace period, and
nothing of the cluster keeps running or listening.
"""

import os
import socket
import time

import pytest

import faultkit
from faultkit import report, wait_until

pytestmark = pytest.mark.cluster


def listening(port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_teardown_during_load_stops_everything_and_discards_the_queue(tmp_path):
    cluster = faultkit.LocalCluster(tmp_path, cluster_max_workers=2, cluster_worker_idle_timeout=30)
    torn_down = False
    try:
        cluster.fire()
        pgid = cluster.supervisor_pid()
        stream = faultkit.EnqueueStream(cluster, clients=4, iterations=200_000, rate=20, tag="teardown",
                                        timeout=20)
        stream.start()
        try:
            wait_until(lambda: cluster.status()["completed"] >= 3 and len(cluster.worker_pids()) == 2, 30,
                       message="workers busy and a backlog")
            workers = list(cluster.worker_pids().values())
            # The logs are removed with the state: keep them open to read what the services said.
            logs = {name: open(os.path.join(cluster.state_dir, "logs", name), "rb")
                    for name in ("workers.log", "balancer.log", "supervisor.log")}
            for log in logs.values():
                log.seek(0, os.SEEK_END)
            before = cluster.status()
            acknowledged_at_teardown = stream.count()
            began = time.monotonic()
            cluster.teardown()
            torn_down = True
            took = time.monotonic() - began
        finally:
            stream.stop()
        said = {name: log.read().decode("utf-8", "replace") for name, log in logs.items()}
        for log in logs.values():
            log.close()
        # Nothing of the cluster keeps running or listening, and its state is gone.
        assert faultkit.group_members(pgid) == []
        assert all(faultkit.process_start_time(pid) is None for pid in workers)
        assert not os.path.exists(cluster.state_dir)
        assert not any(listening(port) for port in cluster.endpoints + [cluster.balancer_port])
        # While it stopped, clients got answers or refused connections: never a 500.
        assert not stream.failures, stream.failures[:5]
        assert took < cluster.vars["local_cluster_stop_grace"] + 30
        warm_stops = said["workers.log"].count('"event": "stopped"')
        balancer_stopped = '"event": "stopped"' in said["balancer.log"]
        completed_seen = before["completed"]
        discarded = stream.count() - completed_seen
        report("teardown during load", acknowledged=stream.count(),
               acknowledged_before_teardown=acknowledged_at_teardown,
               completed_before_teardown=completed_seen,
               queued_or_running_discarded=f"~{discarded} (state removed by design)",
               answers=dict(stream.answers), teardown_s=round(took, 2),
               workers_warm_stopped=f"{warm_stops} of {len(workers)}", balancer_stopped_cleanly=balancer_stopped,
               processes_left=0)
        # The queue is discarded with the state: the acknowledged jobs that had not completed are
        # gone, as the README says. If the state is ever kept, replace this with a re-fire check.
        assert discarded > 0
    finally:
        if not torn_down:
            cluster.teardown()
