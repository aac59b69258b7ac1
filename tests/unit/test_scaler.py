"""The scaling policy (a pure function) and the scaler loop over a fake fleet and a real store."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unit_support import FakeClock
from dynamic_workload.config import Settings
from dynamic_workload.fleets import Fleet, FleetError, Member
from dynamic_workload.scaler import JOB_OVERHEAD_SECONDS, Decision, Observation, Scaler, WorkerRegistry, decide
from dynamic_workload.store import Store


ITERATIONS = 1000  # per job, in the observations below


def seen(queued=0, running=0, oldest_wait=0.0, mean=None, live=0, booting=0):
    """An observation where each job holds `mean` seconds of hashing (None: none timed yet)."""
    return Observation(queued=queued, running=running, oldest_wait=oldest_wait,
                       backlog_iterations=(queued + running) * ITERATIONS,
                       seconds_per_iteration=None if mean is None else mean / ITERATIONS,
                       live=live, booting=booting)


def policy(observation, min_workers=0, max_workers=10, target_wait=5.0):
    return decide(observation, min_workers=min_workers, max_workers=max_workers, target_wait=target_wait)


# --- decide ---------------------------------------------------------------------------------


@pytest.mark.parametrize("min_workers", [0, 2])
def test_an_empty_queue_wants_the_minimum(min_workers):
    decision = policy(seen(), min_workers=min_workers)
    assert decision == Decision(min_workers, min_workers, decision.reason)
    assert policy(seen(live=min_workers), min_workers=min_workers).launch == 0


def test_an_empty_queue_never_kills_extra_workers():
    decision = policy(seen(live=5), min_workers=1)
    assert decision.wanted == 1 and decision.launch == 0


def test_without_a_timed_job_every_job_gets_a_worker_up_to_the_cap():
    assert policy(seen(queued=3)).launch == 3
    assert policy(seen(queued=2, running=1)).wanted == 3
    decision = policy(seen(queued=25), max_workers=4)
    assert decision.wanted == 4 and decision.launch == 4


@pytest.mark.parametrize("queued, running, mean, target, expected", [
    (12, 0, 1.0, 5.0, 3),    # 12 s of work, a worker does 5 s of it in the target wait
    (9, 0, 1.0, 5.0, 2),
    (7, 3, 0.4, 5.0, 1),     # 10 jobs of 0.4 s: one worker clears them in 5 s
    (11, 0, 0.5, 5.0, 2),
    (4, 0, 10.0, 5.0, 4),    # jobs longer than the target: one worker per job at most
    (9, 0, 2.5, 5.0, 5),
])
def test_with_a_known_speed_the_backlog_is_shared_within_the_target_wait(queued, running, mean, target, expected):
    work = (queued + running) * (mean + JOB_OVERHEAD_SECONDS)
    assert expected == min(queued + running, math.ceil(work / target))
    decision = policy(seen(queued=queued, running=running, mean=mean), target_wait=target)
    assert decision.wanted == expected
    assert decision.launch == expected


def test_the_backlog_is_weighed_in_iterations_not_in_jobs():
    # One job of 10 s of hashing among 9 tiny ones wants 2 workers for a 5 s target, where
    # counting jobs alone (mean 1 s) would want the same as ten 1 s jobs.
    observation = Observation(queued=10, running=0, oldest_wait=0.0,
                              backlog_iterations=10_000_000 + 9 * 10, seconds_per_iteration=1e-6,
                              live=0, booting=0)
    assert policy(observation, target_wait=5.0).wanted == 3  # 10.02 s of work / 5 s
    small = Observation(queued=10, running=0, oldest_wait=0.0, backlog_iterations=100,
                        seconds_per_iteration=1e-6, live=0, booting=0)
    assert policy(small, target_wait=5.0).wanted == 1


def test_an_old_job_adds_one_worker_over_those_at_hand():
    # The estimate says 1 worker suffices and 2 are live, but the oldest job waited too long.
    decision = policy(seen(queued=2, oldest_wait=9.0, mean=0.1, live=2), target_wait=5.0)
    assert decision.wanted == 3 and decision.launch == 1
    assert "9.0" in decision.reason
    # Not yet past the target: no extra worker.
    assert policy(seen(queued=2, oldest_wait=4.0, mean=0.1, live=2), target_wait=5.0).launch == 0


def test_the_old_job_rule_respects_the_cap():
    decision = policy(seen(queued=2, oldest_wait=60.0, mean=0.1, live=3), max_workers=3)
    assert decision.wanted == 3 and decision.launch == 0


def test_booting_workers_count_as_capacity():
    assert policy(seen(queued=3, booting=3)).launch == 0
    assert policy(seen(queued=3, booting=1, live=1)).launch == 1
    assert policy(seen(queued=12, mean=1.0, booting=3)).launch == 0


def test_an_old_job_waits_for_the_worker_booting_for_it():
    # The scaler module promises that a slow boot never triggers a second launch for the same need.
    assert policy(seen(queued=1, oldest_wait=9.0, booting=1), target_wait=5.0).launch == 0


@settings(max_examples=400, deadline=None)
@given(queued=st.integers(0, 200), running=st.integers(0, 50), oldest=st.floats(0, 1000),
       mean=st.none() | st.floats(0.001, 600), live=st.integers(0, 12), booting=st.integers(0, 12),
       bounds=st.tuples(st.integers(0, 6), st.integers(0, 10)).filter(lambda b: b[0] <= b[1]),
       target=st.floats(0.1, 120))
def test_never_above_max_never_below_min(queued, running, oldest, mean, live, booting, bounds, target):
    min_workers, max_workers = bounds
    decision = policy(seen(queued=queued, running=running, oldest_wait=oldest, mean=mean, live=live,
                           booting=booting), min_workers=min_workers, max_workers=max_workers, target_wait=target)
    assert min_workers <= decision.wanted <= max_workers
    assert decision.launch == max(0, decision.wanted - live - booting)
    if live + booting >= max_workers:
        assert decision.launch == 0
    if queued + running == 0:
        assert decision.wanted == min_workers


def test_the_reason_gives_the_numbers():
    reason = policy(seen(queued=17, running=2, mean=1.5, live=1, booting=2), max_workers=4, target_wait=6.0).reason
    for number in ("17", "2 running", "28.5 s of work", "6", "4", "1 live", "2 booting", "launch 1"):
        assert number in reason, (number, reason)
    assert "cap 4" in reason
    assert "floor 2" in policy(seen(), min_workers=2).reason


# --- the loop ------------------------------------------------------------------------------


class FakeFleet(Fleet):
    """Implements the Fleet interface in memory and records what the scaler asked of it."""

    name = "fake"

    def __init__(self, clock):
        self.clock = clock
        self.running = {}
        self.launches = []
        self.launch_attempts = 0
        self.terminations = []
        self.failing = False
        self.members_error = None
        self.calls = 0  # every call of the Fleet interface
        self._ids = itertools.count(1)

    def members(self):
        self.calls += 1
        if self.members_error:
            raise self.members_error
        return list(self.running.values())

    def launch(self):
        self.calls += 1
        self.launch_attempts += 1
        if self.failing:
            raise FleetError("InsufficientInstanceCapacity: no capacity in us-east-1a")
        member = Member(f"w{next(self._ids)}", self.clock())
        self.running[member.id] = member
        self.launches.append(member.id)
        return member

    def terminate(self, worker_id):
        self.calls += 1
        self.terminations.append(worker_id)
        self.running.pop(worker_id, None)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock):
    store = Store(tmp_path / "jobs.db", max_attempts=5, clock=clock)
    yield store
    store.close()


@pytest.fixture
def fleet(clock):
    return FakeFleet(clock)


@pytest.fixture
def registry(clock):
    return WorkerRegistry(clock)


SETTINGS = dict(min_workers=0, max_workers=3, worker_boot_timeout=30.0, worker_lost_timeout=60.0,
                target_wait_seconds=5.0, lease_seconds=30.0)


@pytest.fixture
def make_scaler(store, fleet, registry, clock):
    def make(**overrides):
        return Scaler(store, fleet, Settings(**{**SETTINGS, **overrides}), registry, clock)

    return make


def enqueue(store, count, prefix="job"):
    for i in range(count):
        store.enqueue(f"{prefix}{i}", 1, b"data")


def test_an_empty_queue_launches_nothing(make_scaler, fleet):
    scaler = make_scaler()
    for _ in range(3):
        assert scaler.tick().launch == 0
    assert fleet.launch_attempts == 0
    assert (scaler.live, scaler.booting) == (0, 0)


def test_min_workers_are_kept_running(make_scaler, fleet):
    scaler = make_scaler(min_workers=2)
    scaler.tick()
    assert len(fleet.launches) == 2
    scaler.tick()
    assert len(fleet.launches) == 2


def test_a_backlog_launches_up_to_the_cap_and_never_beyond(make_scaler, store, fleet, registry, clock):
    scaler = make_scaler(max_workers=3)
    enqueue(store, 10)
    decision = scaler.tick()
    assert decision.launch == 3 and len(fleet.launches) == 3
    assert (scaler.live, scaler.booting) == (0, 3)
    for _ in range(5):  # still booting, within the boot timeout: no second launch for the same need
        clock.advance(2)
        scaler.tick()
    assert len(fleet.launches) == 3
    for worker_id in fleet.running:
        registry.seen(worker_id)
    for _ in range(5):
        clock.advance(2)
        for worker_id in fleet.running:
            registry.seen(worker_id)
        scaler.tick()
    assert len(fleet.launches) == 3 and fleet.terminations == []
    assert (scaler.live, scaler.booting) == (3, 0)
    assert scaler.launches_total == 3


def test_a_slow_boot_does_not_launch_more_workers_for_one_job(make_scaler, store, fleet, clock):
    scaler = make_scaler(max_workers=5, worker_boot_timeout=60.0, target_wait_seconds=5.0)
    enqueue(store, 1)
    scaler.tick()
    for _ in range(40):  # 20 s of ticks, 0.5 s apart, while the one worker still boots (an EC2 boot)
        clock.advance(0.5)
        scaler.tick()
    assert len(fleet.launches) == 1, f"{len(fleet.launches)} workers launched for one job"


def test_a_worker_that_never_reports_in_is_terminated_after_the_boot_timeout(
        make_scaler, store, fleet, registry, clock):
    scaler = make_scaler(max_workers=1, worker_boot_timeout=30.0)
    enqueue(store, 1)
    scaler.tick()
    [stuck] = fleet.launches
    # A lease in its name (say its report-in was lost): the job must come back when it goes.
    assert [j["id"] for j in store.lease(stuck, 300.0)] == ["job0"]
    clock.advance(29)
    scaler.tick()
    assert fleet.terminations == []
    clock.advance(2)
    decision = scaler.tick()
    assert fleet.terminations == [stuck]
    assert store.get("job0")["status"] == "queued"
    assert "did not report in" in store.get("job0")["error"]
    # The job still needs a worker: a replacement is launched in the same tick.
    assert decision.launch == 1
    assert len(fleet.launches) == 2 and stuck not in fleet.running
    assert scaler.terminations_total == 1


def test_a_worker_adopted_after_a_restart_gets_a_full_boot_timeout(store, fleet, registry, clock):
    # Launched long ago by the balancer before this one; it has not reported in to this one yet.
    old = Member("w-old", clock() - 1000)
    fleet.running[old.id] = old
    scaler = Scaler(store, fleet, Settings(**SETTINGS), registry, clock)
    scaler.tick()
    assert fleet.terminations == [] and scaler.booting == 1
    clock.advance(SETTINGS["worker_boot_timeout"] - 1)
    scaler.tick()
    assert fleet.terminations == []
    registry.seen(old.id)
    clock.advance(2)
    scaler.tick()
    assert fleet.terminations == [] and scaler.live == 1


def test_an_adopted_worker_that_never_reports_in_is_terminated(store, fleet, registry, clock):
    old = Member("w-old", clock() - 1000)
    fleet.running[old.id] = old
    scaler = Scaler(store, fleet, Settings(**SETTINGS), registry, clock)
    scaler.tick()
    clock.advance(SETTINGS["worker_boot_timeout"] + 1)
    scaler.tick()
    assert fleet.terminations == [old.id]


def test_a_silent_worker_is_terminated_after_the_lost_timeout(make_scaler, store, fleet, registry, clock):
    scaler = make_scaler(max_workers=1, worker_lost_timeout=60.0)
    enqueue(store, 1)
    scaler.tick()
    [worker] = fleet.launches
    registry.seen(worker)
    store.lease(worker, 300.0)
    clock.advance(59)
    scaler.tick()
    assert fleet.terminations == [] and scaler.live == 1
    clock.advance(2)
    scaler.tick()
    assert fleet.terminations == [worker]
    assert store.get("job0")["status"] == "queued"
    assert registry.last_seen(worker) is None


def test_a_worker_that_disappears_has_its_jobs_requeued_at_once(make_scaler, store, fleet, registry, clock):
    scaler = make_scaler(max_workers=2)
    enqueue(store, 2)
    scaler.tick()
    first, second = fleet.launches
    for worker_id in (first, second):
        registry.seen(worker_id)
        store.lease(worker_id, 300.0)
    scaler.tick()
    del fleet.running[first]  # it crashed, or ended itself
    clock.advance(1)  # long before its lease expires
    scaler.tick()
    assert store.get("job0")["status"] == "queued"
    assert "stopped" in store.get("job0")["error"]
    assert store.get("job1")["status"] == "running"
    assert fleet.terminations == []
    assert registry.last_seen(first) is None


def test_a_refused_launch_backs_off_then_recovers(make_scaler, store, fleet, clock):
    scaler = make_scaler(max_workers=2)
    enqueue(store, 2)
    fleet.failing = True
    scaler.tick()
    assert fleet.launch_attempts == 1  # the first refusal stops this tick's launches
    assert "InsufficientInstanceCapacity" in scaler.fleet_error
    calls = fleet.calls
    for _ in range(4):  # within the first backoff (at least BACKOFF_FIRST / 2): the fleet is left alone
        clock.advance(Scaler.BACKOFF_FIRST / 10)
        scaler.tick()
    assert fleet.calls == calls and fleet.launch_attempts == 1
    assert "retrying in" in scaler.fleet_error
    clock.advance(Scaler.BACKOFF_FIRST)
    scaler.tick()
    assert fleet.launch_attempts == 2  # retried, refused again: the backoff doubles
    clock.advance(Scaler.BACKOFF_FIRST * 2 * 0.5 - 0.01)
    scaler.tick()
    assert fleet.launch_attempts == 2
    fleet.failing = False
    clock.advance(Scaler.BACKOFF_FIRST * 2)
    scaler.tick()
    assert len(fleet.launches) == 2
    assert scaler.fleet_error is None
    assert scaler.booting == 2
    assert scaler.fleet_errors_total == 2


def test_the_backoff_grows_to_its_cap(make_scaler, store, fleet, clock):
    scaler = make_scaler()
    enqueue(store, 1)
    fleet.failing = True
    gaps, last = [], None
    while len(gaps) < 10:  # tick every 0.25 s; note when each launch attempt happens
        attempts = fleet.launch_attempts
        scaler.tick()
        if fleet.launch_attempts != attempts:
            if last is not None:
                gaps.append(clock() - last)
            last = clock()
        clock.advance(0.25)
    for gap, backoff in zip(gaps, [1, 2, 4, 8, 16, 32, 60, 60, 60]):
        assert backoff * 0.5 <= gap <= min(backoff, Scaler.BACKOFF_MAX) + 0.25
    assert max(gaps) <= Scaler.BACKOFF_MAX + 0.25


def test_a_failing_fleet_api_backs_off_too(make_scaler, store, fleet, clock):
    scaler = make_scaler()
    enqueue(store, 1)
    fleet.members_error = FleetError("RequestLimitExceeded: slow down")
    assert scaler.tick() is None
    assert "RequestLimitExceeded" in scaler.fleet_error
    calls = fleet.calls
    clock.advance(Scaler.BACKOFF_FIRST * 0.4)
    scaler.tick()
    assert fleet.calls == calls
    fleet.members_error = None
    clock.advance(Scaler.BACKOFF_FIRST)
    assert scaler.tick().launch == 1
    assert scaler.fleet_error is None


def test_a_refused_launch_keeps_the_workers_already_launched_in_that_tick(make_scaler, store, fleet):
    class FailsSecond(FakeFleet):
        def launch(self):
            if self.launch_attempts == 1:
                self.launch_attempts += 1
                raise FleetError("quota reached")
            return super().launch()

    failing = FailsSecond(fleet.clock)
    scaler = Scaler(store, failing, Settings(**{**SETTINGS, "max_workers": 3}), WorkerRegistry(fleet.clock),
                    fleet.clock)
    enqueue(store, 3)
    scaler.tick()
    assert len(failing.launches) == 1
    assert scaler.booting == 1
    assert "quota reached" in scaler.fleet_error


def test_decisions_are_kept_for_the_status_page(make_scaler, store, clock):
    scaler = make_scaler()
    scaler.tick()
    enqueue(store, 2)
    clock.advance(1)
    scaler.tick()
    times = [t for t, _ in scaler.decisions]
    assert times == sorted(times)
    assert scaler.decisions[-1][1].launch == 2
    assert "queue 2 jobs" in scaler.decisions[-1][1].reason
