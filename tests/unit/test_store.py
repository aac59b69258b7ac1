"""The durable queue: a real SQLite file in tmp_path, time from a fake clock."""

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from unit_support import SERVICES, FakeClock
from dynamic_workload.store import STATES, QueueFull, Store, StoreUnavailable, UnknownJob

LEASE = 30.0


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "jobs.db"


@pytest.fixture
def open_store(db_path, clock):
    """Opens stores on the test's database file; every one still open is closed at the end."""
    opened = []

    def open_(**options):
        store = Store(db_path, clock=clock, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        if store._thread.is_alive():
            store.close()


@pytest.fixture
def store(open_store):
    return open_store(max_queued=100, max_attempts=3)


def fresh_counts(path):
    """Jobs per state (and in all) as a separate connection reads them from the file."""
    conn = sqlite3.connect(str(path))
    try:
        counts = dict.fromkeys(STATES, 0)
        counts.update(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        counts["enqueued"] = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        counts["backlog_iterations"] = conn.execute(
            "SELECT COALESCE(SUM(iterations), 0) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]
        return counts
    finally:
        conn.close()


def rows_with_id(path, job_id):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("SELECT COUNT(*) FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    finally:
        conn.close()


# --- enqueue -------------------------------------------------------------------------------


def test_enqueue_is_idempotent_per_id(store, db_path):
    assert store.enqueue("job-1", 7, b"first") is True
    assert store.enqueue("job-1", 9, b"second") is False
    assert rows_with_id(db_path, "job-1") == 1
    job = store.get("job-1")
    assert job["status"] == "queued"
    assert job["iterations"] == 7 and job["size"] == len(b"first")
    [leased] = store.lease("w1", LEASE)
    assert leased["data"] == b"first"
    assert store.counts() == fresh_counts(db_path) == {
        "queued": 0, "running": 1, "completed": 0, "failed": 0, "enqueued": 1, "backlog_iterations": 7}


def test_a_full_queue_refuses_new_jobs_but_not_a_repeated_one(open_store, db_path):
    store = open_store(max_queued=3)
    for i in range(3):
        assert store.enqueue(f"j{i}", 1, b"x") is True
    with pytest.raises(QueueFull):
        store.enqueue("j3", 1, b"x")
    # A retried enqueue of a job already stored is answered as stored, full queue or not.
    assert store.enqueue("j0", 1, b"x") is False
    assert rows_with_id(db_path, "j3") == 0
    assert store.counts()["queued"] == 3
    store.lease("w1", LEASE)
    assert store.enqueue("j3", 1, b"x") is True
    assert store.counts() == fresh_counts(db_path)


# --- lease ---------------------------------------------------------------------------------


def test_lease_hands_out_the_oldest_jobs_first_up_to_max_jobs(store, clock):
    start = clock()
    for name in ("a", "b", "c", "d"):
        store.enqueue(name, 3, name.encode())
        clock.advance(1)
    first = store.lease("w1", LEASE, max_jobs=2)
    assert [job["id"] for job in first] == ["a", "b"]
    assert first[0] == {"id": "a", "iterations": 3, "attempt": 1, "data": b"a", "waited": clock() - start}
    assert first[1]["waited"] == clock() - (start + 1)
    assert [job["id"] for job in store.lease("w2", LEASE, max_jobs=10)] == ["c", "d"]
    assert store.lease("w3", LEASE, max_jobs=10) == []
    assert store.get("a")["status"] == "running"
    assert store.counts()["running"] == 4


def test_lease_returns_the_data_bytes_exactly(store):
    payloads = {"all-bytes": bytes(range(256)) * 4, "random": os.urandom(1 << 20), "nul": b"\x00"}
    for job_id, data in payloads.items():
        store.enqueue(job_id, 1, data)
    leased = store.lease("w1", LEASE, max_jobs=10)
    assert {job["id"]: job["data"] for job in leased} == payloads
    assert all(isinstance(job["data"], bytes) for job in leased)


# --- heartbeat and expiry ------------------------------------------------------------------


def test_heartbeat_extends_the_lease_and_reports_only_held_jobs(store, clock, db_path):
    store.enqueue("mine", 1, b"x")
    store.enqueue("theirs", 1, b"y")
    store.enqueue("waiting", 1, b"z")
    store.lease("w1", LEASE)
    store.lease("w2", LEASE)
    clock.advance(20)
    assert store.heartbeat("w1", ["mine", "theirs", "waiting", "unknown"], LEASE) == ["mine"]
    clock.advance(LEASE - 20 + 5)  # past the first lease's expiry, within the extended one
    assert store.requeue_expired() == 1  # only w2's job, which nobody extended
    assert store.get("mine")["status"] == "running"
    assert store.get("theirs")["status"] == "queued"
    clock.advance(LEASE)
    assert store.requeue_expired() == 1
    assert store.get("mine")["status"] == "queued"
    assert store.counts() == fresh_counts(db_path)


def test_a_heartbeat_from_another_worker_does_not_extend_the_lease(store, clock):
    store.enqueue("job", 1, b"x")
    store.lease("w1", LEASE)
    clock.advance(LEASE - 1)
    assert store.heartbeat("w2", ["job"], LEASE) == []
    clock.advance(2)
    assert store.requeue_expired() == 1


def test_expired_jobs_are_requeued_then_failed_after_max_attempts(open_store, clock, db_path):
    store = open_store(max_attempts=2)
    store.enqueue("job", 1, b"x")
    assert store.requeue_expired() == 0
    assert [j["attempt"] for j in store.lease("w1", LEASE)] == [1]
    clock.advance(LEASE)
    assert store.requeue_expired() == 0  # expires strictly after lease_seconds
    clock.advance(0.5)
    assert store.requeue_expired() == 1
    job = store.get("job")
    assert job["status"] == "queued" and job["attempts"] == 1
    assert "lease expired" in job["error"]

    assert [j["attempt"] for j in store.lease("w2", LEASE)] == [2]
    clock.advance(LEASE + 1)
    assert store.requeue_expired() == 0
    job = store.get("job")
    assert job["status"] == "failed"
    assert "2 attempts" in job["error"] and "lease expired" in job["error"]
    assert store.lease("w3", LEASE) == []
    assert store.counts() == fresh_counts(db_path) == {
        "queued": 0, "running": 0, "completed": 0, "failed": 1, "enqueued": 1, "backlog_iterations": 0}


# --- results -------------------------------------------------------------------------------


def test_a_result_is_recorded_once(store, db_path):
    store.enqueue("job", 1, b"x")
    store.lease("w1", LEASE)
    assert store.complete("job", "r" * 128, "w1", 0.25) is True
    assert store.complete("job", "s" * 128, "w1", 0.5) is False
    job = store.get("job")
    assert job["status"] == "completed" and job["result"] == "r" * 128 and job["duration"] == 0.25
    assert [c["id"] for c in store.completed(10)] == ["job"]
    assert store.counts() == fresh_counts(db_path)
    assert store.counts()["completed"] == 1


def test_a_late_result_after_the_lease_moved_is_recorded_once(store, clock, db_path):
    store.enqueue("job", 1, b"x")
    store.lease("slow", LEASE)
    clock.advance(LEASE + 1)
    store.requeue_expired()
    store.lease("fast", LEASE)
    assert store.complete("job", "a" * 128, "slow", 40.0) is True  # the first result wins
    assert store.complete("job", "b" * 128, "fast", 1.0) is False
    assert store.get("job")["result"] == "a" * 128
    assert store.heartbeat("fast", ["job"], LEASE) == []
    assert store.release("job", "fast") is False
    assert store.requeue_worker("fast", "its worker stopped") == 0
    clock.advance(LEASE + 1)
    assert store.requeue_expired() == 0
    assert store.get("job")["status"] == "completed"
    assert [c["id"] for c in store.completed(10)] == ["job"]
    assert store.counts() == fresh_counts(db_path) == {
        "queued": 0, "running": 0, "completed": 1, "failed": 0, "enqueued": 1, "backlog_iterations": 0}


def test_a_late_result_completes_a_job_that_had_failed(open_store, clock, db_path):
    store = open_store(max_attempts=1)
    store.enqueue("job", 1, b"x")
    store.lease("w1", LEASE)
    clock.advance(LEASE + 1)
    store.requeue_expired()
    assert store.get("job")["status"] == "failed"
    assert store.complete("job", "c" * 128, "w1") is True
    assert store.get("job")["status"] == "completed"
    assert store.counts() == fresh_counts(db_path)
    assert store.counts()["failed"] == 0


def test_completed_lists_newest_completion_first_and_does_not_consume(store, clock):
    for name in ("first", "second", "third"):
        store.enqueue(name, 1, name.encode())
    store.lease("w1", LEASE, max_jobs=3)
    for name in ("second", "third", "first"):  # completion order differs from enqueue order
        clock.advance(1)
        store.complete(name, name[0] * 128, "w1", 0.5)
    top = store.completed(10)
    assert [c["id"] for c in top] == ["first", "third", "second"]
    assert top[0]["result"] == "f" * 128
    assert top[0]["completed_at"] == clock()
    assert [c["id"] for c in store.completed(2)] == ["first", "third"]
    assert store.completed(10) == top  # reading again returns the same items
    store.enqueue("fourth", 1, b"4")
    store.lease("w1", LEASE)
    store.complete("fourth", "4" * 128, "w1")
    assert [c["id"] for c in store.completed(10)] == ["fourth", "first", "third", "second"]


def test_release_requeues_without_using_an_attempt(open_store, db_path):
    store = open_store(max_attempts=1)
    store.enqueue("job", 1, b"x")
    for _ in range(3):  # with one attempt allowed, a counted release would fail the job
        [job] = store.lease("w1", LEASE)
        assert job["attempt"] == 1
        assert store.release("job", "w2") is False  # not the holder
        assert store.release("job", "w1") is True
        assert store.get("job")["status"] == "queued"
        assert store.get("job")["attempts"] == 0
    assert store.release("job", "w1") is False  # queued: nothing to release
    assert store.counts() == fresh_counts(db_path)


def test_requeue_worker_returns_only_that_workers_jobs(store, db_path):
    for name in ("a", "b", "c"):
        store.enqueue(name, 1, b"x")
    store.lease("gone", LEASE, max_jobs=2)
    store.lease("alive", LEASE)
    assert store.requeue_worker("gone", "its worker stopped") == 2
    assert store.get("a")["status"] == store.get("b")["status"] == "queued"
    assert "its worker stopped" in store.get("a")["error"]
    assert store.get("c")["status"] == "running"
    assert store.requeue_worker("gone", "again") == 0
    assert [j["id"] for j in store.lease("other", LEASE, max_jobs=5)] == ["a", "b"]
    assert store.counts() == fresh_counts(db_path)


def test_unknown_ids(store):
    with pytest.raises(UnknownJob):
        store.get("nope")
    with pytest.raises(UnknownJob):
        store.complete("nope", "a" * 128, "w1")
    assert store.heartbeat("w1", ["nope"], LEASE) == []
    assert store.release("nope", "w1") is False
    assert store.counts()["enqueued"] == 0


def test_oldest_queued_age_and_the_measured_speed(store, clock):
    assert store.oldest_queued_age() == 0.0
    assert store.seconds_per_iteration() is None and store.recent_durations() == []
    store.enqueue("a", 1, b"x")
    clock.advance(3)
    store.enqueue("b", 1, b"y")
    clock.advance(4)
    assert store.oldest_queued_age() == 7.0
    store.lease("w1", LEASE, max_jobs=2)
    assert store.oldest_queued_age() == 0.0
    store.complete("a", "a" * 128, "w1", 1.0)
    store.complete("b", "b" * 128, "w1", 3.0)
    assert store.seconds_per_iteration() == 2.0  # 4 s of hashing over 2 iterations
    assert store.recent_durations() == [3.0, 1.0]  # newest first


# --- durability and concurrency ------------------------------------------------------------


def test_counts_and_jobs_survive_close_and_reopen(open_store, clock, db_path):
    store = open_store(max_attempts=1)
    for i in range(6):
        store.enqueue(f"j{i}", i + 1, f"data {i}".encode())
    store.lease("w1", LEASE, max_jobs=4)  # j0..j3 running
    store.complete("j0", "0" * 128, "w1", 1.0)
    store.complete("j1", "1" * 128, "w1", 1.0)
    clock.advance(LEASE + 1)
    store.heartbeat("w1", ["j2"], LEASE)
    store.requeue_expired()  # j3 fails (one attempt); j2 stays running
    before = store.counts()
    assert before == fresh_counts(db_path) == {
        "queued": 2, "running": 1, "completed": 2, "failed": 1, "enqueued": 6,
        "backlog_iterations": 3 + 5 + 6}
    store.close()

    reopened = open_store(max_attempts=1)
    assert reopened.counts() == before
    assert reopened.get("j1")["result"] == "1" * 128
    assert [c["id"] for c in reopened.completed(10)] == ["j1", "j0"]
    assert [(j["id"], j["data"]) for j in reopened.lease("w2", LEASE, max_jobs=5)] == [
        ("j4", b"data 4"), ("j5", b"data 5")]
    reopened.complete("j5", "5" * 128, "w2")
    assert [c["id"] for c in reopened.completed(10)] == ["j5", "j1", "j0"]  # newest first across restarts
    assert reopened.counts() == fresh_counts(db_path)


def test_concurrent_enqueues_all_land_and_are_readable_when_they_return(open_store, db_path):
    store = open_store(max_queued=10_000)
    threads_count, per_thread = 24, 10
    failures = []
    barrier = threading.Barrier(threads_count)

    def client(n):
        conn = sqlite3.connect(str(db_path))
        try:
            barrier.wait(timeout=10)
            for i in range(per_thread):
                job_id = f"t{n}-{i}"
                if store.enqueue(job_id, 1, job_id.encode()) is not True:
                    failures.append(f"{job_id}: not stored")
                # Acknowledged means committed: another connection sees it right away.
                row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row != ("queued",):
                    failures.append(f"{job_id}: {row!r} right after enqueue returned")
        except Exception as error:  # noqa: BLE001  (reported below, with the others)
            failures.append(repr(error))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    total = threads_count * per_thread
    assert store.counts() == fresh_counts(db_path) == {
        "queued": total, "running": 0, "completed": 0, "failed": 0, "enqueued": total,
        "backlog_iterations": total}


STORE_UNAVAILABLE_SCRIPT = r"""
import json, resource, signal, sys
sys.path.insert(0, sys.argv[1])
from dynamic_workload.store import Store, StoreUnavailable

store = Store(sys.argv[2], clock=lambda: 1000.0)
store.enqueue("before", 1, b"kept")
# Past this size every write fails (EFBIG), as on a full disk; root included.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
limit = 200_000 if hard == resource.RLIM_INFINITY else min(200_000, hard)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
outcomes = []
for size in (1_000_000, 8_000_000):  # committed at COMMIT, and spilled mid-operation
    try:
        store.enqueue(f"big-{size}", 1, b"y" * size)
        outcomes.append("stored")
    except StoreUnavailable as error:
        outcomes.append("unavailable: " + str(error))
    except BaseException as error:
        outcomes.append("other: " + repr(error))
during = store.counts()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
after = store.enqueue("after", 1, b"ok")
store.close()
print(json.dumps({"outcomes": outcomes, "during": during, "after": after}))
"""


def test_a_refused_write_raises_store_unavailable_and_changes_nothing(tmp_path, db_path, clock):
    script = tmp_path / "full_disk.py"
    script.write_text(STORE_UNAVAILABLE_SCRIPT)
    run = subprocess.run([sys.executable, str(script), SERVICES, str(db_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for outcome in report["outcomes"]:
        assert outcome.startswith("unavailable: "), outcome
    assert report["during"] == {"queued": 1, "running": 0, "completed": 0, "failed": 0, "enqueued": 1,
                                "backlog_iterations": 1}
    assert report["after"] is True  # the store works again once writes succeed

    store = Store(db_path, clock=clock)
    try:
        assert store.counts() == fresh_counts(db_path) == {
            "queued": 2, "running": 0, "completed": 0, "failed": 0, "enqueued": 2, "backlog_iterations": 2}
        for job_id in ("big-1000000", "big-8000000"):
            with pytest.raises(UnknownJob):
                store.get(job_id)
        assert [j["id"] for j in store.lease("w1", LEASE, max_jobs=5)] == ["before", "after"]
    finally:
        store.close()


# --- the counts bookkeeping, under random sequences of operations --------------------------


class StoreCounts(RuleBasedStateMachine):
    """counts() must always equal what a fresh COUNT(*) reads, whatever happens in between."""

    workers = st.sampled_from(["w1", "w2", "w3"])

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "jobs.db")
        self.clock = FakeClock()
        self.store = Store(self.path, max_queued=6, max_attempts=2, clock=self.clock)
        self.ids = []
        self.results = {}

    def teardown(self):
        self.store.close()
        self.dir.cleanup()

    @rule(job=st.integers(0, 9))
    def enqueue(self, job):
        job_id = f"job{job}"
        try:
            created = self.store.enqueue(job_id, 1, job_id.encode())
        except QueueFull:
            assert job_id not in self.ids
            return
        assert created == (job_id not in self.ids)
        if created:
            self.ids.append(job_id)

    @rule(worker=workers, count=st.integers(1, 3))
    def lease(self, worker, count):
        for job in self.store.lease(worker, LEASE, count):
            assert job["data"] == job["id"].encode()

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), worker=workers)
    def complete(self, data, worker):
        job_id = data.draw(st.sampled_from(self.ids))
        result = data.draw(st.sampled_from("0123456789abcdef")) * 128
        recorded = self.store.complete(job_id, result, worker, 1.0)
        assert recorded == (job_id not in self.results)
        self.results.setdefault(job_id, result)

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), worker=workers)
    def release(self, data, worker):
        self.store.release(data.draw(st.sampled_from(self.ids)), worker)

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), worker=workers)
    def heartbeat(self, data, worker):
        self.store.heartbeat(worker, [data.draw(st.sampled_from(self.ids))], LEASE)

    @rule(seconds=st.sampled_from([1.0, 20.0, LEASE + 1]))
    def expire(self, seconds):
        self.clock.advance(seconds)
        self.store.requeue_expired()

    @rule(worker=workers)
    def worker_gone(self, worker):
        self.store.requeue_worker(worker, "its worker stopped")

    @invariant()
    def counts_match_the_database(self):
        counts = self.store.counts()
        assert counts == fresh_counts(self.path)
        assert counts["enqueued"] == len(self.ids)

    @invariant()
    def results_never_change(self):
        for job_id, result in self.results.items():
            assert self.store.get(job_id)["result"] == result
        completed = [c["id"] for c in self.store.completed(1000)]
        assert sorted(completed) == sorted(self.results)


TestStoreCounts = StoreCounts.TestCase
TestStoreCounts.settings = settings(max_examples=20, stateful_step_count=25, deadline=None)


def test_a_write_after_close_is_refused_not_hung(db_path, clock):
    store = Store(db_path, clock=clock)
    store.close()
    with pytest.raises(StoreUnavailable):
        store.enqueue("late", 1, b"x")


def test_a_lease_takes_a_batch_within_the_iteration_budget_but_always_one(store):
    for n, iterations in enumerate([10, 20, 30, 5000, 10]):
        store.enqueue(f"j{n}", iterations, b"x")
    assert [j["id"] for j in store.lease("w1", LEASE, max_jobs=10, max_iterations=100)] == ["j0", "j1", "j2"]
    assert [j["id"] for j in store.lease("w1", LEASE, max_jobs=10, max_iterations=100)] == ["j3"]  # big: alone
    assert [j["id"] for j in store.lease("w1", LEASE, max_jobs=10, max_iterations=100)] == ["j4"]
    assert store.lease("w1", LEASE, max_jobs=10, max_iterations=100) == []


def test_complete_many_records_in_one_commit_and_says_what_happened(store, db_path):
    for n in range(3):
        store.enqueue(f"j{n}", 1, b"x")
    store.lease("w1", LEASE, max_jobs=3)
    store.complete("j1", "1" * 128, "w1", 0.1)
    answers = store.complete_many([("j0", "0" * 128, 0.1), ("j1", "f" * 128, 0.1), ("nope", "2" * 128, None),
                                   ("j2", "2" * 128, 0.2)], "w1")
    assert answers == [True, False, None, True]
    assert store.get("j1")["result"] == "1" * 128  # the first result stays
    assert store.counts() == fresh_counts(db_path)
    assert store.counts()["completed"] == 3
