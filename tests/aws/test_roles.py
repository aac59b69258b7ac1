"""The roles that configure the cluster's instances, run on this machine against a temporary root.

systemd is not PID 1 here: the units are checked with `systemd-analyze verify` and then run as
systemd would (their environment file, their ExecStart; for workers ExecStopPost too).
"""

import base64
import getpass
import hashlib
import http.server
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import urllib.request

import pytest

import fake_systemd
from aws_support import (Process, ansible_playbook, answers, clean_environment, http_get, recap, start_balancer,
                         stop_group)
from conftest import SERVICES, free_port, wait_until
from motoserver import MotoServer

LOCAL = ["-i", "localhost,", "-c", "local"]
INSTANCE_ID = "i-0123456789abcdef0"


def systemd_analyze_verify(unit_path):
    run = subprocess.run(["systemd-analyze", "verify", unit_path], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stderr == "", run.stdout + run.stderr


def build_bundle(path):
    run = subprocess.run([sys.executable, "-m", "dynamic_workload", "bundle", "--output", str(path)],
                         cwd=SERVICES, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return path.read_bytes()


SERVICE_PLAYBOOK = """
- name: Install one service
  hosts: localhost
  gather_facts: false
  roles:
    - role: cluster_service
"""


@pytest.mark.parametrize("service", ["endpoint", "balancer"])
def test_cluster_service_installs_a_service_that_runs(service, tmp_path):
    root = tmp_path / "root"
    token = secrets.token_hex(16)
    port = free_port()
    bundle = build_bundle(tmp_path / "dynamic_workload.pyz")
    state_dir = root / "var/lib/dynamic-workload"
    environment = {"DW_CLUSTER_NAME": "role-test", "DW_TOKEN": token}
    if service == "balancer":
        environment.update(DW_STATE_DIR=str(state_dir), DW_FLEET="local", DW_MAX_WORKERS="0")
    else:
        environment.update(DW_BALANCER_URL=f"http://127.0.0.1:{free_port()}")
    role_vars = {
        "ansible_python_interpreter": sys.executable,
        "cluster_service_name": service,
        "cluster_service_bundle": str(tmp_path / "dynamic_workload.pyz"),
        "cluster_service_environment": environment,
        "cluster_service_bind_address": "127.0.0.1",
        "cluster_service_port": port,
        "cluster_service_user": getpass.getuser(),
        "cluster_service_create_user": False,
        "cluster_service_packages": [],
        "cluster_service_python": sys.executable,
        "cluster_service_install_dir": str(root / "opt/dynamic-workload"),
        "cluster_service_config_dir": str(root / "etc/dynamic-workload"),
        "cluster_service_unit_dir": str(root / "etc/systemd/system"),
        "cluster_service_systemd": False,
    }
    if service == "balancer":
        # A virtual environment as the balancer gets one for boto3; pip itself needs no download.
        role_vars.update(cluster_service_pip_packages=["pip"], cluster_service_writable_dirs=[str(state_dir)])
    playbook = tmp_path / "service.yml"
    playbook.write_text(SERVICE_PLAYBOOK)

    code, output = ansible_playbook(str(playbook), role_vars, *LOCAL)
    assert code == 0, output
    assert recap(output)["changed"] > 0
    code, output = ansible_playbook(str(playbook), role_vars, *LOCAL)
    assert code == 0, output
    assert recap(output)["changed"] == 0, output

    unit_path = root / f"etc/systemd/system/dynamic-workload-{service}.service"
    env_path = root / f"etc/dynamic-workload/{service}.env"
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
    assert (root / "opt/dynamic-workload/dynamic_workload.pyz").read_bytes() == bundle
    systemd_analyze_verify(str(unit_path))
    unit = fake_systemd.parse_unit(str(unit_path))
    assert unit["Restart"] == ["always"]
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes"):
        key, value = hardening.split("=")
        assert unit[key] == [value]
    assert unit["User"] == [getpass.getuser()] and unit["EnvironmentFile"] == [str(env_path)]
    if service == "balancer":
        assert unit["ReadWritePaths"] == [str(state_dir)]
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert unit["ExecStart"][0].startswith(str(root / "opt/dynamic-workload/balancer-venv/bin/python") + " ")

    # The unit's own command line, with its environment file only, as systemd would start it.
    argv = fake_systemd.command_line(unit["ExecStart"][0], {})
    process = Process(argv, str(tmp_path / f"{service}.log"), env=fake_systemd.unit_environment(unit))
    try:
        wait_until(lambda: answers(port) or process.popen.poll() is not None, 20, 0.05, f"the {service}'s /healthz")
        assert process.popen.poll() is None, process.log()
        if service == "balancer":
            # What workers download: the balancer serves its own code, to the token only.
            assert http_get(port, "/bundle")[0] == 401
            assert http_get(port, "/bundle", {"Authorization": f"Bearer {token}"}) == (200, bundle)
    finally:
        process.stop()

    # Check mode sees a changed setting (on a host, the handler would restart the service) and
    # changes nothing.
    settings = env_path.read_bytes()
    role_vars["cluster_service_environment"] = dict(environment, DW_CLUSTER_NAME="renamed")
    code, output = ansible_playbook(str(playbook), role_vars, *LOCAL, "--check")
    assert code == 0, output
    assert recap(output)["changed"] == 1, output
    assert env_path.read_bytes() == settings


class FakeMetadataService(http.server.ThreadingHTTPServer):
    """IMDSv2 as an instance sees it: a session token by PUT, then metadata only with that token."""

    def __init__(self):
        self.token = secrets.token_hex(16)
        self.instance_id = None
        self.requests = []
        super().__init__(("127.0.0.1", 0), FakeMetadataHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class FakeMetadataHandler(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        self.server.requests.append(("PUT", self.path))
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self.answer(400, b"")
        self.answer(200, self.server.token.encode())

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            return self.answer(401, b"")
        if self.path != "/latest/meta-data/instance-id":
            return self.answer(404, b"")
        self.answer(200, self.server.instance_id.encode())

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


USER_DATA_PLAYBOOK = """
- name: Render the workers' user data as provisioning does
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Create or read the cluster token
      ansible.builtin.include_role:
        name: aws_cluster
        tasks_from: token
    - name: Render the user data
      ansible.builtin.include_role:
        name: aws_cluster
        tasks_from: user_data
    - name: Write it down
      ansible.builtin.copy:
        content: "{{ aws_cluster_worker_user_data }}"
        dest: "{{ user_data_path }}"
        mode: "0700"
"""


def contract_work(data, iterations):
    output = hashlib.sha512(data).digest()
    for _ in range(iterations - 1):
        output = hashlib.sha512(output).digest()
    return output.hex()


def test_worker_user_data_starts_a_worker_that_does_the_work_then_powers_off(tmp_path):
    """The scaler launches a worker from the template (EC2 in moto); its user data, run here with a
    fake metadata service and systemd, starts a worker that completes the job, idles, and powers off."""
    cluster, root, fakes = "user-data-test", tmp_path / "root", tmp_path / "fakes"
    local_dir = tmp_path / "local"
    local_dir.mkdir(mode=0o700)
    token = secrets.token_hex(20)
    (local_dir / "token").write_text(token + "\n")
    port = free_port()
    user_data, playbook = tmp_path / "user-data.sh", tmp_path / "user_data.yml"
    playbook.write_text(USER_DATA_PLAYBOOK)
    metadata = FakeMetadataService()
    threading.Thread(target=metadata.serve_forever, daemon=True).start()
    moto = balancer = None
    try:
        code, output = ansible_playbook(str(playbook), {
            "ansible_python_interpreter": sys.executable,
            "user_data_path": str(user_data),
            "aws_cluster_name": cluster,
            "aws_cluster_local_dir": str(local_dir),
            "aws_cluster_worker_idle_timeout": 2,
            "aws_cluster_worker_imds_url": metadata.url,
            "aws_cluster_worker_balancer_url": f"http://127.0.0.1:{port}",
            "aws_cluster_worker_python": sys.executable,
            "aws_cluster_worker_install_dir": str(root / "opt/dynamic-workload"),
            "aws_cluster_worker_config_dir": str(root / "etc/dynamic-workload"),
            "aws_cluster_worker_unit_dir": str(root / "etc/systemd/system"),
        }, *LOCAL)
        assert code == 0, output

        moto = MotoServer()
        ec2 = moto.client("ec2")
        image = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023.*-x86_64"]}])
        ec2.create_launch_template(LaunchTemplateName=f"{cluster}-worker", LaunchTemplateData={
            "ImageId": image["Images"][0]["ImageId"], "InstanceType": "t3.micro",
            "InstanceInitiatedShutdownBehavior": "terminate", "MetadataOptions": {"HttpTokens": "required"},
            "UserData": base64.b64encode(user_data.read_bytes()).decode()})
        balancer = start_balancer(tmp_path, port, token, cluster_name=cluster, fleet="ec2", aws_endpoint_url=moto.url,
                                  min_workers=0, max_workers=1, worker_boot_timeout=60, scaler_interval=0.2)

        data, iterations = os.urandom(100), 1000
        request = urllib.request.Request(f"http://127.0.0.1:{port}/jobs/user-data-job?iterations={iterations}",
                                         data=data, method="PUT", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 201

        def launched():
            found = ec2.describe_instances(Filters=[{"Name": "tag:dynamic-workload/cluster", "Values": [cluster]},
                                                   {"Name": "tag:dynamic-workload/role", "Values": ["worker"]}])
            return [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]
        [metadata.instance_id] = wait_until(launched, 20, 0.1, "the scaler to launch a worker")

        fake_systemd.install(str(fakes / "bin"))
        env = clean_environment(PATH=str(fakes / "bin") + os.pathsep + os.environ["PATH"],
                                FAKE_SYSTEMD_DIR=str(fakes), FAKE_UNIT_DIR=str(root / "etc/systemd/system"))
        run = subprocess.run(["bash", str(user_data)], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr

        def job():
            status, body = http_get(port, "/jobs/user-data-job", {"Authorization": f"Bearer {token}"})
            return json.loads(body) if status == 200 and json.loads(body)["status"] == "completed" else None
        assert wait_until(job, 30, 0.1, "the job to complete")["result"] == contract_work(data, iterations)
        # Idle for its timeout, the worker ends itself (exit 0), and its unit powers the instance off.
        wait_until(lambda: ["systemctl", "poweroff"] in fake_systemd.calls(str(fakes)), 30, 0.1, "the poweroff")
        assert launched() == [metadata.instance_id]  # one worker was enough
    finally:
        if (fakes / "unit.pid").exists():
            stop_group(int((fakes / "unit.pid").read_text()))
        for process in (balancer, moto):
            if process:
                process.stop()
        metadata.shutdown()
        metadata.server_close()

    started, ended = fake_systemd.unit_records(str(fakes))[:2]
    assert started["exec_start"][-3:] == ["worker", "--worker-id", metadata.instance_id]
    assert ended == {"exit_status": 0}
    calls = fake_systemd.calls(str(fakes))
    assert calls[0][:2] == ["dnf", "install"] and calls[0][-1] == "python3.11"
    assert ["useradd", "--system", "--no-create-home", "--shell", "/sbin/nologin", "dw-worker"] in calls
    assert calls[-3:] == [["systemctl", "daemon-reload"],
                          ["systemctl", "start", "--no-block", "dynamic-workload-worker.service"],
                          ["systemctl", "poweroff"]]
    # IMDSv2 only: a session token first, the instance id with it.
    assert metadata.requests == [("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/instance-id")]

    env_file = root / "etc/dynamic-workload/worker.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert f"DW_TOKEN={token}\n" in env_file.read_text()
    assert build_bundle(tmp_path / "expected.pyz") == (root / "opt/dynamic-workload/dynamic_workload.pyz").read_bytes()
    unit_path = root / "etc/systemd/system/dynamic-workload-worker.service"
    systemd_analyze_verify(str(unit_path))
    unit = fake_systemd.parse_unit(str(unit_path))
    assert unit["Restart"] == ["on-failure"] and unit["User"] == ["dw-worker"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"] and unit["PrivateTmp"] == ["yes"]
    # A worker that failed is restarted, never powered off.
    [stop_post] = unit["ExecStopPost"]
    subprocess.run(fake_systemd.command_line(stop_post, {}), env=dict(env, SERVICE_RESULT="exit-code"), timeout=10,
                   check=True)
    assert fake_systemd.calls(str(fakes)) == calls
