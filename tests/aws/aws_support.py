"""What the AWS tests share: ansible-playbook runs, an environment for AWS calls, processes they stop.

AWS credentials exist only in the environment given to the processes a test starts (dummy
values); nothing reads the developer's AWS configuration, and nothing contacts an address but
127.0.0.1 (the instance metadata service is disabled for boto3).
"""

import http.client
import json
import os
import signal
import subprocess
import sys

from conftest import ROOT, SERVICES, wait_until

BIN = os.path.dirname(sys.executable)


def clean_environment(**extra):
    """os.environ without any AWS setting, plus the venv's tools first on PATH and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PATH=BIN + os.pathsep + os.environ["PATH"], ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_ROLES_PATH=os.path.join(ROOT, "roles"))
    env.update(extra)
    return env


def aws_environment():
    """Dummy credentials, and no AWS configuration file or metadata service to fall back on."""
    return clean_environment(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                             AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                             AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)


def ansible_playbook(playbook, extra_vars, *options, inventory=None, env=None, timeout=100):
    """Run ansible-playbook from the repository; returns (returncode, output)."""
    argv = [os.path.join(BIN, "ansible-playbook"), playbook, "-e", json.dumps(extra_vars), *options]
    if inventory:
        argv[2:2] = ["-i", inventory]
    run = subprocess.run(argv, cwd=ROOT, env=env or clean_environment(), capture_output=True, text=True,
                         timeout=timeout)
    return run.returncode, run.stdout + run.stderr


def recap(output, host="localhost"):
    """The PLAY RECAP counters of `host`, as a dict."""
    for line in output.splitlines():
        if line.startswith(host + " ") and "ok=" in line:
            return {k: int(v) for k, v in (item.split("=") for item in line.split(":", 1)[1].split())}
    raise AssertionError("no PLAY RECAP in:\n" + output)


def http_get(port, path, headers=None, timeout=5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def answers(port, path="/healthz"):
    try:
        return http_get(port, path, timeout=2)[0] == 200
    except OSError:
        return False


class Process:
    """A background process in its own process group, with its output in a log file; stop() ends
    the whole group."""

    def __init__(self, argv, log_path, env=None, cwd=None):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def log(self):
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def stop(self):
        stop_group(self.popen.pid, reap=self.popen.poll)
        self.popen.wait(timeout=5)


def stop_group(pgid, grace=5, reap=lambda: None):
    """SIGTERM a process group, SIGKILL whatever is left after `grace` seconds. `reap` collects
    the leader if it is our child (a zombie still counts as a member of its group)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def gone():
        reap()
        try:
            os.killpg(pgid, 0)
            return False
        except ProcessLookupError:
            return True
    try:
        wait_until(gone, grace, 0.05, f"process group {pgid} to end")
    except AssertionError:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_balancer(tmp_dir, port, token, **settings):
    """The balancer from the source tree on `port` (local fleet unless told); returns its Process."""
    env = aws_environment()
    env.update(PYTHONPATH=SERVICES, DW_TOKEN=token, DW_STATE_DIR=os.path.join(str(tmp_dir), "state"), DW_FLEET="local")
    env.update({f"DW_{k.upper()}": str(v) for k, v in settings.items()})
    process = Process([sys.executable, "-m", "dynamic_workload", "balancer", "--host", "127.0.0.1",
                       "--port", str(port)], os.path.join(str(tmp_dir), "balancer.log"), env=env)
    try:
        wait_until(lambda: answers(port) or process.popen.poll() is not None, 15, 0.05, "the balancer")
        assert process.popen.poll() is None, process.log()
    except BaseException:
        process.stop()
        raise
    return process
