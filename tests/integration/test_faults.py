"""Nothing acknowledged is lost: kill -9 of the balancer, a worker or an endpoint (contract section 5)."""

import os
import random
import threading
import time

import pytest

from cluster import LocalCluster, contract_work
from conftest import wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(tmp_path):
    cluster = LocalCluster(tmp_path, cluster_max_workers=2, local_cluster_lease_seconds=5,
                           cluster_worker_idle_timeout=10)
    cluster.fire()
    yield cluster
    cluster.teardown()


def test_kill_9_of_the_balancer_during_a_stream_of_enqueues_loses_and_duplicates_nothing(cluster):
    acknowledged = {}  # id -> data
    refused = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(number):
        for n in range(150):
            if stop.is_set():
                return
            data = f"client {number} job {n} {os.urandom(8).hex()}".encode()
            try:
                answer = cluster.enqueue(data, 1000, port=cluster.endpoints[number % 2], timeout=20)
            except OSError as error:
                refused.append(repr(error))
                continue
            if answer.status in (200, 201):
                with lock:
                    acknowledged[answer.json()["id"]] = data
            else:
                assert answer.status == 503, answer.body  # balancer away: refused, never a 500
                refused.append(answer.status)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in clients:
        thread.start()
    rng = random.Random(7)
    kills = 0
    try:
        for _ in range(3):
            wait_until(lambda: len(acknowledged) > 40 * (kills + 1) or not any(t.is_alive() for t in clients),
                       30, message="enqueues between kills")
            time.sleep(rng.uniform(0, 0.2))  # a random moment within the stream
            pid = cluster.service_pid("dynamic_workload balancer")
            cluster.kill(pid)
            kills += 1
            wait_until(lambda: (cluster.service_pid("dynamic_workload balancer") or pid) != pid, 10,
                       message="the supervisor to restart the balancer")
    finally:
        for thread in clients:
            thread.join(timeout=60)
        stop.set()
    assert kills == 3
    assert len(acknowledged) >= 300, (len(acknowledged), refused[:5])
    cluster.wait_completed(acknowledged, timeout=90)
    completed = cluster.completed(top=1000)
    ids = [job["id"] for job in completed]
    assert len(ids) == len(set(ids)), "a job was listed twice"
    results = {job["id"]: job["result"] for job in completed}
    for job_id, data in acknowledged.items():
        assert results[job_id] == contract_work(data, 1000)
    print(f"\n{len(acknowledged)} acknowledged, {len(refused)} refused while the balancer was down, "
          f"{kills} kills, 0 lost, 0 duplicated")


def test_kill_9_of_a_worker_mid_job_and_the_job_still_completes(tmp_path):
    # A long lease proves the job comes back because the worker died, not because its lease expired.
    cluster = LocalCluster(tmp_path, cluster_max_workers=1, local_cluster_lease_seconds=120)
    cluster.fire()
    try:
        data = os.urandom(64)
        job_id = cluster.enqueue(data, 3_000_000).json()["id"]
        wait_until(lambda: cluster.job(job_id).json()["status"] == "running", 20, message="the job to start")
        (worker_id, pid), = cluster.worker_pids().items()
        cluster.kill(pid)
        killed_at = time.monotonic()
        cluster.wait_completed([job_id], timeout=60)
        job = cluster.job(job_id).json()
        assert job["result"] == contract_work(data, 3_000_000)
        assert job["attempts"] == 2
        assert worker_id not in cluster.worker_pids()
        print(f"\njob completed {time.monotonic() - killed_at:.1f} s after its worker was killed")
    finally:
        cluster.teardown()


def test_kill_9_of_an_endpoint_the_other_serves_and_it_comes_back(cluster):
    pid = cluster.service_pid(f"--port {cluster.endpoint_port}")
    cluster.kill(pid)
    answer = cluster.enqueue(b"still served", 1, port=cluster.endpoint_port + 1)
    assert answer.status == 201
    cluster.wait_healthy(timeout=10)
    assert cluster.service_pid(f"--port {cluster.endpoint_port}") not in (None, pid)
    cluster.wait_completed([answer.json()["id"]], timeout=30)
