"""Disk failure: the balancer's state directory on a filesystem that fills up or turns read-only.

The state directory is a small tmpfs of the test's own (`local_cluster_state_dir` points into it);
its logs/ directory is a symbolic link to a second small tmpfs, so that the job database's
filesystem can be remounted read-only while the services keep their log files open. Both are
filled for the disk-full case. Contract: enqueue is refused with a clear 507 (or 503) JSON error
and Retry-After, nothing acknowledged is lost, and the cluster recovers once space returns.
"""

import contextlib
import json
import os
import signal
import time

import pytest

import faultkit
from faultkit import report, wait_until

pytestmark = pytest.mark.cluster

MAX_WORKERS = 1


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    base = tmp_path_factory.mktemp("diskfaults")
    state_fs = logs_fs = None
    try:
        state_fs = faultkit.Tmpfs(base / "state-fs", "16m")
        logs_fs = faultkit.Tmpfs(base / "logs-fs", "4m")
        yield base, state_fs, logs_fs
    finally:
        for fs in (logs_fs, state_fs):
            if fs is not None:
                fs.close()


@pytest.fixture(scope="module")
def cluster(disks):
    base, state_fs, logs_fs = disks
    state_dir = os.path.join(state_fs.path, "state")
    os.makedirs(state_dir, mode=0o700)
    os.symlink(logs_fs.path, os.path.join(state_dir, "logs"))
    with faultkit.fired(base, local_cluster_state_dir=state_dir, cluster_max_workers=MAX_WORKERS,
                        cluster_worker_idle_timeout=2) as cluster:
        yield cluster


def ensure_running(cluster):
    """A test before may have left the cluster down (a defect): fire it again."""
    alive = faultkit.process_start_time(cluster.supervisor_pid()) is not None
    if not alive or not faultkit.healthy(cluster.balancer_port):
        cluster.fire()
    cluster.wait_healthy()


def enqueue_small(cluster, acknowledged, tag, count, iterations=1000):
    for n in range(count):
        data = f"{tag} {n} {os.urandom(8).hex()}".encode()
        answer = cluster.enqueue(data, iterations)
        assert answer.status == 201, answer.body
        acknowledged[answer.json()["id"]] = (data, iterations)


def check_refusal(answer, problems, what):
    """A refused enqueue: 507 or 503, a JSON error that says what is wrong, and Retry-After."""
    if answer.status not in (503, 507):
        problems.append(f"{what}: HTTP {answer.status} {answer.body[:200]!r}")
        return
    try:
        message = answer.json()["error"]
    except (ValueError, KeyError):
        problems.append(f"{what}: {answer.status} without a JSON error: {answer.body[:200]!r}")
        return
    if "Retry-After" not in answer.headers:
        problems.append(f"{what}: {answer.status} without Retry-After")
    if answer.status == 507 and not any(word in message for word in ("disk", "space", "read-only")):
        problems.append(f"{what}: 507 whose error does not say the disk is the cause: {message!r}")


def not_completed(cluster, acknowledged):
    """The acknowledged jobs the database does not hold as completed (read straight from it)."""
    rows = dict(faultkit.db_rows(cluster, "SELECT id, state FROM jobs"))
    return {job_id: rows.get(job_id, "absent") for job_id in acknowledged if rows.get(job_id) != "completed"}


def worker_processes(cluster):
    return [pid for pid in faultkit.group_members(cluster.supervisor_pid())
            if "dynamic_workload worker" in faultkit.cmdline(pid)]


def log_mark(cluster):
    """Where the balancer's log ends now: internal_errors(cluster, mark) reads what came after."""
    return os.path.getsize(os.path.join(cluster.state_dir, "logs", "balancer.log"))


def internal_errors(cluster, mark):
    """The balancer's 500s since `mark`: a full or read-only disk is expected, never a bug."""
    with open(os.path.join(cluster.state_dir, "logs", "balancer.log"), "rb") as log:
        log.seek(mark)
        lines = log.read().decode("utf-8", "replace").splitlines()
    errors = {}
    for line in lines:
        if '"internal_error"' in line:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                key = f"{record.get('method')} {record.get('path')}: {record.get('error')}"
                errors[key] = errors.get(key, 0) + 1
    return errors


def no_worker(cluster):
    """No worker process, and no pid file left for the scaler to clean (that would free space)."""
    return not worker_processes(cluster) and not cluster.worker_pids()


def pad_to_page(path):
    """Round a log file up to a whole page, so that its next line needs a new page (tmpfs)."""
    size = os.path.getsize(path)
    with open(path, "ab") as log:
        log.write(b"\n" * (-size % 4096))



def try_enqueue(cluster, acknowledged, label, last):
    """One enqueue: True if acknowledged (then kept in `acknowledged`), else the reason in `last`."""
    data = f"{label} {os.urandom(8).hex()}".encode()
    try:
        answer = cluster.enqueue(data, 1000, timeout=10)
    except OSError as error:
        last[:] = [repr(error)]
        return False
    if answer.status in (200, 201):
        acknowledged[answer.json()["id"]] = (data, 1000)
        return True
    last[:] = [f"{answer.status} {answer.body[:150]!r}"]
    return False

def test_a_full_disk_refuses_enqueues_with_507_loses_nothing_and_recovers(cluster, disks):
    _, state_fs, logs_fs = disks
    ensure_running(cluster)
    mark = log_mark(cluster)
    problems, acknowledged, answers = [], {}, {}
    enqueue_small(cluster, acknowledged, "before the disk filled", 5)
    cluster.wait_completed(acknowledged, timeout=30)
    wait_until(lambda: no_worker(cluster), 15, message="the idle worker to end itself")
    # A job waits and no worker runs when the disk fills: the scaler must launch one on a full disk.
    balancer = faultkit.balancer_pid(cluster)
    for _ in range(3):
        data = f"waiting {os.urandom(8).hex()}".encode()
        answer = cluster.enqueue(data, 1000)
        os.kill(balancer, signal.SIGSTOP)  # hold the scaler while the disk fills
        try:
            assert answer.status == 201, answer.body
            acknowledged[answer.json()["id"]] = (data, 1000)
            if no_worker(cluster):
                pad_to_page(os.path.join(cluster.state_dir, "logs", "supervisor.log"))
                filled = state_fs.fill() + logs_fs.fill()
                break
        finally:
            os.kill(balancer, signal.SIGCONT)
        cluster.wait_completed(acknowledged, timeout=30)  # the scaler was quicker: again
        wait_until(lambda: no_worker(cluster), 15, message="the idle worker to end itself")
    else:
        pytest.fail("could not fill the disk before the scaler launched a worker")
    full_since = time.monotonic()
    supervisor_died = False
    balancer_served = None
    try:
        # Enqueues: each either durably stored (the WAL had room) or refused with 507/503.
        refused = 0
        for n in range(40):
            data = os.urandom(16384) + b"full %d" % n
            answer = cluster.enqueue(data, 1000)
            answers[answer.status] = answers.get(answer.status, 0) + 1
            if answer.status in (200, 201):
                acknowledged[answer.json()["id"]] = (data, 1000)
            else:
                check_refusal(answer, problems, "enqueue on a full disk")
                refused += 1
                if refused >= 5:
                    break
        if not refused:
            problems.append("no enqueue was refused on a full disk")
        # The fleet stays within max_workers while the disk is full.
        samples = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            samples.append(len(worker_processes(cluster)))
            time.sleep(0.1)
        if max(samples) > MAX_WORKERS:
            problems.append(f"{max(samples)} worker processes on a full disk with cluster_max_workers="
                            f"{MAX_WORKERS} ({len(cluster.worker_pids())} recorded in workers/*.pid)")
        # kill -9 of the balancer while the disk is full: the supervisor starts it again (it may
        # serve, or exit at once because it cannot write and be retried: either way, enqueue is
        # refused with 503/507 and nothing is lost).
        supervisor = cluster.supervisor_pid()
        killed = faultkit.balancer_pid(cluster)
        cluster.kill(killed)
        try:
            faultkit.wait_restarted(cluster, killed, "dynamic_workload balancer", timeout=10)
        except AssertionError:
            supervisor_died = faultkit.process_start_time(supervisor) is None
            problems.append("kill -9 of the balancer on a full disk: not started again within 10 s"
                            + (" (the supervisor died)" if supervisor_died else ""))
        if not supervisor_died:
            data = b"after the restart, disk still full"
            try:
                answer = cluster.enqueue(data, 1000, timeout=20)
            except OSError as error:
                problems.append(f"enqueue on a full disk after a restart: no answer ({error!r})")
            else:
                if answer.status in (200, 201):
                    acknowledged[answer.json()["id"]] = (data, 1000)
                else:
                    check_refusal(answer, problems, "enqueue on a full disk after a restart")
            balancer_served = faultkit.healthy(cluster.balancer_port)
    finally:
        state_fs.free()
        logs_fs.free()
    full_for = time.monotonic() - full_since
    # Space is back: enqueue works again within seconds and every acknowledged job completes.
    recovered_after = None
    if not supervisor_died:
        last = []

        def accepted():
            return try_enqueue(cluster, acknowledged, "after space returned", last)
        try:
            wait_until(accepted, 15, 0.2, message="enqueue to work again")
            recovered_after = round(time.monotonic() - full_since - full_for, 2)
            with contextlib.suppress(AssertionError):
                cluster.wait_completed(acknowledged, timeout=30)
        except AssertionError:
            problems.append(f"enqueue still refused 15 s after space returned: {last}")
    lost = not_completed(cluster, acknowledged)
    if lost:
        problems.append(f"{len(lost)} acknowledged jobs not completed (the cluster stayed down): "
                        f"{sorted(lost.values())}")
    else:
        faultkit.check_all_completed_once(cluster, acknowledged, timeout=10)
    errors = internal_errors(cluster, mark)
    if errors:
        problems.append(f"the balancer answered 500 (logged internal_error): {errors}")
    report("state directory on a full disk", filled_bytes=filled, acknowledged=len(acknowledged),
           lost=len(lost), enqueue_answers=answers, full_for_s=round(full_for, 1),
           worker_processes_max=max(samples), balancer_up_after_kill_while_full=balancer_served,
           recovered_after_s=recovered_after, problems=len(problems))
    assert not problems, "\n".join(problems)


def test_a_read_only_disk_refuses_enqueues_and_the_balancer_recovers_once_writable(cluster, disks):
    _, state_fs, _ = disks
    ensure_running(cluster)
    mark = log_mark(cluster)
    problems, acknowledged, answers = [], {}, {}
    enqueue_small(cluster, acknowledged, "before read-only", 5)
    # The balancer holds the database open read-write, so the filesystem can only turn read-only
    # under a dead balancer: kill it with its supervisor held, remount, let the supervisor go on.
    supervisor = cluster.supervisor_pid()
    balancer = faultkit.balancer_pid(cluster)
    os.kill(supervisor, signal.SIGSTOP)
    try:
        cluster.kill(balancer)
        wait_until(lambda: faultkit.process_start_time(balancer) is None, 10, message="the balancer to die")
        state_fs.read_only(True)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    read_only_since = time.monotonic()
    try:
        for n in range(2):
            data = f"read-only {n}".encode()
            try:
                answer = cluster.enqueue(data, 1000, timeout=20)
            except OSError as error:
                problems.append(f"enqueue on a read-only disk: no answer ({error!r})")
                continue
            answers[answer.status] = answers.get(answer.status, 0) + 1
            if answer.status in (200, 201):
                problems.append("an enqueue was acknowledged while the job database was read-only")
                acknowledged[answer.json()["id"]] = (data, 1000)
            else:
                check_refusal(answer, problems, "enqueue on a read-only disk")
        restarted = faultkit.balancer_pid(cluster) not in (None, balancer)
    finally:
        state_fs.read_only(False)
    writable_at = time.monotonic()
    recovered_after = None

    last = []

    def accepted():
        return try_enqueue(cluster, acknowledged, "writable again", last)
    try:
        wait_until(accepted, 15, 0.2, message="enqueue to work again")
        recovered_after = round(time.monotonic() - writable_at, 2)
        with contextlib.suppress(AssertionError):
            cluster.wait_completed(acknowledged, timeout=30)
    except AssertionError:
        problems.append("enqueue still refused 15 s after the disk was writable again "
                        f"(the balancer {'restarted on the read-only disk' if restarted else 'was down'}): {last}")
    lost = not_completed(cluster, acknowledged)
    if lost:
        problems.append(f"{len(lost)} acknowledged jobs not completed: {sorted(lost.values())}")
    else:
        faultkit.check_all_completed_once(cluster, acknowledged, timeout=10)
    errors = internal_errors(cluster, mark)
    if errors:
        problems.append(f"the balancer answered 500 (logged internal_error): {errors}")
    report("state directory read-only", acknowledged=len(acknowledged), lost=len(lost),
           enqueue_answers=answers, read_only_for_s=round(writable_at - read_only_since, 1),
           balancer_restarted_while_read_only=restarted, recovered_after_s=recovered_after,
           problems=len(problems))
    assert not problems, "\n".join(problems)
