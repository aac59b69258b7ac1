"""What every benchmark section shares: processes it must stop, the cluster, HTTP helpers, stats.

Everything a section starts is registered with ``CLEANUP`` right after it starts, and
``CLEANUP.run()`` stops it all in reverse order, on success, on an exception and on Ctrl-C or
SIGTERM (run.py turns both into KeyboardInterrupt).
"""

import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
SERVICES = os.path.join(ROOT, "services")
BIN = os.path.dirname(sys.executable)

if SERVICES not in sys.path:
    sys.path.insert(0, SERVICES)


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- cleanup -----------------------------------------------------------------------------------

class Cleanup:
    """A stack of things to stop; run() calls each once, newest first, whatever happens."""

    def __init__(self):
        self._stack = []

    def push(self, name, action):
        token = object()
        self._stack.append((token, name, action))
        return token

    def pop(self, token):
        """Run one registered action now (and forget it)."""
        for index, (t, name, action) in enumerate(self._stack):
            if t is token:
                del self._stack[index]
                self._call(name, action)
                return

    def run(self):
        while self._stack:
            _, name, action = self._stack.pop()
            self._call(name, action)

    @staticmethod
    def _call(name, action):
        # A second Ctrl-C must not leave the rest running: ignore SIGINT while cleaning up.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            action()
        except Exception as error:  # keep cleaning up the rest
            log(f"cleanup of {name} failed: {error!r}")
        finally:
            signal.signal(signal.SIGINT, previous)


CLEANUP = Cleanup()


def stop_process(process, grace=5.0):
    """SIGTERM, wait up to `grace` s, then SIGKILL; for a Popen (its own process group if it has one)."""
    if process.poll() is not None:
        return
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.terminate()
    except ProcessLookupError:
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
        except ProcessLookupError:
            pass
        process.wait()


def start_process(name, argv, **popen):
    """Start a process in its own process group, registered for cleanup. Returns (Popen, token)."""
    process = subprocess.Popen(argv, start_new_session=True, **popen)
    token = CLEANUP.push(name, lambda: stop_process(process))
    return process, token


# --- ports, HTTP ---------------------------------------------------------------------------------

def free_port(pair=False):
    """A free port below the ephemeral range (and its successor too when `pair`)."""
    for _ in range(500):
        port = random.randrange(20000, 32000)
        socks = []
        try:
            for p in ([port, port + 1] if pair else [port]):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port in 20000-32000")


class Http:
    """One keep-alive connection to 127.0.0.1:port (reconnects when the server closed it)."""

    def __init__(self, port, timeout=30):
        self.port = port
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None, headers=None):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                answer = self.conn.getresponse()
                data = answer.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
                continue
            if answer.will_close:
                self.close()
            return answer.status, data

    def json(self, method, path, body=None, headers=None):
        status, data = self.request(method, path, body, headers)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status} {data[:200]!r}")
        return json.loads(data)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_until(condition, timeout, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def contract_work(buffer, iterations):
    output = hashlib.sha512(buffer).digest()
    for _ in range(iterations - 1):
        output = hashlib.sha512(output).digest()
    return output.hex()


# --- the cluster ---------------------------------------------------------------------------------

class Cluster:
    """The real local cluster, fired with ansible-playbook (as `make fire` does) on ports of its own
    and a state directory under `work_dir`; torn down by CLEANUP whatever happens."""

    def __init__(self, work_dir, name, **cluster_vars):
        self.endpoint_port = free_port(pair=True)
        self.balancer_port = free_port()
        self.state_dir = os.path.join(work_dir, name)
        self.vars = {
            "cluster_name": f"bench-{name}-{os.getpid()}",
            "local_cluster_state_dir": self.state_dir,
            "local_cluster_endpoint_base_port": self.endpoint_port,
            "local_cluster_balancer_port": self.balancer_port,
            "local_cluster_stop_grace": 5,
        }
        self.vars.update(cluster_vars)
        self._token = None

    def _playbook(self, name, timeout=240):
        env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
                   ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
        run = subprocess.run(
            [os.path.join(BIN, "ansible-playbook"), f"playbooks/{name}", "-e", json.dumps(self.vars)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        if run.returncode != 0:
            raise RuntimeError(f"ansible-playbook {name} failed:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")

    def fire(self):
        started = time.monotonic()
        # Registered before firing: a fire interrupted half-way is torn down too.
        self._cleanup = CLEANUP.push(f"cluster {self.vars['cluster_name']}", self._teardown)
        self._playbook("fire.yml")
        self.fire_seconds = time.monotonic() - started
        log(f"cluster {self.vars['cluster_name']} fired in {self.fire_seconds:.1f} s "
            f"(endpoints {self.endpoints}, balancer {self.balancer_port})")
        return self

    def teardown(self):
        CLEANUP.pop(self._cleanup)

    def _teardown(self):
        members = self._members()
        try:
            self._playbook("teardown.yml", timeout=120)
        finally:
            # Whatever the playbook did, nothing of this cluster may keep running.
            self._kill(members)

    def _members(self):
        """Pids of the cluster's processes now: the supervisor's group, workers included."""
        from dynamic_workload.supervisor import group_members

        try:
            return group_members(self.supervisor_pgid())
        except (OSError, ValueError, IndexError):
            return []

    def _kill(self, pids):
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if b"dynamic_workload" not in cmdline.read():
                        continue  # not ours (a recycled pid)
                os.kill(pid, signal.SIGKILL)
                log(f"killed cluster process {pid}, left by teardown")
            except (OSError, ProcessLookupError):
                pass

    @property
    def endpoints(self):
        return [self.endpoint_port, self.endpoint_port + 1]

    @property
    def token(self):
        if self._token is None:
            with open(os.path.join(self.state_dir, "token")) as token:
                self._token = token.read().strip()
        return self._token

    def supervisor_pgid(self):
        with open(os.path.join(self.state_dir, "supervisor.pid")) as record:
            return int(record.read().split()[0])

    def service_pid(self, fragment):
        """The pid of the cluster's process whose command line holds `fragment`."""
        from dynamic_workload.supervisor import group_members

        for pid in group_members(self.supervisor_pgid()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if fragment.encode() in cmdline.read().replace(b"\0", b" "):
                        return pid
            except OSError:
                continue
        return None

    def worker_pids(self):
        pids = []
        workers_dir = os.path.join(self.state_dir, "workers")
        try:
            names = os.listdir(workers_dir)
        except OSError:
            return pids
        for name in names:
            if name.endswith(".pid"):
                try:
                    with open(os.path.join(workers_dir, name)) as record:
                        pid = int(record.read().split()[0])
                except (OSError, ValueError, IndexError):
                    continue
                if os.path.exists(f"/proc/{pid}") and not _zombie(pid):
                    pids.append(pid)
        return pids

    def status(self, http=None):
        return (http or Http(self.endpoint_port)).json("GET", "/status")


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


# --- numbers -------------------------------------------------------------------------------------

def percentile(values, p):
    """The p-th percentile (nearest rank) of `values`."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def rss_kib(pid):
    """(VmRSS, VmHWM) of a process in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_gib, 1),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "sqlite": __import__("sqlite3").sqlite_version,
    }


# --- CPU accounting ------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid):
    """User + system CPU seconds of a process and of its children it has waited for."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


def machine_cpu():
    """(busy, total) jiffies over all cores since boot."""
    with open("/proc/stat") as stat:
        values = [int(x) for x in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class CpuMeter:
    """Cores used by each named process (and by the whole machine) between start() and stop().

    `pids` maps a name to a pid or to a list of pids (summed); "bench" is this process (the client
    threads) and "load generator" the children it waited for (wrk, Python load processes)."""

    def __init__(self, pids):
        self.pids = {name: (p if isinstance(p, (list, tuple)) else [p]) for name, p in pids.items() if p}

    def _sample(self):
        import resource

        sample = {name: sum(process_cpu_seconds(p) or 0 for p in pids) for name, pids in self.pids.items()}
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample["bench"] = own.ru_utime + own.ru_stime
        sample["load generator"] = children.ru_utime + children.ru_stime
        return sample, machine_cpu(), time.monotonic()

    def start(self):
        self._start = self._sample()
        return self

    def stop(self):
        (before, (busy0, total0), t0), (after, (busy1, total1), t1) = self._start, self._sample()
        wall = t1 - t0
        cores = {name: round((after[name] - before[name]) / wall, 2) for name in after}
        cores = {name: value for name, value in cores.items() if value > 0.005}
        cores["machine busy"] = round((busy1 - busy0) / max(1, total1 - total0) * os.cpu_count(), 2)
        return cores
