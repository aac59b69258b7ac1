"""The contract's dry run: the local services scale an emulated EC2 (moto) through the launch template.

`fire.yml -e cluster_fleet=ec2 -e aws_endpoint_url=URL` runs the same balancer with the EC2
fleet; it launches instances from `<cluster_name>-worker`, replaces those that never report
in, adopts those that do, and local teardown terminates what it launched.
"""

import os
import subprocess
import sys
import time

import pytest

from cluster import LocalCluster, contract_work
from conftest import SERVICES, wait_until
from motoserver import MotoServer, make_launch_template

pytestmark = pytest.mark.cluster

CLUSTER_TAG = "dynamic-workload/cluster"


@pytest.fixture
def moto():
    server = MotoServer()
    yield server
    server.stop()


def live_workers(ec2, cluster_name):
    reservations = ec2.describe_instances(Filters=[
        {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster_name]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ])["Reservations"]
    return [instance for r in reservations for instance in r["Instances"]]


def test_the_local_balancer_scales_an_emulated_ec2_and_teardown_terminates_it(tmp_path, moto, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(key, value)
    ec2 = moto.client("ec2")
    cluster = LocalCluster(tmp_path, cluster_fleet="ec2", aws_endpoint_url=moto.url, cluster_max_workers=2,
                           cluster_worker_boot_timeout=3)
    name = cluster.vars["cluster_name"]

    # Without the launch template, firing stops with a clear error instead of a useless cluster.
    from cluster import playbook
    code, output = playbook("fire.yml", cluster.vars)
    assert code != 0 and f"{name}-worker" in output
    make_launch_template(ec2, f"{name}-worker")

    # Another cluster's instance in the same account: never counted, never terminated.
    other = ec2.run_instances(ImageId=ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"],
                              MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                  {"Key": CLUSTER_TAG, "Value": "someone-else"},
                                  {"Key": "dynamic-workload/role", "Value": "worker"}]}])["Instances"][0]["InstanceId"]
    cluster.fire()
    worker = None
    try:
        data = os.urandom(50)
        enqueued = time.monotonic()
        job_id = cluster.enqueue(data, 100).json()["id"]
        first = wait_until(lambda: live_workers(ec2, name), 5, message="a run_instances call")
        to_first_launch = time.monotonic() - enqueued
        tags = {t["Key"]: t["Value"] for t in first[0]["Tags"]}
        assert tags[CLUSTER_TAG] == name and tags["dynamic-workload/role"] == "worker"
        assert "dynamic-workload/launched-at" in tags
        assert first[0]["ImageId"] and first[0]["InstanceType"] == "t3.micro"  # from the template

        # Play the instance's part: a worker process carrying its instance id reports in.
        env = dict(os.environ, PYTHONPATH=SERVICES, DW_TOKEN=cluster.token,
                   DW_BALANCER_URL=f"http://127.0.0.1:{cluster.balancer_port}", DW_WORKER_IDLE_TIMEOUT="60")
        instance_id = first[0]["InstanceId"]
        worker = subprocess.Popen([sys.executable, "-m", "dynamic_workload", "worker", "--worker-id", instance_id],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster.wait_completed([job_id], timeout=20)
        assert cluster.job(job_id).json()["result"] == contract_work(data, 100)
        wait_until(lambda: cluster.status()["workers_live"] == 1, 10, message="the instance to count as live")

        # A backlog: the cap (2) is reached and kept; the instances that never report in are
        # terminated after the boot timeout (3 s) and replaced, while the live one is kept.
        for n in range(6):
            cluster.enqueue(b"backlog %d" % n, 50_000_000)
        wait_until(lambda: len(live_workers(ec2, name)) == 2, 5, message="the cap of 2 instances")
        booting = {i["InstanceId"] for i in live_workers(ec2, name)} - {instance_id}
        terminated = wait_until(
            lambda: [i for i in booting if ec2.describe_instances(InstanceIds=[i])["Reservations"][0]
                     ["Instances"][0]["State"]["Name"] in ("shutting-down", "terminated")],
            15, message="a booting instance to be terminated after the boot timeout")
        assert terminated
        wait_until(lambda: len(live_workers(ec2, name)) == 2, 10, message="a replacement instance")
        for _ in range(20):  # observe a while: never above the cap
            assert len(live_workers(ec2, name)) <= 2
        assert instance_id in {i["InstanceId"] for i in live_workers(ec2, name)}
        status = cluster.status()
        assert status["fleet"] == "ec2" and status["workers"] <= 2
        print(f"\nfirst run_instances {to_first_launch:.2f} s after the first enqueue")
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        cluster.teardown()
    assert live_workers(ec2, name) == []
    assert [i["InstanceId"] for i in live_workers(ec2, "someone-else")] == [other]
