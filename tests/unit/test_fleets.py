"""The fleet contract (fleets/__init__.py), run against every fleet implementation.

Each implementation joins through a harness in FLEETS: it builds fleets on one shared state,
checks independently whether a member's worker really exists, and knows how to make a worker
end on its own: the local fleet (worker processes) and the EC2 fleet against a real moto
server (instances launched from a launch template made there).
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from unit_support import FakeClock, wait_until
from dynamic_workload.config import Settings
from dynamic_workload.fleets import Fleet, Member
from dynamic_workload.fleets.local import LocalFleet
from motoserver import MotoServer, make_launch_template

SETTLE = 20  # seconds a fleet may take to show a change (a process start or exit)


def proc_state(pid):
    """(state letter, start time) of a process from /proc, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


class StubBalancer:
    """Answers every lease with no job (and no reason to stay), but only once `release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.worker_ids = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.worker_ids.append(self.headers.get("X-Worker-Id"))
                stub.release.wait(timeout=SETTLE)
                body = json.dumps({"jobs": [], "keep": False, "lease_seconds": 30}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class LocalFleetHarness:
    """The local fleet: workers are processes of this machine."""

    name = "local"
    clock_resolution = 0.0  # launched_at is the fleet's clock exactly

    def __init__(self, tmp_path, monkeypatch, clock):
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.clock = clock
        self.state_dir = tmp_path / "state"
        # Bound but never listening: a worker pointed here is refused at once and keeps retrying,
        # and no other test's server can take the port meanwhile.
        self._blackhole = socket.socket()
        self._blackhole.bind(("127.0.0.1", 0))
        self.unreachable_url = f"http://127.0.0.1:{self._blackhole.getsockname()[1]}"
        self.fleets = []
        self.processes = {}  # member id -> (pid, start time), read when the member is first seen
        self.stubs = []

    def new_fleet(self, balancer_url=None):
        """A fleet instance on the shared state, as a (re)started balancer would make it."""
        settings = Settings(state_dir=str(self.state_dir), balancer_url=balancer_url or self.unreachable_url)
        fleet = RecordingFleet(LocalFleet(settings, clock=self.clock), self)
        self.fleets.append(fleet)
        return fleet

    def fleet_whose_workers_end(self):
        """A fleet whose workers end themselves once `end()` is called (idle timeout, no job)."""
        stub = StubBalancer()
        self.stubs.append(stub)
        self.monkeypatch.setenv("DW_WORKER_IDLE_TIMEOUT", "0")
        return self.new_fleet(stub.url), stub.release.set

    def remember(self, member):
        path = self.state_dir / "workers" / f"{member.id}.pid"
        pid, start_time, _ = path.read_text().split()
        self.processes[member.id] = (int(pid), start_time.encode())

    def exists(self, member):
        pid, start_time = self.processes[member.id]
        state = proc_state(pid)
        return state is not None and state[0] != b"Z" and state[1] == start_time

    def close(self):
        for fleet in self.fleets:
            try:
                for member in fleet.members():
                    fleet.terminate(member.id)
            except Exception:  # noqa: BLE001  (the kill below still ends every process)
                pass
        for pid, start_time in self.processes.values():
            state = proc_state(pid)
            if state is not None and state[1] == start_time:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        for fleet in self.fleets:
            fleet.close()
        for stub in self.stubs:
            stub.close()
        self._blackhole.close()


class RecordingFleet(Fleet):
    """Passes every call through to the fleet under test, noting each launched member for cleanup."""

    def __init__(self, inner, harness):
        self.inner = inner
        self.harness = harness
        self.name = inner.name

    def launch(self):
        member = self.inner.launch()
        self.harness.remember(member)
        return member

    def members(self):
        return self.inner.members()

    def terminate(self, worker_id):
        return self.inner.terminate(worker_id)

    def check(self):
        return self.inner.check()

    def close(self):
        return self.inner.close()


class RealClock:
    """EC2 stamps LaunchTime itself, so the EC2 fleet is tested on the real clock."""

    def __call__(self):
        import time

        return time.time()


class Ec2MotoFleetHarness:
    """The EC2 fleet against a moto server: workers are instances launched from the template."""

    name = "ec2"
    clock_resolution = 1.0  # LaunchTime has whole seconds

    def __init__(self, tmp_path, monkeypatch, clock):
        self.clock = RealClock()
        self.moto = MotoServer()
        self.ec2 = self.moto.client("ec2")
        make_launch_template(self.ec2, "contract-worker")
        self.fleets = []

    def new_fleet(self):
        from dynamic_workload.fleets.ec2 import Ec2Fleet

        settings = Settings(cluster_name="contract", fleet="ec2", aws_endpoint_url=self.moto.url)
        fleet = Ec2Fleet(settings, self.clock, client=self.moto.client("ec2"))
        self.fleets.append(fleet)
        return fleet

    def fleet_whose_workers_end(self):
        """An instance 'ends itself' by an OS shutdown, which the template turns into terminate."""
        fleet = self.new_fleet()

        def end():
            for member in fleet.describe():
                self.ec2.terminate_instances(InstanceIds=[member.id])
        return fleet, end

    def exists(self, member):
        instance = self.ec2.describe_instances(InstanceIds=[member.id])["Reservations"][0]["Instances"][0]
        return instance["State"]["Name"] in ("pending", "running")

    def close(self):
        self.moto.stop()


FLEETS = [
    pytest.param(LocalFleetHarness, id="local"),
    pytest.param(Ec2MotoFleetHarness, id="ec2-moto"),
]


@pytest.fixture(params=FLEETS)
def harness(request, tmp_path, monkeypatch):
    harness = request.param(tmp_path, monkeypatch, FakeClock())
    yield harness
    harness.close()


def ids(members):
    return sorted(member.id for member in members)


class TestFleetContract:
    def test_a_launched_worker_is_listed_as_a_member(self, harness):
        fleet = harness.new_fleet()
        assert fleet.members() == []
        before = harness.clock()
        first = fleet.launch()
        assert isinstance(first, Member)
        assert before - harness.clock_resolution <= first.launched_at <= harness.clock()
        second = fleet.launch()
        assert second.id != first.id and second.launched_at >= first.launched_at
        assert harness.exists(first) and harness.exists(second)
        members = {member.id: member for member in fleet.members()}
        assert members == {first.id: first, second.id: second}

    def test_a_working_fleet_passes_its_check_without_launching(self, harness):
        fleet = harness.new_fleet()
        fleet.check()  # raises FleetError when the fleet can't launch
        assert fleet.members() == []

    def test_terminate_removes_the_member_and_stops_its_worker(self, harness):
        fleet = harness.new_fleet()
        doomed, kept = fleet.launch(), fleet.launch()
        fleet.terminate(doomed.id)
        assert ids(fleet.members()) == [kept.id]
        wait_until(lambda: not harness.exists(doomed), SETTLE, message="the terminated worker to be gone")
        assert harness.exists(kept)
        fleet.terminate(doomed.id)  # terminating again (it died meanwhile) is harmless
        assert ids(fleet.members()) == [kept.id]

    def test_a_new_fleet_instance_adopts_the_running_workers(self, harness):
        before = harness.new_fleet()
        first, second = before.launch(), before.launch()
        before.close()  # the balancer restarts: its workers keep running
        after = harness.new_fleet()
        assert {m.id: m for m in after.members()} == {first.id: first, second.id: second}
        after.terminate(first.id)
        assert ids(after.members()) == [second.id]
        wait_until(lambda: not harness.exists(first), SETTLE, message="the adopted worker to be terminated")
        assert harness.exists(second)

    def test_a_worker_that_ends_on_its_own_leaves_the_members(self, harness):
        fleet, end = harness.fleet_whose_workers_end()
        member = fleet.launch()
        assert ids(fleet.members()) == [member.id]
        end()
        wait_until(lambda: member.id not in ids(fleet.members()), SETTLE,
                   message="the worker that ended to leave members()")
        assert not harness.exists(member)


# --- the local fleet only ------------------------------------------------------------------


@pytest.fixture
def local(tmp_path, monkeypatch):
    harness = LocalFleetHarness(tmp_path, monkeypatch, FakeClock())
    yield harness
    harness.close()


def test_a_local_worker_reports_in_under_its_member_id(local):
    fleet, end = local.fleet_whose_workers_end()
    stub = local.stubs[-1]
    member = fleet.launch()
    wait_until(lambda: stub.worker_ids, SETTLE, message="the worker's first lease")
    assert stub.worker_ids[0] == member.id  # the scaler matches reports to members by this id
    end()


@pytest.fixture
def bystander():
    """A process of ours that a fleet must never touch."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait(timeout=10)


def test_a_record_whose_pid_was_reused_is_dropped_not_killed(local, bystander):
    fleet = local.new_fleet()
    pid_dir = local.state_dir / "workers"
    # A worker that died long ago; its pid now belongs to another process (other start time).
    (pid_dir / "local-recycled.pid").write_text(f"{bystander.pid} 1 {local.clock()}\n")
    (pid_dir / "local-garbage.pid").write_text("not a record\n")
    live = fleet.launch()
    assert ids(fleet.members()) == [live.id]
    assert not (pid_dir / "local-recycled.pid").exists()
    (pid_dir / "local-recycled.pid").write_text(f"{bystander.pid} 1 {local.clock()}\n")
    fleet.terminate("local-recycled")
    assert bystander.poll() is None  # still running
    assert ids(fleet.members()) == [live.id]


def test_a_record_of_a_finished_process_is_dropped(local):
    fleet = local.new_fleet()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, timeout=30)
    pid = int(finished.stdout)
    (local.state_dir / "workers" / "local-dead.pid").write_text(f"{pid} 12345 {local.clock()}\n")
    assert fleet.members() == []
    assert not (local.state_dir / "workers" / "local-dead.pid").exists()
