"""The command-line client end to end against a local cluster."""

import json
import os
import subprocess
import sys

import pytest

from cluster import LocalCluster, contract_work
from conftest import SERVICES, free_port

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("cli"), cluster_max_workers=1)
    cluster.fire()
    yield cluster
    cluster.teardown()


def cli(*args, url=None, env_url=None):
    env = dict(os.environ, PYTHONPATH=SERVICES)
    env.pop("DYNAMIC_WORKLOAD_URL", None)
    if env_url:
        env["DYNAMIC_WORKLOAD_URL"] = env_url
    command = [sys.executable, "-m", "dynamic_workload"] + (["--url", url] if url else []) + list(args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_submit_and_wait_prints_the_result_with_progress(cluster, tmp_path):
    path = tmp_path / "input"
    path.write_bytes(os.urandom(200))
    run = cli("submit", str(path), "--iterations", "200000", "--wait", url=f"http://127.0.0.1:{cluster.endpoint_port}")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["result"] == contract_work(path.read_bytes(), 200000)
    assert "submitted" in run.stderr and "completed" in run.stderr


def test_submit_then_results_and_status(cluster, tmp_path):
    path = tmp_path / "input"
    path.write_bytes(b"some bytes")
    url = f"http://127.0.0.1:{cluster.endpoint_port + 1}"
    run = cli("submit", str(path), "--iterations", "3", env_url=url)
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    cluster.wait_completed([job_id], timeout=30)
    listed = cli("results", "--top", "5", env_url=url)
    assert listed.returncode == 0
    assert f"{job_id}  {contract_work(b'some bytes', 3)}" in listed.stdout.splitlines()
    status = cli("status", env_url=url)
    assert status.returncode == 0
    for label in ("queued", "running", "completed", "failed", "workers", "fleet      local"):
        assert label in status.stdout


def test_watch_refreshes(cluster):
    run = cli("watch", "--count", "2", "--interval", "0.1", url=f"http://127.0.0.1:{cluster.endpoint_port}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("dynamic-workload at") == 2
    assert "completions/s" in run.stdout


def test_clear_errors(cluster, tmp_path):
    down = cli("status", url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert "cannot reach the cluster" in down.stderr and "make fire" in down.stderr
    path = tmp_path / "input"
    path.write_bytes(b"x")
    refused = cli("submit", str(path), "--iterations", "0", url=f"http://127.0.0.1:{cluster.endpoint_port}")
    assert refused.returncode == 1
    assert "400" in refused.stderr and "iterations" in refused.stderr
    missing = cli("submit", str(tmp_path / "nope"), "--iterations", "1", url=f"http://127.0.0.1:{cluster.endpoint_port}")
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    assert cli("frobnicate").returncode == 2
