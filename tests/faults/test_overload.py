"""Overload: offered load far above capacity, with a small cluster_max_queued.

Two load-generator processes (32 keep-alive clients) enqueue as fast as answers come, for a few
seconds, into a cluster of one worker whose queue holds 20 jobs. The excess must be refused
quickly with 429 or 503 and Retry-After, /healthz of every service must stay fast (p99 under
100 ms), the memory of every process must stay bounded, the queue must never hold more than
cluster_max_queued, and every accepted job must complete with the right result.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import faultkit
from faultkit import report

pytestmark = pytest.mark.cluster

MAX_QUEUED = 20
ITERATIONS = 30_000
SECONDS = 6
RSS_LIMIT_KIB = 150 * 1024
RSS_GROWTH_KIB = 60 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with faultkit.fired(tmp_path_factory.mktemp("overload"), cluster_max_queued=MAX_QUEUED,
                        cluster_max_workers=1, cluster_worker_idle_timeout=30) as cluster:
        yield cluster


class Sampler:
    """Probes /healthz of every service (a fresh connection each time, as a health checker does),
    and samples the queue length and the RSS of every process of the cluster, until stopped."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.ports = {"endpoint-0": cluster.endpoints[0], "endpoint-1": cluster.endpoints[1],
                      "balancer": cluster.balancer_port}
        self.latencies = {name: [] for name in self.ports}
        self.failures = []
        self.queued = []
        self.rss = {}  # service name -> max KiB
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]

    def _probe(self):
        while not self._stop.is_set():
            for name, port in self.ports.items():
                began = time.monotonic()
                try:
                    status = faultkit.request(port, "GET", "/healthz", timeout=5).status
                except OSError as error:
                    status = repr(error)
                self.latencies[name].append(time.monotonic() - began)
                if status != 200:
                    self.failures.append((name, status))
            self._stop.wait(0.02)

    def _sample(self):
        while not self._stop.is_set():
            self.sample_rss()
            try:
                answer = faultkit.balancer(self.cluster, "GET", "/status", timeout=5)
                self.queued.append(answer.json()["queued"])
            except (OSError, ValueError):
                pass
            self._stop.wait(0.25)

    def sample_rss(self):
        for pid in faultkit.group_members(self.cluster.supervisor_pid()):
            kib = faultkit.rss_kib(pid)
            if kib is not None:
                name = faultkit.service_name(self.cluster, pid)
                self.rss[name] = max(self.rss.get(name, 0), kib)

    def start(self):
        for thread in self._threads:
            thread.start()

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def test_overload_is_refused_quickly_health_stays_fast_memory_bounded_and_accepted_work_completes(cluster):
    baseline = Sampler(cluster)
    baseline.sample_rss()
    sampler = Sampler(cluster)
    sampler.start()
    loaders = []
    try:
        time.sleep(1.0)  # a quiet baseline for the probe: how fast /healthz is on this machine now
        quiet = {name: len(values) for name, values in sampler.latencies.items()}
        for n in range(2):
            loaders.append(subprocess.Popen(
                [sys.executable, os.path.join(faultkit.HERE, "loadgen.py"), "--ports",
                 ",".join(map(str, cluster.endpoints)), "--clients", "16", "--seconds", str(SECONDS),
                 "--iterations", str(ITERATIONS), "--tag", f"overload-{n}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [json.loads(loader.communicate(timeout=SECONDS + 60)[0]) for loader in loaders]
    finally:
        for loader in loaders:
            if loader.poll() is None:
                loader.kill()
                loader.wait()
        sampler.stop()
    statuses = {}
    for out in outputs:
        for status, count in out["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    acknowledged = {}
    for out, n in zip(outputs, range(2)):
        for job_id, client, number in out["acknowledged"]:
            acknowledged[job_id] = (f"overload-{n} {client} {number}".encode(), ITERATIONS)
    refusal = [x for out in outputs for x in out["refusal_latencies"]]
    accept = [x for out in outputs for x in out["accept_latencies"]]
    bad = [x for out in outputs for x in out["bad"]]
    missing_retry_after = sum(out["missing_retry_after"] for out in outputs)
    errors = sum(out["errors"] for out in outputs)
    offered = sum(statuses.values())
    health_p99 = {name: round(faultkit.percentile(values[quiet[name]:], 0.99) * 1000, 1)
                  for name, values in sampler.latencies.items()}
    quiet_p99 = {name: round(faultkit.percentile(values[:quiet[name]], 0.99) * 1000, 1)
                 for name, values in sampler.latencies.items()}
    refused = len(refusal)
    # Every accepted job completes, once, with the right result (40 checked against hashlib).
    began = time.monotonic()
    figures = faultkit.check_all_completed_once(cluster, acknowledged, timeout=90, verify=40)
    drained = time.monotonic() - began
    report("overload", offered=offered, offered_per_s=round(offered / SECONDS), accepted=len(acknowledged),
           refused=refused, statuses=statuses, connection_errors=errors,
           refusal_p99_ms=round(faultkit.percentile(refusal, 0.99) * 1000, 1),
           accept_p99_ms=round(faultkit.percentile(accept, 0.99) * 1000, 1) if accept else None,
           healthz_p99_ms=health_p99, healthz_probes=sum(map(len, sampler.latencies.values())),
           healthz_p99_before_load_ms=quiet_p99,
           queued_max=max(sampler.queued), rss_mib={k: round(v / 1024, 1) for k, v in sorted(sampler.rss.items())},
           rss_baseline_mib={k: round(v / 1024, 1) for k, v in sorted(baseline.rss.items())},
           drained_s=round(drained, 1), **figures)
    assert not bad, bad
    assert errors == 0
    assert refused > 10 * len(acknowledged) / 2, "the load was not far above capacity"
    assert missing_retry_after == 0
    assert faultkit.percentile(refusal, 0.99) < 0.5, "refusals were not quick"
    assert not sampler.failures, sampler.failures[:5]
    assert all(p99 < 100 for p99 in health_p99.values()), health_p99
    assert max(sampler.queued) <= MAX_QUEUED
    for name, kib in sampler.rss.items():
        assert kib < RSS_LIMIT_KIB, (name, kib)
        if name in baseline.rss:
            assert kib - baseline.rss[name] < RSS_GROWTH_KIB, (name, baseline.rss[name], kib)
