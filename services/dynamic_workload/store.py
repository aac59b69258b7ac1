"""The durable queue and its results, in one SQLite database (WAL).

The store owns every job's life: ``queued`` -> ``running`` (under a lease) -> ``completed``, or
``failed`` once it has used up its attempts. Nothing lives only in memory: an enqueue returns
after the transaction holding it has committed with ``synchronous=FULL``.

Writes go through one writer thread that takes whatever operations are waiting, runs them
in one transaction (each under its own savepoint, so one bad operation can't sink the
others) and commits once: a group commit. Callers block until the commit that holds their
operation is durable, so acknowledging after ``enqueue`` returns is safe, and under load one
fsync serves hundreds of requests. Reads use their own connections and never wait on writes.

Payloads sit in their own table, read only when a job is leased, and deleted once the job
has a result, so the job rows the queue scans stay small.
"""

import concurrent.futures
import queue
import sqlite3
import threading
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq           INTEGER PRIMARY KEY,
    id            TEXT NOT NULL UNIQUE,
    iterations    INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    worker_id     TEXT,
    lease_expires REAL,
    enqueued_at   REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    duration      REAL,
    done_seq      INTEGER,
    result        TEXT,
    error         TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_completion ON jobs(done_seq) WHERE done_seq IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_lease ON jobs(lease_expires) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS payloads (
    seq  INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
"""

STATES = ("queued", "running", "completed", "failed")
# One transaction holds at most this many operations, so a flood can't starve its waiters.
MAX_BATCH = 512


class QueueFull(Exception):
    """The queue holds `max_queued` jobs already: the caller should retry later."""


class UnknownJob(KeyError):
    """No job has that id."""


class StoreUnavailable(Exception):
    """The database refused a write (disk full, read-only, I/O error); nothing was changed.

    `readonly` tells a read-only database apart: SQLite keeps a database it opened read-only
    that way for the life of the process, so only a new process can write to it again.
    """

    def __init__(self, message, readonly=False):
        super().__init__(message)
        self.readonly = readonly

    @classmethod
    def from_sqlite(cls, error):
        return cls(f"the job database refused the write: {error}", readonly="readonly" in str(error))


class Store:
    def __init__(self, path, *, max_queued=10_000, max_attempts=5, clock=time.time):
        self.path = str(path)
        self.max_queued = max_queued
        self.max_attempts = max_attempts
        self.clock = clock
        self._ops = queue.SimpleQueue()
        self._readers = queue.SimpleQueue()
        # Bumped after every commit that made a job leasable; long-polling leases wait on it.
        self.work_available = threading.Condition()
        self.generation = 0
        writer = self._connect()
        try:
            writer.executescript(SCHEMA)
            # A real write, so that a database that can't be written fails here, at start.
            writer.execute("PRAGMA user_version = 1")
        except sqlite3.OperationalError as error:
            writer.close()
            raise StoreUnavailable.from_sqlite(error) from None
        self._counts = dict.fromkeys(STATES, 0)
        for state, count in writer.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            self._counts[state] = count
        self._counts["enqueued"] = writer.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        # The work waiting or under way, in iterations: what the scaler sizes the fleet by.
        self._counts["backlog_iterations"] = writer.execute(
            "SELECT COALESCE(SUM(iterations), 0) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]
        self._next_done_seq = (writer.execute("SELECT MAX(done_seq) FROM jobs").fetchone()[0] or 0) + 1
        self._writer = writer
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._thread.start()

    def _connect(self):
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def close(self):
        self._closed = True
        self._ops.put(None)
        self._thread.join()
        self._writer.close()
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                break

    # --- the writer -----------------------------------------------------------------------

    def _write(self, operation):
        if self._closed:
            raise StoreUnavailable("the store is closed")
        future = concurrent.futures.Future()
        self._ops.put((operation, future))
        return future.result()

    def _write_loop(self):
        conn = self._writer
        while True:
            first = self._ops.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._ops.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._ops.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            self._run_batch(conn, batch)

    def _run_batch(self, conn, batch):
        now = self.clock()
        counts = dict(self._counts, wake=0)  # wake: jobs this batch made leasable
        outcomes = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future in batch:
                before = dict(counts)
                conn.execute("SAVEPOINT operation")
                try:
                    result = operation(conn, now, counts)
                except Exception as error:
                    counts = before
                    if not conn.in_transaction:
                        raise  # SQLite rolled the whole transaction back (disk full, I/O error)
                    conn.execute("ROLLBACK TO operation")
                    conn.execute("RELEASE operation")
                    if isinstance(error, sqlite3.Error):
                        error = StoreUnavailable.from_sqlite(error)
                    outcomes.append((future, None, error))
                else:
                    conn.execute("RELEASE operation")
                    outcomes.append((future, result, None))
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for _, future in batch:
                future.set_exception(StoreUnavailable.from_sqlite(error))
            return
        woken = counts.pop("wake")
        self._counts = counts
        if woken:
            with self.work_available:
                self.generation += 1
                # As many waiting leases as there are new jobs, not every one of them.
                self.work_available.notify(woken)
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    # --- reads ----------------------------------------------------------------------------

    def _read(self, query):
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            return query(conn)
        finally:
            self._readers.put(conn)

    def _exists(self, job_id):
        return self._read(lambda conn: conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone()) is not None

    def counts(self):
        """Jobs per state, the number ever enqueued, and the backlog's iterations."""
        return dict(self._counts)

    def get(self, job_id):
        row = self._read(
            lambda conn: conn.execute(
                "SELECT id, state, iterations, size, attempts, enqueued_at, started_at, finished_at,"
                " duration, result, error FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        )
        if row is None:
            raise UnknownJob(job_id)
        keys = ("id", "status", "iterations", "size", "attempts", "enqueued_at", "started_at",
                "finished_at", "duration", "result", "error")
        return {k: v for k, v in zip(keys, row) if v is not None}

    def completed(self, top):
        """The `top` most recently completed jobs, newest completion first."""
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT id, result, iterations, finished_at, duration FROM jobs"
                " WHERE done_seq IS NOT NULL ORDER BY done_seq DESC LIMIT ?",
                (top,),
            ).fetchall()
        )
        return [
            {"id": i, "result": r, "iterations": n, "completed_at": f, "duration": d}
            for i, r, n, f, d in rows
        ]

    def oldest_queued_age(self):
        """Seconds the oldest queued job has waited, or 0 with an empty queue."""
        row = self._read(
            lambda conn: conn.execute(
                "SELECT enqueued_at FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
        )
        return max(0.0, self.clock() - row[0]) if row else 0.0

    def recent_durations(self, last=200):
        """Compute seconds of the last `last` timed jobs, newest first."""
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT duration FROM jobs WHERE done_seq IS NOT NULL AND duration IS NOT NULL"
                " ORDER BY done_seq DESC LIMIT ?",
                (last,),
            ).fetchall()
        )
        return [row[0] for row in rows]

    def seconds_per_iteration(self, last=50):
        """Measured compute seconds per iteration over the last `last` timed jobs, or None."""
        row = self._read(
            lambda conn: conn.execute(
                "SELECT SUM(duration), SUM(iterations) FROM (SELECT duration, iterations FROM jobs"
                " WHERE done_seq IS NOT NULL AND duration IS NOT NULL ORDER BY done_seq DESC LIMIT ?)",
                (last,),
            ).fetchone()
        )
        return row[0] / row[1] if row[1] else None

    # --- writes ---------------------------------------------------------------------------

    def enqueue(self, job_id, iterations, data):
        """Store a job durably. Returns True if stored now, False if that id was stored before.

        Ids come from the caller so that a retried enqueue (the answer was lost) can't
        create the job twice. Raises QueueFull when `max_queued` jobs are waiting.
        """
        if self._counts["queued"] >= self.max_queued and not self._exists(job_id):
            raise QueueFull()  # refused without waiting for the writer; checked again inside
        def operation(conn, now, counts):
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                return False
            if counts["queued"] >= self.max_queued:
                raise QueueFull()
            cursor = conn.execute(
                "INSERT INTO jobs (id, iterations, size, state, enqueued_at) VALUES (?, ?, ?, 'queued', ?)",
                (job_id, iterations, len(data), now),
            )
            conn.execute("INSERT INTO payloads (seq, data) VALUES (?, ?)", (cursor.lastrowid, data))
            counts["queued"] += 1
            counts["enqueued"] += 1
            counts["backlog_iterations"] += iterations
            counts["wake"] += 1
            return True

        return self._write(operation)

    def lease(self, worker_id, lease_seconds, max_jobs=1, max_iterations=None):
        """Lease up to `max_jobs` queued jobs, oldest first, to a worker for `lease_seconds`.

        With `max_iterations`, jobs are added only while their iterations together stay within
        it (the first job always comes): a worker takes a batch of small jobs in one request
        without hoarding big ones. Returns a list of dicts with id, iterations, attempt, data
        and waited (seconds queued).
        """
        def operation(conn, now, counts):
            candidates = conn.execute(
                "SELECT seq, iterations FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT ?", (max_jobs,)
            ).fetchall()
            chosen, total = [], 0
            for seq, iterations in candidates:
                if chosen and max_iterations is not None and total + iterations > max_iterations:
                    break
                chosen.append(seq)
                total += iterations
            if not chosen:
                return []
            marks = ",".join("?" * len(chosen))
            rows = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker_id = ?,"
                f" lease_expires = ?, started_at = ? WHERE seq IN ({marks})"
                " RETURNING seq, id, iterations, attempts, enqueued_at",
                (worker_id, now + lease_seconds, now, *chosen),
            ).fetchall()
            rows.sort()
            jobs = []
            for seq, job_id, iterations, attempt, enqueued_at in rows:
                data = conn.execute("SELECT data FROM payloads WHERE seq = ?", (seq,)).fetchone()[0]
                jobs.append({"id": job_id, "iterations": iterations, "attempt": attempt, "data": data,
                             "waited": now - enqueued_at})
            counts["queued"] -= len(rows)
            counts["running"] += len(rows)
            return jobs

        return self._write(operation)

    def heartbeat(self, worker_id, job_ids, lease_seconds):
        """Extend the worker's leases on `job_ids`; returns the ids it still holds."""
        def operation(conn, now, counts):
            held = []
            for job_id in job_ids:
                row = conn.execute(
                    "UPDATE jobs SET lease_expires = ? WHERE id = ? AND state = 'running'"
                    " AND worker_id = ? RETURNING id",
                    (now + lease_seconds, job_id, worker_id),
                ).fetchone()
                if row:
                    held.append(job_id)
            return held

        return self._write(operation)

    def complete(self, job_id, result, worker_id=None, duration=None):
        """Record a job's result. Returns True if recorded now, False if it had one already.

        A result is accepted whoever posts it, even after the lease moved to another worker
        (the work is deterministic); the first one is kept and any later one is ignored.
        """
        recorded = self.complete_many([(job_id, result, duration)], worker_id)[0]
        if recorded is None:
            raise UnknownJob(job_id)
        return recorded

    def complete_many(self, results, worker_id=None):
        """Record several (job id, result, duration) in one commit, as `complete` does.

        Returns, for each, True (recorded now), False (it had one already) or None (no such job).
        """
        def operation(conn, now, counts):
            return [self._complete(conn, now, counts, worker_id, *item) for item in results]

        return self._write(operation)

    def _complete(self, conn, now, counts, worker_id, job_id, result, duration):
        row = conn.execute("SELECT seq, state, iterations FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        seq, state, iterations = row
        if state == "completed":
            return False
        conn.execute(
            "UPDATE jobs SET state = 'completed', result = ?, finished_at = ?, duration = ?,"
            " done_seq = ?, lease_expires = NULL, worker_id = ?, error = NULL WHERE seq = ?",
            (result, now, duration, self._next_done_seq, worker_id, seq),
        )
        self._next_done_seq += 1
        conn.execute("DELETE FROM payloads WHERE seq = ?", (seq,))
        counts[state] -= 1
        counts["completed"] += 1
        if state in ("queued", "running"):
            counts["backlog_iterations"] -= iterations
        return True

    def release(self, job_id, worker_id):
        """A worker gives a leased job back unfinished (it is stopping): re-queue it at once.

        The attempt is not counted: the job did nothing wrong.
        """
        def operation(conn, now, counts):
            row = conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = attempts - 1, worker_id = NULL,"
                " lease_expires = NULL WHERE id = ? AND state = 'running' AND worker_id = ? RETURNING seq",
                (job_id, worker_id),
            ).fetchone()
            if row:
                counts["running"] -= 1
                counts["queued"] += 1
                counts["wake"] += 1
            return row is not None

        return self._write(operation)

    def requeue_expired(self):
        """Return jobs whose lease has expired to the queue (or fail them after max attempts)."""
        return self._write(lambda conn, now, counts: self._requeue(
            conn, now, counts, "lease_expires < ?", (now,), "its lease expired"))

    def requeue_worker(self, worker_id, reason):
        """Return the jobs of a worker that is gone to the queue (or fail them)."""
        return self._write(lambda conn, now, counts: self._requeue(
            conn, now, counts, "worker_id = ?", (worker_id,), reason))

    def _requeue(self, conn, now, counts, condition, params, reason):
        rows = conn.execute(
            "SELECT seq, attempts, iterations FROM jobs WHERE state = 'running' AND " + condition, params
        ).fetchall()
        requeued = 0
        for seq, attempts, iterations in rows:
            if attempts >= self.max_attempts:
                conn.execute(
                    "UPDATE jobs SET state = 'failed', worker_id = NULL, lease_expires = NULL,"
                    " finished_at = ?, error = ? WHERE seq = ?",
                    (now, f"gave up after {attempts} attempts; the last ended because {reason}", seq),
                )
                conn.execute("DELETE FROM payloads WHERE seq = ?", (seq,))
                counts["failed"] += 1
                counts["backlog_iterations"] -= iterations
            else:
                conn.execute(
                    "UPDATE jobs SET state = 'queued', worker_id = NULL, lease_expires = NULL,"
                    " error = ? WHERE seq = ?",
                    (f"attempt {attempts} ended because {reason}", seq),
                )
                counts["queued"] += 1
                counts["wake"] += 1
                requeued += 1
            counts["running"] -= 1
        return requeued
