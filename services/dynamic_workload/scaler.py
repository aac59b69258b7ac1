"""The scaling policy, and the loop that applies it to a fleet once per tick.

The policy (``decide``) is a pure function of what the balancer observes, so it is tested
without processes or clocks. It combines two rules:

- AWS's "acceptable backlog per instance", with the backlog measured in seconds of work
  rather than in jobs (jobs differ a millionfold in iterations): the queued and running
  jobs hold ``backlog_iterations``; the measured compute time per iteration (over the last
  50 jobs) plus a small per-job overhead turns that into seconds of work, and one worker
  clears ``target_wait`` seconds of it within the target wait, so the backlog needs
  ``ceil(work / target_wait)`` workers. Before any job is timed, every job is assumed to
  need a worker of its own (bounded by the cap).
- The seed's rule: when the oldest queued job has waited longer than the target, the
  workers at hand are not enough whatever the estimate says: add one.

Booting workers count as capacity, so a slow boot never triggers a second launch for the
same need. The count stays within ``[min_workers, max_workers]``. Workers beyond the need
are never killed: they end themselves after ``worker_idle_timeout`` seconds without work.

The loop (``Scaler.tick``) also keeps the fleet honest: it terminates workers that never
reported in within ``worker_boot_timeout`` or went silent for ``worker_lost_timeout``, and
returns the jobs of every worker that is gone to the queue at once. When the fleet's API
fails, the scaler leaves it alone for an exponentially growing, jittered while.
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
    backlog_iterations: int
    seconds_per_iteration: float | None
    live: int
    booting: int


@dataclasses.dataclass(frozen=True)
class Decision:
    wanted: int
    launch: int
    reason: str


# A job costs a worker this much beyond its hashing: the lease and result round trips.
JOB_OVERHEAD_SECONDS = 0.002


def decide(seen: Observation, *, min_workers, max_workers, target_wait):
    """How many workers the backlog wants, and how many to launch now."""
    backlog = seen.queued + seen.running
    have = seen.live + seen.booting
    if seen.seconds_per_iteration:
        work = seen.backlog_iterations * seen.seconds_per_iteration + backlog * JOB_OVERHEAD_SECONDS
        # A job runs on one worker: more workers than jobs would idle.
        wanted = min(backlog, math.ceil(work / target_wait))
        estimate = f"{work:.3g} s of work at {seen.seconds_per_iteration:.3g} s/iteration"
    else:
        wanted = backlog
        estimate = "no job timed yet: a worker per job"
    why = f"queue {seen.queued} jobs ({seen.running} running), {estimate}, target wait {target_wait:g} s"
    # Only while nothing boots: a booting worker is the answer to the wait already.
    if seen.queued and seen.oldest_wait > target_wait and wanted <= have and not seen.booting:
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
        # Workers adopted after a restart get a full boot timeout from now to report in again.
        self.started_at = clock()
        self.live = 0
        self.booting = 0
        self.decisions = []  # the latest decisions, newest last: (time, Decision)
        self.fleet_error = None
        self.fleet_errors_total = 0
        self.seconds_per_iteration = None  # as measured at the last tick
        # Ticks by outcome: launched workers, held (enough workers), backed off (fleet errors).
        self.ticks = {"launch": 0, "hold": 0, "backoff": 0}
        self.launches_total = 0
        self.terminations_total = 0
        self._retry_at = 0.0
        self._backoff = 0.0

    def tick(self):
        """One round: requeue expired leases, check the fleet, launch what the policy wants.

        Returns the Decision, or None when the fleet is left alone (backing off after an error).
        """
        now = self.clock()
        self.store.requeue_expired()
        if now < self._retry_at:
            self.ticks["backoff"] += 1
            return None
        try:
            decision = self._tick_fleet(now)
        except FleetError as error:
            # Throttling, capacity, quota, a timeout: back off exponentially, with jitter so
            # that many balancers don't retry in step; never crash, never storm.
            self._backoff = min(self.BACKOFF_MAX, max(self.BACKOFF_FIRST, self._backoff * 2))
            delay = self._backoff * random.uniform(0.5, 1.0)
            self._retry_at = now + delay
            self.fleet_error = f"{error} (retrying in {delay:.1f} s)"
            self.fleet_errors_total += 1
            logs.event("fleet_error", error=str(error), code=error.code, retry_in=round(delay, 1))
            self.ticks["backoff"] += 1
            return None
        self._backoff = 0.0
        self.fleet_error = None
        self.ticks["launch" if decision.launch else "hold"] += 1
        return decision

    def _tick_fleet(self, now):
        members = {member.id: member for member in self.fleet.members()}
        if self.known is not None:
            for gone in self.known - members.keys():
                self._forget(gone, "its worker stopped")
        self.known = set(members)
        live = booting = 0
        for member in list(members.values()):
            last_seen = self.registry.last_seen(member.id)
            waiting_since = max(member.launched_at, self.started_at)
            if last_seen is None and now - waiting_since > self.settings.worker_boot_timeout:
                self._terminate(member.id, f"it did not report in within {self.settings.worker_boot_timeout:g} s")
            elif last_seen is not None and now - last_seen > self.settings.worker_lost_timeout:
                self._terminate(member.id, f"it was silent for {self.settings.worker_lost_timeout:g} s")
            elif last_seen is None:
                booting += 1
            else:
                live += 1
        self.live, self.booting = live, booting
        counts = self.store.counts()
        seen = Observation(
            queued=counts["queued"], running=counts["running"],
            oldest_wait=self.store.oldest_queued_age() if counts["queued"] else 0.0,
            backlog_iterations=counts["backlog_iterations"],
            seconds_per_iteration=self.store.seconds_per_iteration(), live=live, booting=booting,
        )
        self.seconds_per_iteration = seen.seconds_per_iteration
        decision = decide(seen, min_workers=self.settings.min_workers,
                          max_workers=self.settings.max_workers,
                          target_wait=self.settings.target_wait_seconds)
        if decision.launch or not self.decisions or self.decisions[-1][1].wanted != decision.wanted:
            self.decisions = (self.decisions + [(now, decision)])[-20:]
            if decision.launch:
                logs.event("scale", wanted=decision.wanted, launch=decision.launch, reason=decision.reason)
        for _ in range(decision.launch):
            member = self.fleet.launch()
            self.known.add(member.id)
            self.booting += 1
            self.launches_total += 1
            logs.event("worker_launched", worker=member.id, fleet=self.fleet.name)
        return decision

    def _terminate(self, worker_id, reason):
        logs.event("worker_terminated", worker=worker_id, reason=reason)
        self.fleet.terminate(worker_id)
        self.known.discard(worker_id)
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
