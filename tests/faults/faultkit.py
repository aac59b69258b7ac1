"""Fault-injection machinery shared by the tests in tests/faults/.

The real cluster comes from tests/integration/cluster.py (LocalCluster: ansible-playbook on free
ports, a state directory of its own). This module adds what breaking it takes: a cluster that is
always torn down, raw HTTP over sockets, streams of enqueueing clients that remember what was
acknowledged, the check that every acknowledged job completed once with the right result, a TCP
proxy that can cut a worker off from the balancer, a tmpfs for the state directory, /proc readings.

Everything a helper starts (threads, sockets, processes, mounts) is stopped by the helper's own
context manager or close(), so a failing test leaves nothing behind.
"""

import contextlib
import errno
import http.client
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
for _path in (os.path.join(TESTS, "integration"), TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from conftest import ROOT, SERVICES, free_port, wait_until  # noqa: E402
from cluster import LocalCluster, contract_work, request  # noqa: E402
from dynamic_workload.fleets.local import process_start_time  # noqa: E402
from dynamic_workload.supervisor import group_members  # noqa: E402

__all__ = ["ROOT", "SERVICES", "free_port", "wait_until", "LocalCluster", "contract_work", "request",
           "process_start_time", "group_members"]


def report(title, **figures):
    """Print a test's figures on one line, so that `pytest -s` shows them."""
    shown = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[figures] {title}: {shown}", flush=True)


# --- the cluster -------------------------------------------------------------------------------


@contextlib.contextmanager
def fired(tmp_dir, **overrides):
    """A LocalCluster fired with `overrides`, torn down afterwards whatever happened.

    Before teardown every process of the cluster gets SIGCONT (a test may have stopped one);
    if teardown fails, the supervisor's process group is killed and the state removed.
    """
    cluster = LocalCluster(tmp_dir, **overrides)
    cluster.state_dir = cluster.vars["local_cluster_state_dir"]
    try:
        cluster.fire()
        yield cluster
    finally:
        pgid = None
        with contextlib.suppress(OSError, ValueError):
            pgid = cluster.supervisor_pid()
        if pgid is not None:
            for pid in group_members(pgid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)
        try:
            cluster.teardown()
        except BaseException:
            if pgid is not None:
                for pid in group_members(pgid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            shutil.rmtree(cluster.state_dir, ignore_errors=True)
            raise


def balancer_pid(cluster):
    return cluster.service_pid("dynamic_workload balancer")


def endpoint_pid(cluster, index):
    return cluster.service_pid(f"--port {cluster.endpoints[index]}")


def wait_restarted(cluster, old_pid, fragment, timeout=15):
    """Wait for the supervisor to replace `old_pid` (a service matched by `fragment`); returns the new pid."""
    return wait_until(lambda: (lambda pid: pid if pid not in (None, old_pid) else None)(cluster.service_pid(fragment)),
                      timeout, message=f"the supervisor to restart {fragment!r}")


def healthy(port, timeout=2):
    try:
        return request(port, "GET", "/healthz", timeout=timeout).status == 200
    except OSError:
        return False


def balancer(cluster, method, path, body=None, headers=None, token=True, timeout=30):
    """A request to the balancer, with the cluster's token unless token=False."""
    all_headers = {"Authorization": f"Bearer {cluster.token}"} if token else {}
    all_headers.update(headers or {})
    return request(cluster.balancer_port, method, path, body, all_headers, timeout=timeout)


def db_rows(cluster, sql, params=()):
    """Read the balancer's job database directly (read-only queries; WAL lets readers in)."""
    conn = sqlite3.connect(os.path.join(cluster.state_dir, "jobs.db"), timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def job_row(cluster, job_id):
    """(state, attempts, worker_id) of a job, straight from the database."""
    rows = db_rows(cluster, "SELECT state, attempts, worker_id FROM jobs WHERE id = ?", (job_id,))
    return rows[0] if rows else None


def log_text(cluster):
    """Every log file of the cluster, concatenated: {name: text}."""
    logs = {}
    log_dir = os.path.join(cluster.state_dir, "logs")
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name), "rb") as log:
            logs[name] = log.read().decode("utf-8", "replace")
    return logs


def log_events(cluster, name, event=None):
    """The JSON records of one log file (optionally only those of one event)."""
    records = []
    for line in log_text(cluster).get(name, "").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if event is None or record.get("event") == event:
                records.append(record)
    return records


# --- /proc ---------------------------------------------------------------------------------------


def rss_kib(pid):
    """Resident set size of `pid` in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as record:
            return record.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def service_name(cluster, pid):
    """What a process of the cluster is: supervisor, balancer, endpoint-N or worker."""
    line = cmdline(pid)
    if "supervise" in line or pid == cluster.supervisor_pid():
        return "supervisor"
    if "dynamic_workload balancer" in line:
        return "balancer"
    if "dynamic_workload worker" in line:
        return "worker"
    for index, port in enumerate(cluster.endpoints):
        if f"--port {port}" in line:
            return f"endpoint-{index}"
    return line[:40] or str(pid)


# --- the public API under stress -------------------------------------------------------------


def percentile(values, fraction):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class EnqueueStream:
    """Client threads that enqueue jobs and remember exactly what was acknowledged.

    Client n sends to endpoint n % 2 (or to `ports`), at most `rate` enqueues per second each,
    until stop(). Each job's data is unique; every `long_every`-th job (at random) gets
    `long_iterations` so that workers are busy mid-job at random moments.
    """

    def __init__(self, cluster, clients=4, iterations=2000, rate=30.0, ports=None, long_every=0,
                 long_iterations=0, tag="stream", seed=None, timeout=40):
        self.cluster = cluster
        self.ports = ports or cluster.endpoints
        self.iterations = iterations
        self.rate = rate
        self.long_every = long_every
        self.long_iterations = long_iterations
        self.tag = tag
        self.timeout = timeout
        self.random = random.Random(seed)
        self.acknowledged = {}  # id -> (data, iterations)
        self.answers = {}  # status (or error name) -> count
        self.failures = []  # (port, what) for answers that are neither 2xx nor an expected refusal
        self.errors_by_port = {port: 0 for port in self.ports}
        self.latencies = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]
        self._sent = 0

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def _client(self, number):
        port = self.ports[number % len(self.ports)]
        rng = random.Random(self.random.random())
        n = 0
        while not self._stop.is_set():
            began = time.monotonic()
            iterations = self.iterations
            if self.long_every and rng.randrange(self.long_every) == 0:
                iterations = self.long_iterations
            data = f"{self.tag} client {number} job {n} {os.urandom(6).hex()}".encode()
            n += 1
            try:
                answer = self.cluster.enqueue(data, iterations, port=port, timeout=self.timeout)
                status = answer.status
            except (OSError, http.client.HTTPException) as error:
                status = type(error).__name__
                with self.lock:
                    self.errors_by_port[port] += 1
                answer = None
            elapsed = time.monotonic() - began
            with self.lock:
                self._sent += 1
                self.answers[status] = self.answers.get(status, 0) + 1
                if answer is not None:
                    self.latencies.append(elapsed)
                    if status in (200, 201):
                        self.acknowledged[answer.json()["id"]] = (data, iterations)
                    elif status not in (429, 503, 507):
                        self.failures.append((port, status, answer.body[:200]))
                    elif "Retry-After" not in answer.headers:
                        self.failures.append((port, status, "no Retry-After"))
            if answer is None:
                self._stop.wait(0.05)  # the endpoint is away: don't spin
            else:
                self._stop.wait(max(0.0, 1.0 / self.rate - elapsed))

    @property
    def sent(self):
        return self._sent

    def count(self):
        with self.lock:
            return len(self.acknowledged)

    def stop(self, timeout=60):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def completed_index(cluster, port=None):
    """pullCompleted?top=1000 as a list of ids (newest first) and a dict id -> result."""
    items = cluster.completed(top=1000, port=port)
    return [item["id"] for item in items], {item["id"]: item["result"] for item in items}


def check_all_completed_once(cluster, acknowledged, timeout, verify=None):
    """Wait until every acknowledged job completed; check it is listed once with the right result.

    `acknowledged` is {id: (data, iterations)}. `verify` limits the hashlib check to that many
    jobs picked at random (all by default). Returns the figures: acknowledged, lost, duplicated,
    wrong, verified.
    """
    ids = set(acknowledged)
    deadline = time.monotonic() + timeout
    missing = ids
    while time.monotonic() < deadline:
        listed, _ = completed_index(cluster)
        missing = ids - set(listed)
        if not missing:
            break
        # Beyond the newest 1000 completions, ask for the jobs one by one.
        if len(missing) < 200 and len(listed) == 1000:
            missing = {i for i in missing if cluster.job(i).json().get("status") != "completed"}
            if not missing:
                break
        time.sleep(0.2)
    listed, results = completed_index(cluster)
    duplicated = len(listed) - len(set(listed))
    failed = {}
    for job_id in missing:
        answer = cluster.job(job_id)
        failed[job_id] = answer.json() if answer.status == 200 else answer.status
    chosen = sorted(ids - set(missing))
    if verify is not None and verify < len(chosen):
        chosen = random.Random(1).sample(chosen, verify)
    wrong = []
    for job_id in chosen:
        result = results.get(job_id)
        if result is None:
            result = cluster.job(job_id).json().get("result")
        data, iterations = acknowledged[job_id]
        if result != contract_work(data, iterations):
            wrong.append(job_id)
    figures = {"acknowledged": len(ids), "lost": len(missing), "duplicated": duplicated,
               "wrong": len(wrong), "verified": len(chosen)}
    assert not missing, f"{len(missing)} acknowledged jobs never completed, e.g. {list(failed.items())[:3]}"
    assert duplicated == 0, "pullCompleted listed an id twice"
    assert not wrong, f"{len(wrong)} results differ from hashlib's chain, e.g. {wrong[:3]}"
    return figures


# --- raw HTTP ----------------------------------------------------------------------------------


class RawResponse:
    def __init__(self, status, reason, headers, body, raw_head):
        self.status, self.reason, self.headers, self.body, self.raw_head = status, reason, headers, body, raw_head

    def __repr__(self):
        return f"<{self.status} {self.reason} {self.body[:120]!r}>"


class NoAnswer(Exception):
    """The server closed the connection (or went silent) before a whole answer arrived."""


def _read_until(sock, buffer, marker, deadline):
    while marker not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoAnswer(f"timed out; got {bytes(buffer[:200])!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise NoAnswer(f"timed out; got {bytes(buffer[:200])!r}") from None
        except ConnectionResetError:
            raise NoAnswer(f"reset; got {bytes(buffer[:200])!r}") from None
        if not chunk:
            raise NoAnswer(f"closed; got {bytes(buffer[:200])!r}")
        buffer += chunk


def read_raw_response(sock, buffer, deadline, head_request=False):
    """One whole answer from `sock` (interim 1xx answers skipped); consumes it from `buffer`."""
    while True:
        _read_until(sock, buffer, b"\r\n\r\n", deadline)
        end = buffer.index(b"\r\n\r\n")
        head = bytes(buffer[:end])
        del buffer[:end + 4]
        lines = head.split(b"\r\n")
        match = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) ?(.*)", lines[0])
        if not match:
            raise AssertionError(f"not an HTTP status line: {lines[0]!r}")
        status = int(match.group(1))
        headers = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            continue
        length = int(headers.get("content-length", "0"))
        if head_request:
            length = 0
        while len(buffer) < length:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer("timed out in the body")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError) as error:
                raise NoAnswer(f"{error!r} after {len(buffer)} of {length} body bytes") from None
            if not chunk:
                raise NoAnswer(f"closed after {len(buffer)} of {length} body bytes")
            buffer += chunk
        body = bytes(buffer[:length])
        del buffer[:length]
        return RawResponse(status, match.group(2).decode("latin-1"), headers, body, head)


def raw_exchange(port, pieces, timeout=10.0, delay=0.0, half_close=False, expect=1, head_request=False):
    """Send `pieces` (bytes, or a list of bytes sent `delay` s apart) on a fresh connection.

    Returns up to `expect` answers read back. If the server closes early, returns what came (a
    list shorter than `expect`); `half_close` shuts the sending side after the last piece.
    """
    if isinstance(pieces, (bytes, bytearray)):
        pieces = [bytes(pieces)]
    deadline = time.monotonic() + timeout
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for index, piece in enumerate(pieces):
                if index and delay:
                    time.sleep(delay)
                sock.sendall(piece)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before reading everything: read its answer
        buffer = bytearray()
        try:
            for _ in range(expect):
                answers.append(read_raw_response(sock, buffer, deadline, head_request))
        except NoAnswer as error:
            if time.monotonic() >= deadline:
                raise AssertionError(f"no answer within {timeout} s ({error}); got {answers}") from None
    return answers


# --- a worker of the test's own, behind a proxy it can cut ---------------------------------------


class FaultProxy:
    """A TCP proxy in front of the balancer that the test can cut and restore.

    forward: bytes pass both ways, and both directions are kept (bounded) for inspection.
    cut: every new connection has its request head read, logged with its time, and is then
    closed without an answer (what a client sees when the path to the server breaks); every
    connection open at the cut is closed too.
    """

    def __init__(self, target_port):
        self.target_port = target_port
        self.cut = False
        self.refused = []  # (monotonic time, request line) of requests that met the cut
        self.forwarded = []  # [client bytes, server bytes] per forwarded connection
        self._lock = threading.Lock()
        self._open = set()
        self._closing = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._closing.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.1)
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        if self.cut:
            self._refuse(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()
            return
        record = [bytearray(), bytearray()]
        with self._lock:
            self.forwarded.append(record)
            self._open.update((client, upstream))
        pair = {client: (upstream, record[0]), upstream: (client, record[1])}
        try:
            while not self._closing.is_set() and not self.cut:
                ready, _, _ = select.select(list(pair), [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    other, kept = pair[sock]
                    if len(kept) < 1 << 20:
                        kept += data[:4096]
                    other.sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(upstream)
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _refuse(self, client):
        head = b""
        client.settimeout(2)
        try:
            while b"\r\n" not in head and len(head) < 8192:
                chunk = client.recv(8192)
                if not chunk:
                    break
                head += chunk
        except OSError:
            pass
        with self._lock:
            self.refused.append((time.monotonic(), head.split(b"\r\n", 1)[0].decode("latin-1")))
        with contextlib.suppress(OSError):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # with SO_LINGER 0: a reset, as from a broken path

    def set_cut(self, cut):
        self.cut = cut

    def requests(self):
        """Request lines, and whether each result carried was recorded, seen through the connections."""
        lines, bodies = [], []
        with self._lock:
            records = [(bytes(a), bytes(b)) for a, b in self.forwarded]
        for sent, received in records:
            lines += [m.decode("latin-1") for m in re.findall(rb"(?:GET|POST|PUT) \S+ HTTP/1\.1", sent)]
            # A result rides on the worker's next lease; its answer says {"recorded": [true|false]}.
            bodies += ['{"recorded": %s}' % m.decode() for m in re.findall(rb'"recorded": \[(true|false)\]', received)]
        return lines, bodies

    def close(self):
        self._closing.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.close()


def cluster_env(cluster):
    """The services' environment as the supervisor gives it (cluster.env, the package on PYTHONPATH)."""
    env = dict(os.environ)
    with open(os.path.join(cluster.state_dir, "cluster.env")) as lines:
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip().strip('"')
    env["PYTHONPATH"] = SERVICES
    return env


class OwnWorker:
    """The real worker program, started by the test (its own session), reaching the balancer at `port`."""

    def __init__(self, cluster, worker_id, port, log_path):
        env = cluster_env(cluster)
        env["DW_BALANCER_URL"] = f"http://127.0.0.1:{port}"
        self.worker_id = worker_id
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dynamic_workload", "worker", "--worker-id", worker_id],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env, close_fds=True,
            start_new_session=True)

    def log(self):
        with open(self.log_path, "rb") as log:
            return log.read().decode("utf-8", "replace")

    def stop(self):
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


# --- a filesystem that fills up or turns read-only ------------------------------------------------


class Tmpfs:
    """A small tmpfs mounted at `path` (root only): fill(), free(), read_only(); close() unmounts it."""

    def __init__(self, path, size):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", self.path],
                       check=True, capture_output=True, timeout=10)
        self.filler = os.path.join(self.path, "filler")

    def fill(self):
        """Take every free byte; returns how many were taken."""
        written = 0
        chunk = b"\0" * 65536
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    count = os.write(fd, chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
                if count == 0:
                    break
                written += count
        finally:
            os.close(fd)
        return written

    def free(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.filler)

    def read_only(self, flag):
        option = "remount,ro" if flag else "remount,rw"
        for _ in range(20):  # a process may be closing a file there: busy for a moment
            run = subprocess.run(["mount", "-o", option, self.path], capture_output=True, timeout=10)
            if run.returncode == 0:
                return
            time.sleep(0.1)
        if run.returncode:
            raise AssertionError(f"mount -o {option} {self.path}: {run.stderr.decode().strip()}; "
                                 f"open for writing there: {self.writers()}")

    def writers(self):
        """(pid, command, file) of the files open for writing on this filesystem."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if not target.startswith(self.path + "/"):
                        continue
                    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                        flags = int(info.read().split("flags:")[1].split()[0], 8)
                    if flags & (os.O_WRONLY | os.O_RDWR):
                        found.append((int(pid), cmdline(int(pid))[:60], target))
            except (OSError, IndexError, ValueError):
                continue
        return found

    def close(self):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.read_only(False)
        self.free()
        for _ in range(50):
            run = subprocess.run(["umount", self.path], capture_output=True, timeout=10)
            if run.returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", self.path], capture_output=True, timeout=10)
