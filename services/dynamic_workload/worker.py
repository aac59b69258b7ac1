"""The worker: lease a job, compute it, post its result; repeat until idle for too long.

- Leases long-poll the balancer, so an idle worker makes one request per poll period.
- A lease brings a batch of small jobs (or one big one), and the next lease carries their
  results back: one request per batch, recorded in one commit.
- A heartbeat thread extends the leases of the jobs it holds every third of their length, so
  a long job keeps its lease and a dead worker's job returns to the queue when it expires.
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
# A lease takes up to this many jobs, as long as they add up to at most this many iterations
# (about half a second of hashing): small jobs come in batches, big ones one at a time.
BATCH_JOBS = 32
BATCH_ITERATIONS = 1_000_000


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
        self.lease_seconds = 30.0  # until the balancer says otherwise
        self.held = set()  # ids of the jobs leased and not yet finished (the heartbeat's list)
        self._held_lock = threading.Lock()

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
        done = threading.Event()
        threading.Thread(target=self._heartbeat, args=(done,), name="heartbeat", daemon=True).start()
        try:
            return self._loop()
        finally:
            done.set()

    def _loop(self):
        idle_since = self.clock()
        finished = []  # results computed and not yet recorded: they ride on the next lease
        while not self.stop.warm:
            wait = max(0, min(POLL_SECONDS, int(self.idle_timeout - (self.clock() - idle_since)) + 1))
            answer = self.call("POST", f"/lease?wait={wait}&max={BATCH_JOBS}&budget={BATCH_ITERATIONS}",
                               {"results": finished}, timeout=wait + 30, give_up=lambda: self.stop.warm)
            if answer is None:
                break
            if answer.status == 401:
                logs.event("unauthorized", worker=self.worker_id)
                return 2
            if answer.status != 200:  # a 4xx here is a bug on one side: say so, don't spin
                logs.event("lease_refused", worker=self.worker_id, status=answer.status,
                           error=answer.body[:200].decode(errors="replace"))
                self.sleep(1.0)
                continue
            lease = answer.json()
            finished = []
            self.lease_seconds = lease["lease_seconds"]
            jobs = lease["jobs"]
            with self._held_lock:
                self.held.update(job["id"] for job in jobs)
            for job in jobs:
                outcome = self.process(job)
                with self._held_lock:
                    self.held.discard(job["id"])
                if outcome is not None:
                    finished.append(outcome)
            if jobs or lease["keep"]:
                idle_since = self.clock()
            elif self.clock() - idle_since >= self.idle_timeout:
                logs.event("idle_exit", worker=self.worker_id, idle_seconds=self.idle_timeout,
                           jobs_done=self.jobs_done)
                return 0
        if finished:  # stopping: have what is done recorded, and take nothing new
            self.call("POST", "/lease?max=0", {"results": finished}, give_up=lambda: self.stop.cold)
        logs.event("stopped", worker=self.worker_id, jobs_done=self.jobs_done)
        return 0

    def process(self, job):
        """Compute a leased job; its result to record, or None if it was given back."""
        job_id = job["id"]
        if self.stop.warm:  # leased as the stop came in: hand it straight back
            self.call("POST", f"/jobs/{job_id}/release", b"", give_up=lambda: self.stop.cold)
            return None
        data = base64.b64decode(job["data"])
        started = time.perf_counter()
        try:
            digest = work_interruptibly(data, job["iterations"], lambda: self.stop.cold)
        except Interrupted:
            logs.event("abandoned", worker=self.worker_id, job=job_id)
            self.call("POST", f"/jobs/{job_id}/release", b"", timeout=5, give_up=lambda: True)
            return None
        duration = time.perf_counter() - started
        self.jobs_done += 1
        logs.detail("computed", worker=self.worker_id, job=job_id, duration=round(duration, 4))
        return {"id": job_id, "result": digest.hex(), "duration": duration}

    def _heartbeat(self, done):
        """Extend the leases of every job held, a third of a lease apart, in one request."""
        last = time.monotonic()
        # Wake at least every second: the lease length is only known after the first lease.
        while not done.wait(min(1.0, self.lease_seconds / 3)):
            if time.monotonic() - last < self.lease_seconds / 3:
                continue
            last = time.monotonic()
            with self._held_lock:
                held = sorted(self.held)
            if not held:
                continue
            try:
                answer = self.client.request("POST", "/heartbeat", {"jobs": held},
                                             {"X-Worker-Id": self.worker_id}, timeout=self.lease_seconds / 3)
            except BalancerUnreachable:
                continue  # results are still accepted when the balancer is back
            if answer.status == 200:
                with self._held_lock:
                    lost = (set(held) - set(answer.json()["held"])) & self.held
                for job_id in sorted(lost):
                    logs.event("lease_lost", worker=self.worker_id, job=job_id)


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
