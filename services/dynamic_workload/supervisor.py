"""The local cluster's supervisor: runs the services in the background and restarts them.

On AWS, systemd runs each service with ``Restart=always``. On one machine this module plays
that part: ``start`` detaches a supervisor (its own session and process group, stdio on a
log file, no inherited descriptors, so the caller, e.g. an Ansible task, returns at once),
which starts every service listed in ``<run-dir>/services.json`` with the environment of
``<run-dir>/cluster.env`` and restarts any that dies, after a short backoff.

Everything the cluster runs stays in the supervisor's process group, workers included, and
the supervisor adopts orphans (``PR_SET_CHILD_SUBREAPER``), so ``stop`` ends the whole group:
SIGTERM first (a warm stop), SIGKILL for whatever is left after the grace period. A
supervisor that was itself killed leaves its group behind; the next ``start`` or ``stop``
ends that group before anything else.

    python3 -m dynamic_workload supervise start|stop|status --run-dir DIR
"""

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

from .fleets.local import PACKAGE_PARENT, process_start_time

PR_SET_CHILD_SUBREAPER = 36
RESTART_FIRST = 0.2
RESTART_MAX = 5.0
STABLE_AFTER = 30.0


def read_env_file(path):
    env = {}
    with open(path) as lines:
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip().strip('"')
    return env


def group_members(pgid):
    """Pids of the live processes in process group `pgid`."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(name))
    return members


def end_group(pgid, grace, exclude=()):
    """SIGTERM every process of the group, wait up to `grace` seconds, then SIGKILL the rest."""
    def signal_all(signum):
        for pid in group_members(pgid):
            if pid not in exclude:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and set(group_members(pgid)) - set(exclude):
        reap()
        time.sleep(0.05)
    signal_all(signal.SIGKILL)
    while set(group_members(pgid)) - set(exclude) and time.monotonic() < deadline + 5:
        reap()
        time.sleep(0.05)


def reap():
    """Collect every finished child (services, and orphaned workers we adopted)."""
    finished = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return finished
        if pid == 0:
            return finished
        finished[pid] = status


class Pidfile:
    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, "supervisor.pid")

    def read(self):
        """(pid, alive) of the recorded supervisor, or (None, False)."""
        try:
            with open(self.path) as record:
                pid, start_time = record.read().split()
        except (OSError, ValueError):
            return None, False
        return int(pid), process_start_time(int(pid)) == start_time.encode()

    def write(self, pid):
        with open(self.path + ".tmp", "w") as record:
            record.write(f"{pid} {process_start_time(pid).decode()}\n")
        os.replace(self.path + ".tmp", self.path)

    def remove(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Supervisor:
    def __init__(self, run_dir, grace):
        self.run_dir = run_dir
        self.grace = grace
        with open(os.path.join(run_dir, "services.json")) as spec:
            self.services = json.load(spec)["services"]
        self.env = dict(os.environ)
        self.env.update(read_env_file(os.path.join(run_dir, "cluster.env")))
        self.env["PYTHONPATH"] = PACKAGE_PARENT
        self.log_dir = os.path.join(run_dir, "logs")
        self.stopping = False
        self.running = {}  # pid -> service
        self.restart_at = {}  # name -> monotonic time
        self.started_at = {}
        self.backoff = {}

    def request_stop(self, *_):
        self.stopping = True

    def spawn(self, service):
        name = service["name"]
        try:
            with open(os.path.join(self.log_dir, name + ".log"), "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "dynamic_workload", *service["argv"]],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, close_fds=True,
                )
        except OSError as error:  # e.g. its log can't be opened on a full or read-only disk
            self.schedule_restart(service, f"could not start: {error}")
            return
        self.running[process.pid] = service
        self.started_at[name] = time.monotonic()
        self.log(f"started {name} pid {process.pid}")

    def schedule_restart(self, service, why):
        name = service["name"]
        ran = time.monotonic() - self.started_at.get(name, time.monotonic())
        delay = RESTART_FIRST if ran > STABLE_AFTER else min(RESTART_MAX, self.backoff.get(name, 0) * 2 or RESTART_FIRST)
        self.backoff[name] = delay
        self.restart_at[name] = time.monotonic() + delay
        self.log(f"{name} {why} after {ran:.1f} s; restarting in {delay:.1f} s")

    def log(self, message):
        try:
            print(json.dumps({"time": round(time.time(), 3), "service": "supervisor", "event": message}), flush=True)
        except OSError:
            pass  # a full or read-only disk must not stop the supervision, only its log

    def run(self):
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        for service in self.services:
            self.spawn(service)
        while not self.stopping:
            for pid, status in reap().items():
                service = self.running.pop(pid, None)
                if service is not None:  # else an adopted orphan (a worker whose balancer died)
                    self.schedule_restart(service, f"exited with status {status}")
            for service in self.services:
                due = self.restart_at.get(service["name"])
                if due is not None and time.monotonic() >= due:
                    del self.restart_at[service["name"]]
                    self.spawn(service)
            time.sleep(0.05)
        self.log("stopping")
        self.stop_in_order()
        self.log("stopped")

    def stop_in_order(self):
        """Stop workers first, then the services from the last listed to the first (the balancer).

        Workers finishing their job can still post it, and endpoints can still answer, while
        the balancer is up; what is left after the grace period is killed.
        """
        me = os.getpid()
        group = os.getpgid(0)
        deadline = time.monotonic() + self.grace
        services = {pid: self.services.index(service) for pid, service in self.running.items()}
        # Workers (and anything not a service) first, then services in reverse order.
        waves = [lambda pid: pid not in services]
        waves += [lambda pid, p=pid: pid == p for pid in sorted(services, key=services.get, reverse=True)]
        for in_wave in waves:
            members = [pid for pid in group_members(group) if pid != me and in_wave(pid)]
            for pid in members:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            while time.monotonic() < deadline and set(members) & set(group_members(group)):
                reap()
                time.sleep(0.05)
        end_group(group, 0, exclude=(me,))


def start(run_dir, grace):
    pidfile = Pidfile(run_dir)
    pid, alive = pidfile.read()
    if alive:
        print(f"running: supervisor pid {pid}")
        return 0
    if pid is not None:
        end_group(pid, grace)  # services left behind by a supervisor that was killed
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    supervisor = Supervisor(run_dir, grace)  # fails here, in the caller, if the spec is bad
    child = os.fork()
    if child:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            recorded, alive = pidfile.read()
            if recorded == child and alive:
                print(f"started: supervisor pid {child}")
                return 0
            time.sleep(0.02)
        print("supervisor did not start; see " + os.path.join(run_dir, "logs", "supervisor.log"), file=sys.stderr)
        return 1
    try:
        os.setsid()
        log = os.open(os.path.join(run_dir, "logs", "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 65536)
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # without it, orphans are reaped by init instead
        pidfile.write(os.getpid())
        supervisor.run()
        pidfile.remove()
    finally:
        os._exit(0)


def stop(run_dir, grace):
    pidfile = Pidfile(run_dir)
    pid, alive = pidfile.read()
    if pid is None:
        print("not running")
        return 0
    if alive:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 10
        while process_start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    leftovers = group_members(pid)
    if leftovers:
        end_group(pid, 0)
    pidfile.remove()
    print(f"stopped: supervisor pid {pid}" + (f", killed {len(leftovers)} left over" if leftovers else ""))
    return 0


def status(run_dir):
    pid, alive = Pidfile(run_dir).read()
    if not alive:
        print("not running")
        return 3
    members = group_members(pid)
    print(f"running: supervisor pid {pid}, {len(members)} processes")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dynamic_workload supervise", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL on stop")
    args = parser.parse_args(argv)
    run_dir = os.path.abspath(args.run_dir)
    if args.action == "start":
        return start(run_dir, args.grace)
    if args.action == "stop":
        return stop(run_dir, args.grace)
    return status(run_dir)
