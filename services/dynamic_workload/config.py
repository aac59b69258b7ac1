"""Settings shared by every service, read from ``DW_*`` environment variables.

Locally the supervisor loads them from the cluster's environment file; on AWS systemd does
(``EnvironmentFile=``). Each setting maps to a contract variable (``cluster_*``) or to an
internal knob with a safe default. Bad values stop a service at start with a clear message,
never later in the middle of a request.
"""

import dataclasses
import os


class SettingsError(ValueError):
    """A setting is missing or out of range; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    cluster_name: str = "dynamic-workload"
    token: str = ""
    balancer_url: str = "http://127.0.0.1:5100"
    state_dir: str = ".cluster"
    max_queued: int = 10_000
    max_iterations: int = 100_000_000
    max_body_bytes: int = 16 * 1024 * 1024
    min_workers: int = 0
    max_workers: int = 4
    worker_idle_timeout: float = 30.0
    worker_boot_timeout: float = 30.0
    # A worker silent for this long (no lease, heartbeat or result) is considered lost.
    worker_lost_timeout: float = 60.0
    fleet: str = "local"
    aws_region: str = "us-east-1"
    aws_endpoint_url: str = ""
    lease_seconds: float = 30.0
    max_attempts: int = 5
    # The scaler wants the backlog drained within this many seconds.
    target_wait_seconds: float = 5.0
    scaler_interval: float = 0.5
    # How long an endpoint keeps retrying a balancer that is away before it answers 503.
    balancer_retry_seconds: float = 5.0
    # EC2 fleet: the workers' launch template (default "<cluster_name>-worker") and its version.
    launch_template: str = ""
    launch_template_version: str = "$Latest"
    # EC2 fleet: ask for spot workers first, falling back to on-demand when spot is refused.
    worker_spot: bool = False
    # Request bodies an endpoint or the balancer holds in memory at once; past it, 503.
    upload_budget_bytes: int = 256 * 1024 * 1024
    # Log every job's steps (see logs.py).
    verbose: bool = False

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = "DW_" + field.name.upper()
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[field.name] = _parse(field.type, raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a valid {field.type.__name__}") from None
        settings = cls(**values)
        settings.check()
        return settings

    @property
    def worker_launch_template(self):
        return self.launch_template or f"{self.cluster_name}-worker"

    def check(self):
        if self.min_workers < 0:
            raise SettingsError("DW_MIN_WORKERS must be 0 or more")
        if self.max_workers < self.min_workers:
            raise SettingsError("DW_MAX_WORKERS must be at least DW_MIN_WORKERS")
        if self.max_queued < 1:
            raise SettingsError("DW_MAX_QUEUED must be 1 or more")
        if self.max_iterations < 1 or self.max_body_bytes < 1:
            raise SettingsError("DW_MAX_ITERATIONS and DW_MAX_BODY_BYTES must be 1 or more")
        if self.max_attempts < 1:
            raise SettingsError("DW_MAX_ATTEMPTS must be 1 or more")
        if self.lease_seconds <= 0 or self.target_wait_seconds <= 0 or self.scaler_interval <= 0:
            raise SettingsError("DW_LEASE_SECONDS, DW_TARGET_WAIT_SECONDS and DW_SCALER_INTERVAL must be positive")
        if self.fleet not in ("local", "ec2"):
            raise SettingsError(f"DW_FLEET must be 'local' or 'ec2', not {self.fleet!r}")


def _parse(kind, raw):
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return kind(raw)
