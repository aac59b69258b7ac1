"""The scaling policy, and the loop that applies it to a fleet once per tick.

The policy (``decide``) is a pure function of what the balancer observes, so it is tested
without processes or clocks. It combines two rules:

- AWS's "acceptable backlog per instance": a worker clears ``target_wait / mean_job_time``
  jobs within the target wait, so the backlog (queued and running jobs) needs
  ``ceil(backlog / that)`` workers. Before any job has completed the mean is unknown and
  every job is assumed to need a worker of its own (bounded by the cap).
- The seed's rule: when the oldest queued job has waited longer than the target, the
  workers at hand are not enough whatever the estimate says: add one.

Booting workers count as capacity, so a slow boot never triggers a second launch for the
same need. The count stays within ``[min_workers, max_workers]``. Workers beyond the need
are never killed: they end themselves after ``worker_idle_timeout`` seconds without work.

The loop (``Scaler.tick``) also keeps the fleet honest: it terminates workers that never
reported in within ``worker_boot_timeout`` or went silent for ``worker_lost_timeout``, and
returns the jobs of every worker that is gone to the queue at once.
"""

import dataclasses
import math
import random
import threading
import time

from . import logs
from .fleets import FleetError


@dataclasses.dataclass(frozen=True)
class Observation:
    queued: int
    running: int
    oldest_wait: float  # seconds
    mean_job_seconds: float | None
    live: int
    booting: int


@dataclasses.dataclass(frozen=True)
class Decision:
    wanted: int
    launch: int
    reason: str


def decide(seen: Observation, *, min_workers, max_workers, target_wait):
    """How many workers the backlog wants, and how many to launch now."""
    backlog = seen.queued + seen.running
    have = seen.live + seen.booting
    if seen.mean_job_seconds:
        per_worker = max(1.0, target_wait / seen.mean_job_seconds)
        estimate = f"mean job {seen.mean_job_seconds:.3g} s"
    else:
        per_worker = 1.0
        estimate = "no job timed yet"
    wanted = math.ceil(backlog / per_worker)
    why = f"queue {seen.queued} jobs ({seen.running} running), {estimate}, target wait {target_wait:g} s"
    if seen.queued and seen.oldest_wait > target_wait and wanted <= have:
        wanted = have + 1
        why += f", oldest waited {seen.oldest_wait:.1f} s"
    bounded = min(max(wanted, min_workers), max_workers)
    why += f": {wanted} workers wanted"
    if bounded != wanted:
        why += f", {'cap' if bounded < wanted else 'floor'} {bounded}"
    launch = max(0, bounded - have)
    why += f"; {seen.live} live, {seen.booting} booting: launch {launch}"
    return Decision(bounded, launch, why)


class WorkerRegistry:
    """When each worker was last heard from (any request it made to the balancer)."""

    def __init__(self, clock):
        self.clock = clock
        self._last_seen = {}
        self._lock = threading.Lock()

    def seen(self, worker_id):
        with self._lock:
            self._last_seen[worker_id] = self.clock()

    def last_seen(self, worker_id):
        with self._lock:
            return self._last_seen.get(worker_id)

    def forget(self, worker_id):
        with self._lock:
            self._last_seen.pop(worker_id, None)


class Scaler:
    """Applies `decide` to a fleet, one tick at a time."""

    # Backoff after the fleet refuses a launch: doubling from BACKOFF_FIRST to BACKOFF_MAX seconds.
    BACKOFF_FIRST = 1.0
    BACKOFF_MAX = 60.0

    def __init__(self, store, fleet, settings, registry, clock=time.time):
        self.store = store
        self.fleet = fleet
        self.settings = settings
        self.registry = registry
        self.clock = clock
        self.known = None  # worker ids seen at the last tick; None before the first
        self.live = 0
        self.booting = 0
        self.decisions = []  # the latest decisions, newest last: (time, Decision)
        self.launch_error = None
        self.launches_total = 0
        self.terminations_total = 0
        self._retry_at = 0.0
        self._backoff = 0.0

    def tick(self):
        now = self.clock()
        self.store.requeue_expired()
        members = {member.id: member for member in self.fleet.members()}
        if self.known is not None:
            for gone in self.known - members.keys():
                self._forget(gone, "its worker stopped")
        live = booting = 0
        for member in members.values():
            last_seen = self.registry.last_seen(member.id)
            if last_seen is None and now - member.launched_at > self.settings.worker_boot_timeout:
                self._terminate(member.id, f"it did not report in within {self.settings.worker_boot_timeout:g} s")
                del members[member.id]
            elif last_seen is not None and now - last_seen > self.settings.worker_lost_timeout:
                self._terminate(member.id, f"it was silent for {self.settings.worker_lost_timeout:g} s")
                del members[member.id]
            elif last_seen is None:
                booting += 1
            else:
                live += 1
        counts = self.store.counts()
        seen = Observation(
            queued=counts["queued"], running=counts["running"],
            oldest_wait=self.store.oldest_queued_age() if counts["queued"] else 0.0,
            mean_job_seconds=self.store.mean_duration(), live=live, booting=booting,
        )
        decision = decide(seen, min_workers=self.settings.min_workers,
                          max_workers=self.settings.max_workers,
                          target_wait=self.settings.target_wait_seconds)
        launched = self._launch(decision.launch, now, members)
        self.known = set(members)
        self.live, self.booting = live, booting + launched
        if decision.launch or not self.decisions or self.decisions[-1][1].wanted != decision.wanted:
            self.decisions = (self.decisions + [(now, decision)])[-20:]
            if decision.launch:
                logs.event("scale", wanted=decision.wanted, launch=decision.launch, reason=decision.reason)
        return decision

    def _launch(self, count, now, members):
        launched = 0
        if count and now < self._retry_at:
            return 0
        for _ in range(count):
            try:
                member = self.fleet.launch()
            except FleetError as error:
                self._backoff = min(self.BACKOFF_MAX, max(self.BACKOFF_FIRST, self._backoff * 2))
                self._retry_at = now + self._backoff * random.uniform(0.5, 1.0)
                self.launch_error = f"{error} (retrying in {self._retry_at - now:.1f} s)"
                logs.event("launch_failed", error=str(error), retry_in=round(self._retry_at - now, 1))
                break
            members[member.id] = member
            launched += 1
            self.launches_total += 1
            self._backoff = 0.0
            self.launch_error = None
            logs.event("worker_launched", worker=member.id, fleet=self.fleet.name)
        return launched

    def _terminate(self, worker_id, reason):
        logs.event("worker_terminated", worker=worker_id, reason=reason)
        self.fleet.terminate(worker_id)
        self.terminations_total += 1
        self._forget(worker_id, reason)

    def _forget(self, worker_id, reason):
        requeued = self.store.requeue_worker(worker_id, reason)
        if requeued:
            logs.event("jobs_requeued", worker=worker_id, jobs=requeued, reason=reason)
        self.registry.forget(worker_id)

    def run(self, stopping):
        """Tick every `scaler_interval` seconds until the `stopping` event is set."""
        while not stopping.is_set():
            try:
                self.tick()
            except Exception as error:  # the scaler must outlive any single bad tick
                logs.event("scaler_error", error=repr(error))
            stopping.wait(self.settings.scaler_interval)
