"""fire and teardown: idempotent, and teardown leaves no process and no state."""

import os

import pytest

from cluster import LocalCluster, recap
from conftest import wait_until
from dynamic_workload.fleets.local import process_start_time

pytestmark = pytest.mark.cluster


def test_fire_twice_changes_nothing_and_teardown_leaves_nothing(tmp_path):
    cluster = LocalCluster(tmp_path, cluster_min_workers=1)
    dry = recap(cluster.fire("--check"))
    assert dry["changed"] > 0 and dry["failed"] == 0
    assert not os.path.exists(cluster.state_dir), "check mode changed something"
    first = recap(cluster.fire())
    assert first["changed"] > 0 and first["failed"] == 0
    second = recap(cluster.fire())
    assert second["changed"] == 0, second
    assert recap(cluster.fire("--check"))["changed"] == 0
    assert "http://127.0.0.1:%d" % cluster.endpoint_port in cluster.fire()
    wait_until(lambda: cluster.worker_pids(), 10, message="the minimum worker")
    pids = cluster.processes()
    assert len(pids) >= 5  # supervisor, balancer, two endpoints, a worker
    assert os.stat(os.path.join(cluster.state_dir, "token")).st_mode & 0o777 == 0o600
    assert os.stat(os.path.join(cluster.state_dir, "cluster.env")).st_mode & 0o777 == 0o600

    down = recap(cluster.teardown())
    assert down["changed"] > 0
    assert [pid for pid in pids if process_start_time(pid) is not None] == []
    assert not os.path.exists(cluster.state_dir)
    again = recap(cluster.teardown())
    assert again["changed"] == 0 and again["failed"] == 0


def test_a_changed_setting_restarts_the_services(tmp_path):
    cluster = LocalCluster(tmp_path)
    cluster.fire()
    try:
        balancer = cluster.service_pid("dynamic_workload balancer")
        cluster.vars["cluster_max_workers"] = 7
        assert recap(cluster.fire())["changed"] > 0
        assert cluster.status()["max_workers"] == 7
        assert cluster.service_pid("dynamic_workload balancer") != balancer
    finally:
        cluster.teardown()


def test_fire_after_the_supervisor_was_killed_recovers(tmp_path):
    cluster = LocalCluster(tmp_path)
    cluster.fire()
    try:
        orphans = [pid for pid in cluster.processes() if pid != cluster.supervisor_pid()]
        cluster.kill(cluster.supervisor_pid())
        cluster.fire()  # ends the orphaned services, starts fresh ones on the same ports
        cluster.wait_healthy()
        assert all(process_start_time(pid) is None for pid in orphans)
        assert cluster.enqueue(b"after", 1).status == 201
    finally:
        cluster.teardown()
