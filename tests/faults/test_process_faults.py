"""Hardware and process failure, and graceful stops, against the real local cluster.

kill -9 of the balancer at random moments while clients enqueue and workers complete, kill -9 of
workers mid-job again and again, kill -9 of one endpoint while clients use both, and SIGTERM to
a busy worker (warm stop: it finishes its job; twice: it gives the job back). Contract section 5:
nothing acknowledged is lost, no id is completed twice, results equal hashlib's chain.
"""

import os
import random
import signal
import threading
import time

import pytest

import faultkit
from dynamic_workload.worker import BATCH_ITERATIONS
from faultkit import contract_work, process_start_time, report, wait_until

pytestmark = pytest.mark.cluster

# A long lease: a job comes back because the fleet noticed its worker died, never because the
# lease ran out, so the timings below measure the fleet's detection.
LEASE_SECONDS = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with faultkit.fired(tmp_path_factory.mktemp("procfaults"), cluster_max_workers=2,
                        local_cluster_lease_seconds=LEASE_SECONDS, local_cluster_max_attempts=10,
                        cluster_worker_idle_timeout=30) as cluster:
        yield cluster


def running_jobs(cluster):
    """{job id: (worker id, attempts)} of the jobs running now, from the job database."""
    rows = faultkit.db_rows(cluster, "SELECT id, worker_id, attempts FROM jobs WHERE state = 'running'")
    return {job_id: (worker_id, attempts) for job_id, worker_id, attempts in rows}


def test_kill_9_of_the_balancer_at_random_moments_during_enqueues_and_completions(cluster):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    completed_before = cluster.status()["completed"]
    kills, outages, running_at_kill = 0, [], []
    pulls = {"ok": 0, "refused": 0, "bad": []}
    stop_pulling = threading.Event()

    def puller():
        # Completions are read all along, through both endpoints, as a user would.
        n = 0
        while not stop_pulling.is_set():
            n += 1
            try:
                answer = faultkit.request(cluster.endpoints[n % 2], "POST", "/pullCompleted?top=50", timeout=30)
            except OSError:
                pulls["refused"] += 1
                continue
            if answer.status == 200:
                ids = [job["id"] for job in answer.json()]
                if len(ids) != len(set(ids)):
                    pulls["bad"].append("an id listed twice")
                pulls["ok"] += 1
            elif answer.status == 503 and "Retry-After" in answer.headers:
                pulls["refused"] += 1
            else:
                pulls["bad"].append((answer.status, answer.body[:200]))
            stop_pulling.wait(0.05)

    reader = threading.Thread(target=puller, daemon=True)
    stream = faultkit.EnqueueStream(cluster, clients=4, iterations=2000, rate=25, long_every=12,
                                    long_iterations=60_000, tag="balancer-kill", seed=seed)
    began = time.monotonic()
    stream.start()
    reader.start()
    try:
        for _ in range(4):
            done_at_start = cluster.status()["completed"]
            acked_at_start = stream.count()
            # Workers are busy and completions flow between kills.
            wait_until(lambda: stream.count() >= acked_at_start + 20
                       and cluster.status()["completed"] >= done_at_start + 10, 30,
                       message="enqueues and completions between kills")
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment in the stream
            pid = faultkit.balancer_pid(cluster)
            running_at_kill.append(len(running_jobs(cluster)))
            killed_at = time.monotonic()
            cluster.kill(pid)
            kills += 1
            faultkit.wait_restarted(cluster, pid, "dynamic_workload balancer")
            wait_until(lambda: faultkit.healthy(cluster.balancer_port), 15, message="the balancer to serve again")
            outages.append(time.monotonic() - killed_at)
    finally:
        stream.stop()
        stop_pulling.set()
        reader.join(30)
    completed_meanwhile = cluster.status()["completed"] - completed_before
    streamed = time.monotonic() - began
    assert kills == 4
    assert not stream.failures, stream.failures[:5]
    assert not pulls["bad"], pulls["bad"][:5]
    assert stream.count() >= 100, stream.answers
    checked_at = time.monotonic()
    figures = faultkit.check_all_completed_once(cluster, stream.acknowledged, timeout=90)
    status = cluster.status()
    assert status["failed"] == 0
    refused = sum(v for k, v in stream.answers.items() if k not in (200, 201))
    report("kill -9 of the balancer x4 during enqueues and completions", seed=seed, kills=kills,
           sent=stream.sent, refused=refused, **figures,
           completed_by_end_of_stream=completed_meanwhile, jobs_running_at_each_kill=running_at_kill,
           outage_max_s=round(max(outages), 2), stream_s=round(streamed, 1),
           drain_and_check_s=round(time.monotonic() - checked_at, 1),
           enqueue_p99_s=round(faultkit.percentile(stream.latencies, 0.99), 3),
           enqueue_max_s=round(max(stream.latencies), 2), pulls_ok=pulls["ok"], pulls_refused=pulls["refused"])


def test_kill_9_of_workers_mid_job_again_and_again(cluster):
    rng = random.Random()
    jobs = {}
    for n in range(8):
        data = f"worker-kill {n} {os.urandom(8).hex()}".encode()
        answer = cluster.enqueue(data, 500_000)
        assert answer.status == 201, answer.body
        jobs[answer.json()["id"]] = (data, 500_000)
    expected = {}
    # hashlib's results, computed while the workers are being killed.
    checker = threading.Thread(target=lambda: expected.update(
        {job_id: contract_work(data, n) for job_id, (data, n) in jobs.items()}), daemon=True)
    checker.start()
    kills, relet = [], []
    for _ in range(5):
        running = wait_until(lambda: {j: w for j, w in running_jobs(cluster).items() if j in jobs}, 30,
                             message="a job of ours to run")
        job_id, (worker_id, attempts) = rng.choice(sorted(running.items()))
        pid = cluster.worker_pids().get(worker_id)
        if pid is None:
            continue
        time.sleep(rng.uniform(0.02, 0.15))  # somewhere in the job
        row = faultkit.job_row(cluster, job_id)
        if row[0] != "running" or row[2] != worker_id:
            continue  # it finished in the meantime: not mid-job any more
        cluster.kill(pid)
        killed_at = time.monotonic()
        kills.append(job_id)
        # The fleet notices the dead process and the job runs again (or had just completed).
        wait_until(lambda: (lambda r: r[0] == "completed" or r[1] > attempts or r[2] != worker_id)(
            faultkit.job_row(cluster, job_id)), 20, message="the killed worker's job to come back")
        relet.append(time.monotonic() - killed_at)
        assert worker_id not in cluster.worker_pids()
    assert len(kills) >= 3, "the jobs finished before enough workers could be killed mid-job"
    acknowledged = dict(jobs)
    figures = faultkit.check_all_completed_once(cluster, acknowledged, timeout=60, verify=0)
    attempts = {job_id: cluster.job(job_id).json()["attempts"] for job_id in jobs}
    results = {job_id: cluster.job(job_id).json()["result"] for job_id in jobs}
    checker.join(60)
    assert results == expected
    assert all(cluster.job(job_id).json()["status"] == "completed" for job_id in jobs)
    extra = sum(attempts.values()) - len(jobs)
    # Each kill cost an attempt to each job its worker held: a lease batches small jobs up to
    # worker.BATCH_ITERATIONS (two of these at most), finished ones included until they ride
    # on the next lease (none if it had just brought its results back).
    per_lease = max(1, BATCH_ITERATIONS // 500_000)
    assert 1 <= extra <= per_lease * len(kills), (attempts, kills)
    assert faultkit.db_rows(cluster, "SELECT COUNT(*) FROM jobs WHERE state = 'running'")[0][0] == 0
    report("kill -9 of workers mid-job", kills=len(kills), **dict(figures, verified=len(jobs)),
           extra_attempts=extra, max_attempts=max(attempts.values()),
           back_in_queue_max_s=round(max(relet), 2))


def test_kill_9_of_one_endpoint_while_clients_use_both(cluster):
    stream = faultkit.EnqueueStream(cluster, clients=4, iterations=1000, rate=40, tag="endpoint-kill")
    stream.start()
    try:
        wait_until(lambda: stream.count() >= 40, 20, message="enqueues through both endpoints")
        pid = faultkit.endpoint_pid(cluster, 0)
        cluster.kill(pid)
        killed_at = time.monotonic()
        new_pid = faultkit.wait_restarted(cluster, pid, f"--port {cluster.endpoints[0]}", timeout=10)
        wait_until(lambda: faultkit.healthy(cluster.endpoints[0]), 10, message="the endpoint to serve again")
        back_after = time.monotonic() - killed_at
        acked = stream.count()
        wait_until(lambda: stream.count() >= acked + 40, 20, message="enqueues after the restart")
    finally:
        stream.stop()
    assert new_pid != pid
    assert not stream.failures, stream.failures[:5]
    # The other endpoint never failed a request.
    assert stream.errors_by_port[cluster.endpoints[1]] == 0, stream.answers
    figures = faultkit.check_all_completed_once(cluster, stream.acknowledged, timeout=60)
    report("kill -9 of one endpoint", sent=stream.sent, **figures,
           errors_killed_endpoint=stream.errors_by_port[cluster.endpoints[0]],
           errors_other_endpoint=stream.errors_by_port[cluster.endpoints[1]],
           back_after_s=round(back_after, 2))


def _busy_worker(cluster, iterations, tag):
    data = f"{tag} {os.urandom(8).hex()}".encode()
    answer = cluster.enqueue(data, iterations)
    assert answer.status == 201
    job_id = answer.json()["id"]
    wait_until(lambda: job_id in running_jobs(cluster), 30, message="the job to start")
    worker_id, attempts = running_jobs(cluster)[job_id]
    pid = cluster.worker_pids()[worker_id]
    return job_id, data, worker_id, pid


def test_sigterm_to_a_busy_worker_finishes_its_job_then_it_exits(cluster):
    iterations = 1_500_000
    job_id, data, worker_id, pid = _busy_worker(cluster, iterations, "warm stop")
    start_time = process_start_time(pid)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: process_start_time(pid) != start_time, 30, message="the worker to exit")
    exited_after = time.monotonic() - signalled
    job = cluster.job(job_id).json()
    # A warm stop: the job was finished and posted by that worker, once, on its first attempt.
    assert job["status"] == "completed", job
    assert job["attempts"] == 1, job
    assert faultkit.job_row(cluster, job_id)[2] == worker_id
    assert job["result"] == contract_work(data, iterations)
    stopped = [r for r in faultkit.log_events(cluster, "workers.log", "stopped") if r.get("worker") == worker_id]
    assert stopped and stopped[-1]["jobs_done"] >= 1, stopped
    report("SIGTERM to a busy worker (warm stop)", status=job["status"], attempts=job["attempts"],
           exited_after_s=round(exited_after, 2))


def test_two_sigterms_to_a_busy_worker_give_its_job_back_at_once(cluster):
    iterations = 2_500_000
    job_id, data, worker_id, pid = _busy_worker(cluster, iterations, "cold stop")
    start_time = process_start_time(pid)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: process_start_time(pid) != start_time, 10, message="the worker to exit")
    exited_after = time.monotonic() - signalled
    released = [r for r in faultkit.log_events(cluster, "balancer.log", "released") if r.get("job") == job_id]
    assert released and released[0]["released"] is True and released[0]["worker"] == worker_id, released
    # Given back, not expired: well before the 60 s lease, another worker has it.
    wait_until(lambda: faultkit.job_row(cluster, job_id)[2] not in (None, worker_id), 20,
               message="another worker to take the released job")
    regained = time.monotonic() - signalled
    cluster.wait_completed([job_id], timeout=60)
    job = cluster.job(job_id).json()
    assert job["result"] == contract_work(data, iterations)
    # The released attempt is not counted against the job.
    assert job["attempts"] == 1, job
    report("two SIGTERMs to a busy worker (cold stop)", exited_after_s=round(exited_after, 2),
           released=True, re_leased_after_s=round(regained, 2), attempts=job["attempts"])
