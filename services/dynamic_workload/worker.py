"""The worker: lease a job, compute it, post its result; repeat until idle for too long.

- Leases long-poll the balancer, so an idle worker makes one request per poll period.
- While computing, a heartbeat thread extends the lease every third of its length, so a
  long job keeps its lease and a dead worker's job returns to the queue when it expires.
- When the balancer is away, every call is retried with exponential backoff and jitter;
  a finished result is kept and posted when it is back.
- After ``worker_idle_timeout`` seconds without a job the worker ends itself (exit 0; on EC2
  the unit then powers the instance off, and the shutdown behaviour terminates it) unless
  the balancer says it is needed to keep ``min_workers``.
- Signals only set flags. A first SIGTERM (or SIGINT) is a warm stop: finish the current
  job, post it, exit. A second is a cold stop: abandon the job, give it back, exit.
"""

import argparse
import base64
import os
import random
import signal
import socket
import threading
import time

from . import logs
from .client import BalancerClient, BalancerUnreachable
from .config import Settings
from .work import Interrupted, work_interruptibly

POLL_SECONDS = 10


class Stop:
    """Stop requests from signals: warm after the first, cold after the second."""

    def __init__(self):
        self.requests = 0

    def request(self, *_):
        self.requests += 1

    @property
    def warm(self):
        return self.requests >= 1

    @property
    def cold(self):
        return self.requests >= 2


class Worker:
    def __init__(self, client, worker_id, idle_timeout, clock=time.monotonic, sleep=time.sleep):
        self.client = client
        self.worker_id = worker_id
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.sleep = sleep
        self.stop = Stop()
        self.jobs_done = 0

    def call(self, method, path, body=None, timeout=None, give_up=lambda: False):
        """A balancer request, retried with backoff while the balancer is away."""
        delay = 0.1
        headers = {"X-Worker-Id": self.worker_id}
        while True:
            try:
                answer = self.client.request(method, path, body, headers, timeout=timeout)
                if answer.status < 500 and answer.status != 429:
                    return answer
                reason = f"HTTP {answer.status}"
            except BalancerUnreachable as error:
                reason = str(error)
            if give_up():
                return None
            logs.detail("balancer_retry", reason=reason, delay=round(delay, 2))
            self.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)

    def run(self):
        logs.event("started", worker=self.worker_id)
        idle_since = self.clock()
        while not self.stop.warm:
            wait = max(0, min(POLL_SECONDS, int(self.idle_timeout - (self.clock() - idle_since)) + 1))
            answer = self.call("POST", f"/lease?wait={wait}", b"", timeout=wait + 30,
                               give_up=lambda: self.stop.warm)
            if answer is None:
                break
            if answer.status == 401:
                logs.event("unauthorized", worker=self.worker_id)
                return 2
            lease = answer.json()
            for job in lease["jobs"]:
                self.process(job, lease["lease_seconds"])
                idle_since = self.clock()
            if lease["keep"]:
                idle_since = self.clock()
            if self.clock() - idle_since >= self.idle_timeout:
                logs.event("idle_exit", worker=self.worker_id, idle_seconds=self.idle_timeout,
                           jobs_done=self.jobs_done)
                return 0
        logs.event("stopped", worker=self.worker_id, jobs_done=self.jobs_done)
        return 0

    def process(self, job, lease_seconds):
        job_id = job["id"]
        if self.stop.warm:  # leased as the stop came in: hand it straight back
            self.call("POST", f"/jobs/{job_id}/release", b"", give_up=lambda: self.stop.cold)
            return
        data = base64.b64decode(job["data"])
        beating = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job_id, lease_seconds / 3, beating), daemon=True)
        heartbeat.start()
        started = time.perf_counter()
        try:
            digest = work_interruptibly(data, job["iterations"], lambda: self.stop.cold)
        except Interrupted:
            beating.set()
            logs.event("abandoned", worker=self.worker_id, job=job_id)
            self.call("POST", f"/jobs/{job_id}/release", b"", timeout=5, give_up=lambda: True)
            return
        finally:
            beating.set()
        duration = time.perf_counter() - started
        body = {"result": digest.hex(), "duration": duration}
        self.call("POST", f"/jobs/{job_id}/result", body, give_up=lambda: self.stop.cold)
        self.jobs_done += 1
        logs.detail("completed", worker=self.worker_id, job=job_id, duration=round(duration, 4))

    def _heartbeat(self, job_id, every, done):
        while not done.wait(every):
            try:
                answer = self.client.request("POST", f"/jobs/{job_id}/heartbeat", b"",
                                             {"X-Worker-Id": self.worker_id}, timeout=every)
                if answer.status == 200 and not answer.json()["held"]:
                    logs.event("lease_lost", worker=self.worker_id, job=job_id)
            except BalancerUnreachable:
                pass  # the result will still be accepted when the balancer is back


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dynamic_workload worker", description=__doc__.splitlines()[0])
    parser.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logs.configure("worker", args.verbose)
    settings = Settings.from_env()
    worker = Worker(BalancerClient(settings.balancer_url, settings.token), args.worker_id,
                    settings.worker_idle_timeout)
    signal.signal(signal.SIGTERM, worker.stop.request)
    signal.signal(signal.SIGINT, worker.stop.request)
    return worker.run()
