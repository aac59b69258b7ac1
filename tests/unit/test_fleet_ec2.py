"""The EC2 fleet and the scaler on it, against a real moto server (issue: the scaler's EC2 fleet).

The scaler runs on a clock that is real time plus an offset the test advances, because EC2
(moto) stamps each instance's LaunchTime with the real time. API errors are injected with a
botocore before-call hook, which answers chosen calls with an error as the EC2 API would,
while every other call goes to moto.
"""

import time
import types

import pytest

from dynamic_workload.config import Settings
from dynamic_workload.fleets import FleetError
from dynamic_workload.fleets.ec2 import CLUSTER_TAG, ROLE_TAG, Ec2Fleet
from dynamic_workload.scaler import Scaler, WorkerRegistry
from dynamic_workload.store import Store
from motoserver import MotoServer, make_launch_template

CLUSTER = "fleet-test"


class ShiftedClock:
    """Real time plus an offset: advance() moves it forward without sleeping."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset

    def advance(self, seconds):
        self.offset += seconds


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def ec2(moto):
    moto.reset()
    client = moto.client("ec2")
    make_launch_template(client, f"{CLUSTER}-worker")
    return client


def settings(moto, **overrides):
    values = dict(cluster_name=CLUSTER, fleet="ec2", aws_endpoint_url=moto.url, max_workers=3,
                  worker_boot_timeout=60, worker_lost_timeout=60, target_wait_seconds=5)
    values.update(overrides)
    return Settings(**values)


class Calls:
    """Records EC2 API calls and answers chosen ones with an error instead of sending them."""

    def __init__(self, client):
        self.made = []
        self.failures = {}  # operation name -> list of error codes to answer, in order
        client.meta.events.register("provide-client-params.ec2.*", self._record)
        client.meta.events.register("before-call.ec2.*", self._before_call)

    def fail(self, operation, *codes):
        self.failures.setdefault(operation, []).extend(codes)

    def count(self, operation):
        return sum(1 for name, _ in self.made if name == operation)

    def _record(self, params, model, **kwargs):
        self.made.append((model.name, dict(params)))

    def _before_call(self, model, **kwargs):
        pending = self.failures.get(model.name)
        if pending:
            code = pending.pop(0)
            response = types.SimpleNamespace(status_code=503 if code == "RequestLimitExceeded" else 400,
                                             headers={}, text="", content=b"")
            return response, {"Error": {"Code": code, "Message": f"injected {code}"},
                              "ResponseMetadata": {"HTTPStatusCode": response.status_code}}
        return None


@pytest.fixture
def make(moto, ec2, tmp_path):
    """Builds (scaler, fleet, calls) on one store, as a (re)started balancer would."""
    clock = ShiftedClock()
    store = Store(tmp_path / "jobs.db", clock=clock)
    made = []

    def build(**overrides):
        config = settings(moto, **overrides)
        client = moto.client("ec2")
        calls = Calls(client)
        fleet = Ec2Fleet(config, clock, client=client)
        registry = WorkerRegistry(clock)
        scaler = Scaler(store, fleet, config, registry, clock)
        made.append(scaler)
        return scaler, fleet, calls

    build.clock = clock
    build.store = store
    yield build
    store.close()


def live(ec2, cluster=CLUSTER):
    pages = ec2.describe_instances(Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]},
                                            {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return {i["InstanceId"]: i for r in pages["Reservations"] for i in r["Instances"]}


def enqueue(store, count, iterations=1000):
    for n in range(count):
        store.enqueue(f"job-{n}", iterations, b"data %d" % n)


def test_a_launch_uses_the_template_one_instance_per_call_with_the_clusters_tags(moto, ec2):
    client = moto.client("ec2")
    calls = Calls(client)
    fleet = Ec2Fleet(settings(moto), time.time, client=client)
    member = fleet.launch()
    (name, params), = calls.made
    assert name == "RunInstances"
    assert params["LaunchTemplate"] == {"LaunchTemplateName": f"{CLUSTER}-worker", "Version": "$Latest"}
    assert params["MinCount"] == params["MaxCount"] == 1
    assert "IamInstanceProfile" not in params and "ImageId" not in params  # all from the template
    instance = live(ec2)[member.id]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags[CLUSTER_TAG] == CLUSTER and tags[ROLE_TAG] == "worker" and tags["Name"] == f"{CLUSTER}-worker"
    assert tags["dynamic-workload/launched-at"].endswith("Z")
    assert instance["InstanceType"] == "t3.micro"
    assert {s["ResourceType"] for s in params["TagSpecifications"]} == {"instance", "volume"}


def test_a_backlog_launches_up_to_the_cap_in_one_tick_and_booting_workers_count(make, ec2):
    scaler, fleet, calls = make(max_workers=3)
    enqueue(make.store, 10)
    decision = scaler.tick()
    assert decision.launch == 3 and len(live(ec2)) == 3
    for _ in range(10):  # the instances boot; nothing more is launched meanwhile
        make.clock.advance(0.5)
        scaler.tick()
    assert calls.count("RunInstances") == 3
    assert len(live(ec2)) == 3
    assert (scaler.live, scaler.booting) == (0, 3)
    assert calls.count("DescribeInstances") <= 3  # described every few seconds, not every tick


def test_workers_that_never_report_in_are_terminated_and_replaced_reporters_are_kept(make, ec2):
    scaler, fleet, calls = make(max_workers=2, worker_boot_timeout=30)
    enqueue(make.store, 5)
    scaler.tick()
    first, second = sorted(live(ec2))
    scaler.registry.seen(first)  # its worker's first request carries the instance id
    make.clock.advance(31)
    scaler.tick()
    instances = live(ec2)
    assert first in instances and second not in instances
    assert len(instances) == 2  # replaced in the same tick
    assert scaler.terminations_total == 1
    assert (scaler.live, scaler.booting) == (1, 1)


def test_a_lost_worker_is_terminated(make, ec2):
    scaler, fleet, calls = make(max_workers=1, worker_lost_timeout=20)
    enqueue(make.store, 1)
    scaler.tick()
    (instance_id,) = live(ec2)
    scaler.registry.seen(instance_id)
    make.store.lease(instance_id, 300)
    make.clock.advance(21)
    scaler.tick()
    assert instance_id not in live(ec2)
    assert make.store.get("job-0")["status"] == "queued"  # its job went back at once


def test_a_restarted_balancer_adopts_the_fleet_without_doubling_it(make, ec2):
    scaler, fleet, calls = make(max_workers=3, worker_boot_timeout=30)
    enqueue(make.store, 10)
    scaler.tick()
    launched = set(live(ec2))
    make.clock.advance(25)
    # The balancer restarts (kill -9): a new scaler and fleet on the same database.
    again, fleet_again, calls_again = make(max_workers=3, worker_boot_timeout=30)
    again.tick()
    assert calls_again.count("RunInstances") == 0
    assert set(live(ec2)) == launched
    assert again.booting == 3
    # Adopted workers get a full boot timeout from the restart to report in again.
    make.clock.advance(10)
    for instance_id in launched:
        again.registry.seen(instance_id)
    again.tick()
    assert (again.live, again.booting) == (3, 0)
    assert set(live(ec2)) == launched


@pytest.mark.parametrize("code", ["RequestLimitExceeded", "InsufficientInstanceCapacity",
                                  "InstanceLimitExceeded", "VcpuLimitExceeded"])
def test_api_errors_back_off_exponentially_then_recover(make, ec2, code):
    scaler, fleet, calls = make(max_workers=2)
    enqueue(make.store, 4)
    calls.fail("RunInstances", code, code, code)
    gaps = []
    last_attempt = make.clock()
    while calls.count("RunInstances") < 4:
        attempts = calls.count("RunInstances")
        scaler.tick()
        if calls.count("RunInstances") > attempts:
            gaps.append(make.clock() - last_attempt)
            last_attempt = make.clock()
            if calls.count("RunInstances") <= 3:
                assert code in scaler.fleet_error
        make.clock.advance(0.1)
        assert make.clock.offset < 60, "no recovery"
    # Three refusals: waits of about 1, 2 and 4 s (jittered down to half), never a storm.
    assert 0.5 <= gaps[1] <= 1.1 and 1.0 <= gaps[2] <= 2.1 and 2.0 <= gaps[3] <= 4.1, gaps
    scaler.tick()
    assert scaler.fleet_error is None
    assert len(live(ec2)) == 2
    assert scaler.fleet_errors_total == 3


def test_an_unreachable_api_backs_off_without_crashing(moto, tmp_path):
    clock = ShiftedClock()
    store = Store(tmp_path / "jobs.db", clock=clock)
    try:
        config = settings(moto, aws_endpoint_url="http://127.0.0.1:9")  # nothing listens there
        fleet = Ec2Fleet(config, clock)
        scaler = Scaler(store, fleet, config, WorkerRegistry(clock), clock)
        enqueue(store, 1)
        assert scaler.tick() is None
        assert "DescribeInstances failed" in scaler.fleet_error
        assert scaler.tick() is None and scaler.fleet_errors_total == 1  # backing off: no call
    finally:
        store.close()


def test_spot_is_asked_first_and_on_demand_launched_when_spot_is_refused(moto, ec2):
    client = moto.client("ec2")
    calls = Calls(client)
    fleet = Ec2Fleet(settings(moto, worker_spot=True), time.time, client=client)
    spot = fleet.launch()
    assert calls.made[-1][1]["InstanceMarketOptions"]["MarketType"] == "spot"
    calls.fail("RunInstances", "InsufficientInstanceCapacity")
    fallback = fleet.launch()
    first_try, second_try = calls.made[-2][1], calls.made[-1][1]
    assert "InstanceMarketOptions" in first_try and "InstanceMarketOptions" not in second_try
    assert {spot.id, fallback.id} <= set(live(ec2))
    calls.fail("RunInstances", "UnauthorizedOperation")
    with pytest.raises(FleetError) as refused:
        fleet.launch()  # not a capacity refusal: no silent fallback
    assert refused.value.code == "UnauthorizedOperation"


def test_only_instances_of_its_cluster_are_ever_terminated(moto, ec2):
    images = ec2.describe_images(Owners=["amazon"])["Images"]
    other = ec2.run_instances(ImageId=images[0]["ImageId"], MinCount=1, MaxCount=1, TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": CLUSTER_TAG, "Value": "another-cluster"},
                                              {"Key": ROLE_TAG, "Value": "worker"}]}])["Instances"][0]["InstanceId"]
    untagged = ec2.run_instances(ImageId=images[0]["ImageId"], MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    fleet = Ec2Fleet(settings(moto), time.time, client=moto.client("ec2"))
    mine = fleet.launch()
    assert [m.id for m in fleet.describe()] == [mine.id]
    fleet.terminate(other)
    fleet.terminate(untagged)
    fleet.terminate("i-0123456789abcdef0")  # unknown: harmless
    assert other in live(ec2, "another-cluster")
    assert ec2.describe_instances(InstanceIds=[untagged])["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"
    assert fleet.terminate_all() == [mine.id]
    assert live(ec2) == {}
    assert fleet.terminate_all() == []


def test_the_fleet_check_names_a_missing_launch_template(moto, ec2):
    fleet = Ec2Fleet(settings(moto, cluster_name="nameless"), time.time, client=moto.client("ec2"))
    with pytest.raises(FleetError) as missing:
        fleet.check()
    assert "nameless-worker" in str(missing.value)
    assert "found" in Ec2Fleet(settings(moto), time.time, client=moto.client("ec2")).check()
