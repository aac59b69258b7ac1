"""A real moto server on a free 127.0.0.1 port, standing in for EC2 and IAM in tests."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        binary = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self._ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("moto_server did not answer within 30 s")
            time.sleep(0.05)

    def _ready(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"moto_server exited at start with {self.process.returncode}")
        try:
            with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    def reset(self):
        request = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def client(self, service, region="us-east-1"):
        import boto3

        return boto3.client(service, region_name=region, endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def make_launch_template(ec2, name, instance_type="t3.micro"):
    """A worker launch template like the one fire.yml makes (for fleet tests)."""
    images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023.*-x86_64"]}])
    ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={
        "ImageId": images["Images"][0]["ImageId"], "InstanceType": instance_type,
        "InstanceInitiatedShutdownBehavior": "terminate", "MetadataOptions": {"HttpTokens": "required"},
    })
