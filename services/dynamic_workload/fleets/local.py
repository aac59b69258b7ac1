"""The local fleet: workers are processes on this machine, started by the balancer.

Each worker is recorded in ``<state_dir>/workers/<id>.pid`` with its pid and the kernel's
start time for that pid, so a restarted balancer adopts the workers that outlived it and
never mistakes a recycled pid for one of them. Workers stay in the balancer's process
group: a crashed balancer leaves them working, and the supervisor's stop ends them all.
"""

import os
import signal
import subprocess
import sys
import uuid

from . import Fleet, FleetError, Member

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def process_start_time(pid):
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":
        return None  # a zombie has finished; only its exit status is left
    return fields[19]


class LocalFleet(Fleet):
    name = "local"

    def __init__(self, settings, clock):
        self.settings = settings
        self.clock = clock
        self.pid_dir = os.path.join(settings.state_dir, "workers")
        self.log_path = os.path.join(settings.state_dir, "logs", "workers.log")
        os.makedirs(self.pid_dir, exist_ok=True)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self._children = {}  # pid -> Popen, for the workers this process started

    def launch(self):
        worker_id = "local-" + uuid.uuid4().hex[:12]
        env = dict(os.environ)
        env["PYTHONPATH"] = PACKAGE_PARENT
        env["DW_BALANCER_URL"] = self.settings.balancer_url
        path = os.path.join(self.pid_dir, worker_id + ".pid")
        try:
            with open(self.log_path, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "dynamic_workload", "worker", "--worker-id", worker_id],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, close_fds=True,
                )
        except OSError as error:
            raise FleetError(f"cannot start a worker process: {error}", "LocalStartFailed") from None
        launched_at = self.clock()
        start_time = process_start_time(process.pid) or b"?"
        try:
            with open(path + ".tmp", "w") as record:
                record.write(f"{process.pid} {start_time.decode()} {launched_at}\n")
            os.replace(path + ".tmp", path)
        except OSError as error:
            # A worker nobody knows of would never be counted, capped or stopped: end it.
            process.kill()
            process.wait()
            try:
                os.unlink(path + ".tmp")
            except OSError:
                pass
            raise FleetError(f"cannot record a worker process: {error}", "LocalRecordFailed") from None
        self._children[process.pid] = process
        return Member(worker_id, launched_at)

    def _records(self):
        for name in os.listdir(self.pid_dir):
            if not name.endswith(".pid"):
                continue
            path = os.path.join(self.pid_dir, name)
            try:
                with open(path) as record:
                    pid, start_time, launched_at = record.read().split()
                yield name[:-4], path, int(pid), start_time.encode(), float(launched_at)
            except (OSError, ValueError):
                continue

    def members(self):
        for pid, process in list(self._children.items()):
            if process.poll() is not None:  # reap, so that finished workers leave no zombie
                del self._children[pid]
        alive = []
        for worker_id, path, pid, start_time, launched_at in self._records():
            if process_start_time(pid) == start_time:
                alive.append(Member(worker_id, launched_at))
            else:
                os.unlink(path)
        return alive

    def terminate(self, worker_id):
        for record_id, path, pid, start_time, _ in self._records():
            if record_id != worker_id:
                continue
            if process_start_time(pid) == start_time:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it ended on its own in the meantime
                process = self._children.pop(pid, None)
                if process is not None:
                    process.wait()
            os.unlink(path)
