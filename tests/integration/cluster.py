"""Fire and tear down the real local cluster with ansible-playbook, on ports of its own.

Each LocalCluster gets free ports and a state directory in a temporary folder, so the tests
never touch a cluster a developer fired with `make fire`.
"""

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import ROOT, free_port, wait_until

BIN = os.path.dirname(sys.executable)


def contract_work(buffer, iterations):
    output = hashlib.sha512(buffer).digest()
    for _ in range(iterations - 1):
        output = hashlib.sha512(output).digest()
    return output.hex()


def free_port_pair():
    """A port p such that p and p + 1 are both free."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def playbook(name, extra_vars, *options, timeout=180):
    """Run a playbook; returns (returncode, output)."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"],
               ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    run = subprocess.run(
        [os.path.join(BIN, "ansible-playbook"), f"playbooks/{name}", "-e", json.dumps(extra_vars), *options],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return run.returncode, run.stdout + run.stderr


def recap(output):
    """The PLAY RECAP counters of localhost, as a dict."""
    for line in output.splitlines():
        if line.startswith("localhost") and "ok=" in line:
            return {k: int(v) for k, v in (item.split("=") for item in line.split(":", 1)[1].split())}
    raise AssertionError("no PLAY RECAP in:\n" + output)


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(port, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return Answer(answer.status, answer.headers, answer.read())
    finally:
        conn.close()


class LocalCluster:
    def __init__(self, tmp_dir, **overrides):
        self.endpoint_port = free_port_pair()
        self.balancer_port = free_port()
        self.state_dir = os.path.join(str(tmp_dir), "state")
        self.vars = {
            "cluster_name": "test-" + os.path.basename(str(tmp_dir))[-20:].replace("_", "-"),
            "local_cluster_state_dir": self.state_dir,
            "local_cluster_endpoint_base_port": self.endpoint_port,
            "local_cluster_balancer_port": self.balancer_port,
            "local_cluster_scaler_interval": 0.2,
            "local_cluster_stop_grace": 5,
        }
        self.vars.update(overrides)

    @property
    def endpoints(self):
        return [self.endpoint_port, self.endpoint_port + 1]

    def fire(self, *options):
        code, output = playbook("fire.yml", self.vars, *options)
        if code != 0 and "--check" not in options:
            playbook("teardown.yml", self.vars)  # a half-fired cluster must not outlive the test
        assert code == 0, output
        return output

    def teardown(self):
        code, output = playbook("teardown.yml", self.vars)
        assert code == 0, output
        return output

    @property
    def token(self):
        with open(os.path.join(self.state_dir, "token")) as token:
            return token.read().strip()

    def supervisor_pid(self):
        with open(os.path.join(self.state_dir, "supervisor.pid")) as record:
            return int(record.read().split()[0])

    def processes(self):
        """Pids of every process of the cluster (its supervisor's process group)."""
        from dynamic_workload.supervisor import group_members

        pgid = self.supervisor_pid()
        return group_members(pgid)

    def service_pid(self, argv_fragment):
        for pid in self.processes():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if argv_fragment.encode() in cmdline.read().replace(b"\0", b" "):
                        return pid
            except OSError:
                continue
        return None

    def worker_pids(self):
        pids = {}
        workers_dir = os.path.join(self.state_dir, "workers")
        for name in os.listdir(workers_dir):
            if name.endswith(".pid"):
                try:
                    with open(os.path.join(workers_dir, name)) as record:
                        pids[name[:-4]] = int(record.read().split()[0])
                except (OSError, ValueError, IndexError):
                    continue
        return pids

    def kill(self, pid):
        os.kill(pid, signal.SIGKILL)

    # --- the public API ---------------------------------------------------------------------

    def enqueue(self, data, iterations, port=None, timeout=30):
        return request(port or self.endpoint_port, "PUT", f"/enqueue?iterations={iterations}", data,
                       {"Content-Type": "application/octet-stream"}, timeout=timeout)

    def completed(self, top=1000, port=None):
        answer = request(port or self.endpoint_port, "POST", f"/pullCompleted?top={top}")
        assert answer.status == 200, answer.body
        return answer.json()

    def status(self, port=None):
        answer = request(port or self.endpoint_port, "GET", "/status")
        assert answer.status == 200, answer.body
        return answer.json()

    def job(self, job_id, port=None):
        return request(port or self.endpoint_port, "GET", f"/jobs/{job_id}")

    def wait_healthy(self, timeout=15):
        def healthy():
            try:
                return all(request(p, "GET", "/healthz", timeout=2).status == 200
                           for p in self.endpoints + [self.balancer_port])
            except OSError:
                return False
        wait_until(healthy, timeout, 0.05, "every service to answer /healthz")

    def wait_completed(self, ids, timeout):
        ids = set(ids)

        def done():
            finished = {job["id"] for job in self.completed()}
            return ids <= finished
        wait_until(done, timeout, 0.1, f"{len(ids)} jobs to complete")
        return time.monotonic()
