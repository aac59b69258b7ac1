"""fire.yml --tags provision and teardown.yml on inventory/aws.yml, against a real moto server.

The tests run in order on one moto server: provision, provision again, teardown (after the
scaler's way of launching a worker), teardown again. Stopping the server at the end discards
whatever a failed step left behind.
"""

import base64
import json
import os
import stat

import pytest

from aws_support import ansible_playbook, aws_environment, recap
from motoserver import MotoServer

CLUSTER = "dw-aws-test"
TAG = "dynamic-workload/cluster"
ROLE = "dynamic-workload/role"
CLUSTER_FILTER = [{"Name": f"tag:{TAG}", "Values": [CLUSTER]}]
LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]
SCALER_TAGS = [{"Key": TAG, "Value": CLUSTER}, {"Key": ROLE, "Value": "worker"}, {"Key": "Name", "Value": f"{CLUSTER}-worker"}]


def tags(resource):
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}


def instances(ec2, filters):
    return [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]


class AwsCluster:
    """The cluster on the moto server, driven by the real playbooks and inventory."""

    def __init__(self, moto, tmp_dir):
        self.moto = moto
        self.ec2 = moto.client("ec2")
        self.iam = moto.client("iam")
        self.local_dir = os.path.join(str(tmp_dir), "local")
        # The contract's command line, plus a local directory out of the repository.
        self.vars = {"aws_endpoint_url": moto.url, "cluster_name": CLUSTER, "aws_local_dir": self.local_dir}

    def run(self, playbook, *options):
        return ansible_playbook(f"playbooks/{playbook}", self.vars, *options, inventory="inventory/aws.yml",
                                env=aws_environment())

    def template(self):
        found = self.ec2.describe_launch_templates(
            Filters=[{"Name": "launch-template-name", "Values": [f"{CLUSTER}-worker"]}])["LaunchTemplates"]
        return found[0] if found else None


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(moto, tmp_path_factory):
    return AwsCluster(moto, tmp_path_factory.mktemp("aws"))


@pytest.fixture(scope="module")
def provisioned(cluster):
    code, output = cluster.run("fire.yml", "--tags", "provision")
    assert code == 0, output
    return output


@pytest.fixture(scope="module")
def torn_down(provisioned, cluster):
    ec2 = cluster.ec2
    # A worker launched the way the balancer's EC2 fleet does it.
    worker = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": f"{CLUSTER}-worker", "Version": "$Latest"}, MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": kind, "Tags": SCALER_TAGS} for kind in ("instance", "volume")],
    )["Instances"][0]["InstanceId"]
    # Things that are not the cluster's, and must stay.
    image = ec2.describe_instances(InstanceIds=[worker])["Reservations"][0]["Instances"][0]["ImageId"]
    other = [{"ResourceType": "instance", "Tags": [{"Key": TAG, "Value": "another-cluster"}]}]
    decoy_instance = ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                                       TagSpecifications=other)["Instances"][0]["InstanceId"]
    decoy_group = ec2.create_security_group(GroupName=f"{CLUSTER}-not-ours", Description="not the cluster's")["GroupId"]
    ec2.create_key_pair(KeyName=f"{CLUSTER}-not-ours")

    code, output = cluster.run("teardown.yml")
    assert code == 0, output
    return {"worker": worker, "decoy_instance": decoy_instance, "decoy_group": decoy_group, "output": output}


def test_provision_creates_the_topology(provisioned, cluster):
    ec2, iam = cluster.ec2, cluster.iam
    assert recap(provisioned)["failed"] == 0

    vpcs = ec2.describe_vpcs(Filters=CLUSTER_FILTER)["Vpcs"]
    assert len(vpcs) == 1 and not vpcs[0]["IsDefault"]
    vpc = vpcs[0]["VpcId"]
    in_vpc = [{"Name": "vpc-id", "Values": [vpc]}]
    subnets = ec2.describe_subnets(Filters=in_vpc)["Subnets"]
    assert len(subnets) == 1 and subnets[0]["MapPublicIpOnLaunch"]
    subnet = subnets[0]["SubnetId"]
    gateways = ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc]}])["InternetGateways"]
    assert len(gateways) == 1
    route_tables = ec2.describe_route_tables(Filters=in_vpc + CLUSTER_FILTER)["RouteTables"]
    assert len(route_tables) == 1
    default_routes = [r for r in route_tables[0]["Routes"] if r.get("DestinationCidrBlock") == "0.0.0.0/0"]
    assert [r["GatewayId"] for r in default_routes] == [gateways[0]["InternetGatewayId"]]
    assert [a["SubnetId"] for a in route_tables[0]["Associations"] if "SubnetId" in a] == [subnet]
    for resource in vpcs + subnets + gateways + route_tables:
        assert tags(resource)[TAG] == CLUSTER and tags(resource)[ROLE] == "network", resource

    groups = {g["GroupName"]: g for g in ec2.describe_security_groups(Filters=in_vpc)["SecurityGroups"]
              if g["GroupName"] != "default"}
    assert set(groups) == {f"{CLUSTER}-{role}" for role in ("endpoint", "balancer", "worker")}
    for role in ("endpoint", "balancer", "worker"):
        assert tags(groups[f"{CLUSTER}-{role}"]) == {TAG: CLUSTER, ROLE: role, "Name": f"{CLUSTER}-{role}"}
    endpoint_sg, balancer_sg, worker_sg = (groups[f"{CLUSTER}-{r}"] for r in ("endpoint", "balancer", "worker"))

    def rules(group):
        return {(p["IpProtocol"], p.get("FromPort"), p.get("ToPort"), source)
                for p in group["IpPermissions"]
                for source in [r["CidrIp"] for r in p.get("IpRanges", [])]
                + [g["GroupId"] for g in p.get("UserIdGroupPairs", [])]}
    # No operator CIDR given and an endpoint override: SSH only from this machine.
    assert rules(endpoint_sg) == {("tcp", 5000, 5000, "0.0.0.0/0"), ("tcp", 22, 22, "127.0.0.1/32")}
    assert rules(balancer_sg) == {("tcp", 5100, 5100, endpoint_sg["GroupId"]), ("tcp", 5100, 5100, worker_sg["GroupId"]),
                                  ("tcp", 22, 22, endpoint_sg["GroupId"])}
    assert rules(worker_sg) == set()

    keys = ec2.describe_key_pairs(Filters=CLUSTER_FILTER)["KeyPairs"]
    assert [k["KeyName"] for k in keys] == [CLUSTER]
    key_file = os.path.join(cluster.local_dir, "id_ed25519")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    with open(key_file) as key:
        assert "PRIVATE KEY" in key.read()
    assert stat.S_IMODE(os.stat(cluster.local_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(cluster.local_dir, "token")).st_mode) == 0o600
    with open(os.path.join(cluster.local_dir, "token")) as token_file:
        token = token_file.read().strip()

    running = instances(ec2, CLUSTER_FILTER + [{"Name": "instance-state-name", "Values": LIVE}])
    by_role = {}
    for instance in running:
        by_role.setdefault(tags(instance)[ROLE], []).append(instance)
    assert {role: len(found) for role, found in by_role.items()} == {"balancer": 1, "endpoint": 2}
    balancer = by_role["balancer"][0]
    images = {i["ImageId"] for i in running}
    assert len(images) == 1
    image = ec2.describe_images(ImageIds=list(images))["Images"][0]
    assert image["Name"].startswith("al2023-ami-2023.") and image["Architecture"] == "x86_64"
    for instance in running:
        role = tags(instance)[ROLE]
        assert tags(instance)["Name"] == f"{CLUSTER}-{role}"
        assert instance["SubnetId"] == subnet and instance["KeyName"] == CLUSTER
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [groups[f"{CLUSTER}-{role}"]["GroupId"]]
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert instance.get("PublicIpAddress")
        volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]}])
        assert volumes["Volumes"]
        for volume in volumes["Volumes"]:
            assert tags(volume)[TAG] == CLUSTER, volume
        if role == "balancer":
            assert instance["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{CLUSTER}-balancer")
        else:
            assert "IamInstanceProfile" not in instance

    template = cluster.template()
    # moto's DescribeLaunchTemplates shows only tags given at creation; DescribeTags shows them all.
    template_tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [template["LaunchTemplateId"]]}])["Tags"]
    assert {t["Key"]: t["Value"] for t in template_tags} == {TAG: CLUSTER, ROLE: "worker", "Name": f"{CLUSTER}-worker"}
    assert template["LatestVersionNumber"] == 1
    data = ec2.describe_launch_template_versions(
        LaunchTemplateId=template["LaunchTemplateId"], Versions=["$Latest"])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert data["ImageId"] == image["ImageId"] and data["InstanceType"] == "t3.micro"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["MetadataOptions"]["HttpTokens"] == "required" and data["MetadataOptions"]["HttpEndpoint"] == "enabled"
    assert "IamInstanceProfile" not in data and "KeyName" not in data
    [interface] = data["NetworkInterfaces"]
    assert interface["Groups"] == [worker_sg["GroupId"]] and interface["SubnetId"] == subnet
    assert interface["AssociatePublicIpAddress"] is True
    user_data = base64.b64decode(data["UserData"]).decode()
    assert user_data.startswith("#!/bin/bash\n")
    assert f"balancer=http://{balancer['PrivateIpAddress']}:5100\n" in user_data
    assert '"$balancer/bundle"' in user_data and token in user_data
    assert "imds=http://169.254.169.254\n" in user_data and "X-aws-ec2-metadata-token" in user_data
    for public_code_host in ("pip install", "git clone", "github", "pypi"):
        assert public_code_host not in user_data.lower()

    account = cluster.moto.client("sts").get_caller_identity()["Account"]
    template_arn = f"arn:aws:ec2:us-east-1:{account}:launch-template/{template['LaunchTemplateId']}"
    role = iam.get_role(RoleName=f"{CLUSTER}-balancer")["Role"]
    assert tags(role) == {TAG: CLUSTER, ROLE: "balancer"}
    assert role["AssumeRolePolicyDocument"]["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
    assert iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"] == []
    assert iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"] == ["launch-and-terminate-workers"]
    statements = iam.get_role_policy(RoleName=role["RoleName"], PolicyName="launch-and-terminate-workers")[
        "PolicyDocument"]["Statement"]
    check_policy(statements, template_arn)

    profile = iam.get_instance_profile(InstanceProfileName=f"{CLUSTER}-balancer")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [role["RoleName"]]
    assert tags(profile) == {TAG: CLUSTER, ROLE: "balancer"}


def check_policy(statements, template_arn):
    """Least privilege: launch from the template only, tag at launch only, terminate the cluster's only."""
    def listed(value):
        return value if isinstance(value, list) else [value]

    assert all(s["Effect"] == "Allow" for s in statements)
    actions = [a for s in statements for a in listed(s["Action"])]
    assert not any("*" in a for a in actions), actions
    assert set(actions) == {"ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances", "ec2:TerminateInstances"}
    for statement in statements:
        action, resources, condition = statement["Action"], listed(statement["Resource"]), statement.get("Condition", {})
        if action == "ec2:DescribeInstances":
            assert resources == ["*"]  # DescribeInstances takes no resource scoping
            continue
        assert "*" not in resources
        if action == "ec2:RunInstances" and resources != [template_arn]:
            assert condition["ArnLike"] == {"ec2:LaunchTemplate": template_arn}
            assert condition["Bool"] == {"ec2:IsLaunchTemplateResource": "true"}
            if any(r.endswith(":instance/*") for r in resources):
                assert condition["StringEquals"] == {f"aws:RequestTag/{TAG}": CLUSTER,
                                                     "aws:RequestTag/dynamic-workload/role": "worker"}
        elif action == "ec2:CreateTags":
            assert condition == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
        elif action == "ec2:TerminateInstances":
            assert all(r.endswith(":instance/*") for r in resources)
            assert condition == {"StringEquals": {f"aws:ResourceTag/{TAG}": CLUSTER,
                                                  "aws:ResourceTag/dynamic-workload/role": "worker"}}
    run_resources = [r for s in statements if s["Action"] == "ec2:RunInstances" for r in listed(s["Resource"])]
    assert template_arn in run_resources and any(r.endswith(":instance/*") for r in run_resources)


def test_second_provision_changes_nothing(provisioned, cluster):
    before = instances(cluster.ec2, CLUSTER_FILTER + [{"Name": "instance-state-name", "Values": LIVE}])
    code, output = cluster.run("fire.yml", "--tags", "provision")
    assert code == 0, output
    assert recap(output)["changed"] == 0, output
    after = instances(cluster.ec2, CLUSTER_FILTER + [{"Name": "instance-state-name", "Values": LIVE}])
    assert {i["InstanceId"] for i in after} == {i["InstanceId"] for i in before}
    assert cluster.template()["LatestVersionNumber"] == 1


HOSTS_PLAYBOOK = """
- name: Add the cluster's instances to the inventory and write down what the configure plays get
  hosts: aws_provisioner
  gather_facts: false
  tasks:
    - name: Add the hosts
      ansible.builtin.include_role:
        name: aws_cluster
        tasks_from: hosts
    - name: Write them down
      ansible.builtin.copy:
        dest: "{{ dump_path }}"
        mode: "0600"
        content: |
          {% set found = {'balancers': groups['aws_balancer'], 'endpoints': groups['aws_endpoints'], 'hosts': {}} %}
          {% for host in groups['aws_balancer'] + groups['aws_endpoints'] %}
          {%   set _ = found.hosts.update({host: {'address': hostvars[host].ansible_host,
                                                 'ssh_args': hostvars[host].ansible_ssh_common_args,
                                                 'key': hostvars[host].ansible_ssh_private_key_file}}) %}
          {% endfor %}
          {{ found | to_json }}
"""


def test_configuration_finds_the_instances(provisioned, cluster, tmp_path):
    """The configure part's inventory: endpoints by public address, the balancer only through one."""
    playbook, dump = tmp_path / "hosts.yml", tmp_path / "hosts.json"
    playbook.write_text(HOSTS_PLAYBOOK)
    code, output = ansible_playbook(str(playbook), dict(cluster.vars, dump_path=str(dump)),
                                    inventory="inventory/aws.yml", env=aws_environment())
    assert code == 0, output
    found = json.loads(dump.read_text())
    running = instances(cluster.ec2, CLUSTER_FILTER + [{"Name": "instance-state-name", "Values": ["running"]}])
    by_id = {i["InstanceId"]: i for i in running}
    [balancer] = found["balancers"]
    assert tags(by_id[balancer])[ROLE] == "balancer"
    assert sorted(found["endpoints"]) == sorted(i for i in by_id if tags(by_id[i])[ROLE] == "endpoint")
    key_file = os.path.join(cluster.local_dir, "id_ed25519")
    for endpoint in found["endpoints"]:
        assert found["hosts"][endpoint]["address"] == by_id[endpoint]["PublicIpAddress"]
        assert found["hosts"][endpoint]["key"] == key_file
    first_endpoint = by_id[sorted(found["endpoints"])[0]]
    assert found["hosts"][balancer]["address"] == by_id[balancer]["PrivateIpAddress"]
    assert found["hosts"][balancer]["key"] == key_file
    assert f"-W %h:%p ec2-user@{first_endpoint['PublicIpAddress']}" in found["hosts"][balancer]["ssh_args"]


def test_teardown_terminates_workers_and_removes_everything_tagged(torn_down, cluster):
    ec2, iam = cluster.ec2, cluster.iam
    assert recap(torn_down["output"])["failed"] == 0
    state = {i["InstanceId"]: i["State"]["Name"] for i in instances(ec2, [])}
    assert state[torn_down["worker"]] == "terminated"
    assert instances(ec2, CLUSTER_FILTER + [{"Name": "instance-state-name", "Values": LIVE}]) == []
    assert ec2.describe_vpcs(Filters=CLUSTER_FILTER)["Vpcs"] == []
    assert ec2.describe_subnets(Filters=CLUSTER_FILTER)["Subnets"] == []
    assert ec2.describe_internet_gateways(Filters=CLUSTER_FILTER)["InternetGateways"] == []
    assert ec2.describe_route_tables(Filters=CLUSTER_FILTER)["RouteTables"] == []
    assert ec2.describe_security_groups(Filters=CLUSTER_FILTER)["SecurityGroups"] == []
    assert ec2.describe_key_pairs(Filters=CLUSTER_FILTER)["KeyPairs"] == []
    assert cluster.template() is None
    assert ec2.describe_launch_templates(Filters=CLUSTER_FILTER)["LaunchTemplates"] == []
    assert not any(r["RoleName"] == f"{CLUSTER}-balancer" for r in iam.list_roles()["Roles"])
    assert not any(p["InstanceProfileName"] == f"{CLUSTER}-balancer"
                   for p in iam.list_instance_profiles()["InstanceProfiles"])
    assert not os.path.exists(cluster.local_dir)
    # Nothing else was touched.
    assert state[torn_down["decoy_instance"]] == "running"
    assert ec2.describe_security_groups(GroupIds=[torn_down["decoy_group"]])["SecurityGroups"]
    assert ec2.describe_key_pairs(KeyNames=[f"{CLUSTER}-not-ours"])["KeyPairs"]
    assert any(v["IsDefault"] for v in ec2.describe_vpcs()["Vpcs"])


def test_second_teardown_changes_nothing(torn_down, cluster):
    code, output = cluster.run("teardown.yml")
    assert code == 0, output
    assert recap(output)["changed"] == 0, output
