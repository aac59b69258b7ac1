"""The EC2 fleet: workers are instances launched from the cluster's launch template.

This is the only module that imports boto3. Everything the fleet does is scoped by the
cluster's tags: it launches with ``dynamic-workload/cluster=<name>`` and
``dynamic-workload/role=worker`` (plus the launch time), lists only instances carrying both,
and terminates only those, which is also all the balancer's instance role allows.

- One instance per ``run_instances`` call: EC2 applies some template fields only to the first
  instance of a multi-instance call (an emulator does so for the instance profile).
- ``members`` describes instances at most every DESCRIBE_EVERY seconds and keeps its own
  launches and terminations in between, so a scaler ticking twice a second costs one
  DescribeInstances call per few seconds, not two per second.
- Spot (``worker_spot``): asked for first; when EC2 refuses spot capacity the same launch is
  made on demand. An interrupted spot worker's job returns to the queue with its lease.
- Every API failure becomes a FleetError naming the error code; the scaler backs off.
"""

import datetime

import boto3
import botocore.config
import botocore.exceptions

from .. import logs
from . import Fleet, FleetError, Member

CLUSTER_TAG = "dynamic-workload/cluster"
ROLE_TAG = "dynamic-workload/role"
LAUNCHED_AT_TAG = "dynamic-workload/launched-at"
ALIVE_STATES = ["pending", "running"]
DESCRIBE_EVERY = 5.0
# Errors that mean "no spot capacity for you now": launch on demand instead.
SPOT_REFUSALS = {
    "InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
    "InsufficientCapacity", "UnfulfillableCapacity",
}


def make_client(settings):
    config = botocore.config.Config(
        region_name=settings.aws_region, connect_timeout=5, read_timeout=20,
        # The scaler has its own backoff; botocore's retries only smooth over a blip.
        retries={"mode": "standard", "max_attempts": 2},
    )
    options = {"config": config}
    if settings.aws_endpoint_url:
        options["endpoint_url"] = settings.aws_endpoint_url
        if boto3.Session().get_credentials() is None:
            # An emulator (a dry run against moto) needs no real credentials.
            options.update(aws_access_key_id="dry-run", aws_secret_access_key="dry-run")
    return boto3.client("ec2", **options)


class Ec2Fleet(Fleet):
    name = "ec2"

    def __init__(self, settings, clock, client=None):
        self.settings = settings
        self.clock = clock
        self.client = client or make_client(settings)
        self.cluster = settings.cluster_name
        self._known = None  # {instance id: Member} from the last describe
        self._described_at = float("-inf")

    # --- the interface ----------------------------------------------------------------------

    def members(self):
        if self._known is None or self.clock() - self._described_at >= DESCRIBE_EVERY:
            self._known = {member.id: member for member in self.describe()}
            self._described_at = self.clock()
        return list(self._known.values())

    def launch(self):
        now = self.clock()
        request = {
            "LaunchTemplate": {"LaunchTemplateName": self.settings.worker_launch_template,
                               "Version": self.settings.launch_template_version},
            "MinCount": 1, "MaxCount": 1,
            "TagSpecifications": [
                {"ResourceType": kind, "Tags": self._tags(now)} for kind in ("instance", "volume")
            ],
        }
        instance = None
        if self.settings.worker_spot:
            spot = dict(request, InstanceMarketOptions={
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            })
            try:
                instance = self._call("RunInstances", self.client.run_instances, **spot)["Instances"][0]
            except FleetError as error:
                if error.code not in SPOT_REFUSALS:
                    raise
                logs.event("spot_refused", error=str(error), fallback="on-demand")
        if instance is None:
            instance = self._call("RunInstances", self.client.run_instances, **request)["Instances"][0]
        member = Member(instance["InstanceId"], instance["LaunchTime"].timestamp())
        if self._known is not None:
            self._known[member.id] = member
        return member

    def terminate(self, worker_id):
        # Only ever an instance of this cluster, whatever id is asked for.
        try:
            ours = any(member.id == worker_id for member in self.describe([worker_id]))
        except FleetError as error:
            if not error.code.startswith("InvalidInstanceID"):
                raise
            ours = False  # no such instance (any more)
        if not ours:
            logs.event("terminate_refused", worker=worker_id, reason="not a live worker of this cluster")
        else:
            self._call("TerminateInstances", self.client.terminate_instances, InstanceIds=[worker_id])
        if self._known is not None:
            self._known.pop(worker_id, None)

    # --- helpers ----------------------------------------------------------------------------

    def describe(self, instance_ids=None):
        """Live (pending or running) worker instances of this cluster."""
        filters = [
            {"Name": f"tag:{CLUSTER_TAG}", "Values": [self.cluster]},
            {"Name": f"tag:{ROLE_TAG}", "Values": ["worker"]},
            # Terminated instances keep their tags for a while: filter on the state too.
            {"Name": "instance-state-name", "Values": ALIVE_STATES},
        ]
        request = {"Filters": filters}
        if instance_ids:
            request["InstanceIds"] = instance_ids
        members = []
        token = None
        while True:
            page = self._call("DescribeInstances", self.client.describe_instances,
                              **request, **({"NextToken": token} if token else {}))
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    members.append(Member(instance["InstanceId"], instance["LaunchTime"].timestamp()))
            token = page.get("NextToken")
            if not token:
                return members

    def check(self):
        """Fail with FleetError unless the workers' launch template exists (before firing)."""
        name = self.settings.worker_launch_template
        try:
            self._call("DescribeLaunchTemplates", self.client.describe_launch_templates, LaunchTemplateNames=[name])
        except FleetError as error:
            raise FleetError(f"the workers' launch template {name} is not usable ({error}); create it with "
                             "ansible-playbook -i inventory/aws.yml playbooks/fire.yml --tags provision", error.code)
        return f"launch template {name} found"

    def terminate_all(self):
        """Terminate every live worker of this cluster (teardown); returns their ids."""
        ids = [member.id for member in self.describe()]
        if ids:
            self._call("TerminateInstances", self.client.terminate_instances, InstanceIds=ids)
        self._known = None
        return ids

    def _tags(self, now):
        launched_at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return [
            {"Key": CLUSTER_TAG, "Value": self.cluster},
            {"Key": ROLE_TAG, "Value": "worker"},
            {"Key": LAUNCHED_AT_TAG, "Value": launched_at},
            {"Key": "Name", "Value": f"{self.cluster}-worker"},
        ]

    def _call(self, operation, method, **request):
        try:
            return method(**request)
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "Unknown")
            message = error.response.get("Error", {}).get("Message", "")
            raise FleetError(f"{operation} failed: {code}: {message}", code) from None
        except botocore.exceptions.BotoCoreError as error:
            raise FleetError(f"{operation} failed: {error}", type(error).__name__) from None
