"""Network failure: a worker cut off from the balancer mid-job, and a balancer that stops answering.

The fleet launches no worker here (cluster_max_workers=0): the test runs two real worker processes
of its own (`python -m dynamic_workload worker`, the cluster's settings), each reaching the
balancer through a TCP proxy the test can cut. A cut proxy resets every connection after reading
its request line, which is what a worker sees when its path to the balancer breaks, and it logs
when each attempt came: the worker's backoff is measured, not assumed.
"""

import os
import signal
import threading
import time

import pytest

import faultkit
from faultkit import contract_work, report, wait_until

pytestmark = pytest.mark.cluster

LEASE_SECONDS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with faultkit.fired(tmp_path_factory.mktemp("netfaults"), cluster_max_workers=0,
                        local_cluster_lease_seconds=LEASE_SECONDS, cluster_worker_idle_timeout=120) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def workers(cluster, tmp_path_factory):
    """Two workers of the test's own, each behind its own proxy: {worker id: (OwnWorker, FaultProxy)}."""
    log_dir = tmp_path_factory.mktemp("networkers")
    started = {}
    try:
        for name in ("cut-a", "cut-b"):
            proxy = faultkit.FaultProxy(cluster.balancer_port)
            worker = faultkit.OwnWorker(cluster, name, proxy.port, str(log_dir / f"{name}.log"))
            started[name] = (worker, proxy)
        # Both report in (their first long-poll reaches the balancer through the proxy).
        wait_until(lambda: all(any("/lease" in line for line in proxy.requests()[0])
                               for _, proxy in started.values()), 20, message="both workers to poll")
        yield started
    finally:
        for worker, proxy in started.values():
            worker.stop()
            proxy.close()


def test_a_worker_cut_off_mid_job_backs_off_its_job_is_re_leased_and_recorded_once(cluster, workers):
    iterations = 2_500_000
    data = f"network cut {os.urandom(8).hex()}".encode()
    expected = {}
    checker = threading.Thread(target=lambda: expected.update(result=contract_work(data, iterations)), daemon=True)
    checker.start()
    answer = cluster.enqueue(data, iterations)
    assert answer.status == 201
    job_id = answer.json()["id"]
    first = wait_until(lambda: (lambda r: r if r and r[0] == "running" else None)(faultkit.job_row(cluster, job_id)),
                       20, message="a worker to lease the job")
    cut_name = first[2]
    other_name = next(name for name in workers if name != cut_name)
    cut_worker, cut_proxy = workers[cut_name]
    _, other_proxy = workers[other_name]
    cut_proxy.set_cut(True)
    cut_at = time.monotonic()
    try:
        # The lease runs out without heartbeats; the job goes to the other worker (attempt 2).
        wait_until(lambda: faultkit.job_row(cluster, job_id)[1:] == (2, other_name)
                   or faultkit.job_row(cluster, job_id)[0] == "completed", 20,
                   message="the job to be re-leased to the other worker")
        re_leased_after = time.monotonic() - cut_at
        # The cut worker finished its copy and retries bringing the result (on its next lease),
        # backing off. Before the cut it was computing: every lease it tries now carries it.
        result_path = "POST /lease"

        def result_attempts():
            return [t for t, line in list(cut_proxy.refused) if line.startswith(result_path)]
        wait_until(lambda: len(result_attempts()) >= 5, 30, message="five refused result posts from the cut worker")
    finally:
        cut_proxy.set_cut(False)
    restored_at = time.monotonic()
    attempts_times = result_attempts()
    gaps = [b - a for a, b in zip(attempts_times, attempts_times[1:])]
    # Both workers post their result; the first one recorded wins, the other is ignored.
    def answered_posts(proxy):
        """The balancer's answers to the results that went through `proxy` (each worker has one)."""
        return proxy.requests()[1]
    wait_until(lambda: answered_posts(cut_proxy) and answered_posts(other_proxy), 30,
               message="both workers' result posts to be answered")
    posted_back_after = time.monotonic() - restored_at
    recorded = answered_posts(cut_proxy) + answered_posts(other_proxy)
    checker.join(60)
    job = cluster.job(job_id).json()
    listed = [item["id"] for item in cluster.completed(top=1000)]
    assert job["status"] == "completed" and job["result"] == expected["result"], job
    assert job["attempts"] == 2, job
    assert listed.count(job_id) == 1
    assert sorted(recorded) == ['{"recorded": false}', '{"recorded": true}'], recorded
    # Backoff: the k-th wait is 0.1 s x 2^k with a jitter of x0.5 to x1 (worker.py), so it is
    # never shorter than 0.05 s x 2^k (5 % spared for clock noise): the retries slow down.
    assert all(gap >= 0.95 * 0.05 * 2 ** k for k, gap in enumerate(gaps)), gaps
    assert gaps[-1] > 2 * gaps[0], gaps
    assert len(cut_proxy.refused) < 40, len(cut_proxy.refused)
    assert cut_worker.process.poll() is None, "the cut-off worker died"
    report("worker cut off from the balancer mid-job", lease_s=LEASE_SECONDS,
           re_leased_after_s=round(re_leased_after, 2), refused_result_posts=len(attempts_times),
           backoff_gaps_s=[round(g, 2) for g in gaps], posted_after_restore_s=round(posted_back_after, 2),
           attempts=job["attempts"], recorded=recorded, listed_once=True)


def test_a_frozen_balancer_sigstop_longer_than_the_lease_loses_and_duplicates_nothing(cluster, workers):
    stream = faultkit.EnqueueStream(cluster, clients=4, iterations=100_000, rate=10, tag="sigstop", timeout=40)
    pid = faultkit.balancer_pid(cluster)
    stream.start()
    frozen_for = 0.0
    try:
        wait_until(lambda: stream.count() >= 20 and cluster.status()["running"] >= 1, 20,
                   message="jobs running on both workers")
        running_at_stop = cluster.status()["running"]
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            time.sleep(2 * LEASE_SECONDS)
        finally:
            os.kill(pid, signal.SIGCONT)
            frozen_for = time.monotonic() - stopped_at
        acked = stream.count()
        wait_until(lambda: stream.count() >= acked + 20, 30, message="enqueues after the balancer thawed")
    finally:
        stream.stop()
    assert faultkit.balancer_pid(cluster) == pid  # frozen, not restarted: the same process carries on
    assert not stream.failures, stream.failures[:5]
    figures = faultkit.check_all_completed_once(cluster, stream.acknowledged, timeout=60)
    status = cluster.status()
    assert status["failed"] == 0
    for worker, _ in workers.values():
        assert worker.process.poll() is None, "a worker died while the balancer was frozen"
    attempts = [cluster.job(job_id).json()["attempts"] for job_id in stream.acknowledged]
    report("balancer frozen (SIGSTOP) for longer than the lease", frozen_s=round(frozen_for, 2),
           running_at_stop=running_at_stop, **figures, re_run_jobs=sum(a > 1 for a in attempts),
           enqueue_max_s=round(max(stream.latencies), 2), answers=dict(stream.answers))
