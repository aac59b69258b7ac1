"""Where workers run. The scaler sees every fleet through the small interface below.

A fleet launches one worker at a time, lists the workers that exist (launched and not yet
gone, whether or not they have reported in), and terminates a worker by id. It knows
nothing of jobs or policy: booting versus live, boot timeouts and lost workers are the
scaler's business, and identical for every fleet.

The fleet is the source of truth for which workers exist, so a restarted balancer finds its
workers again by asking it (local: pid files; EC2: instances tagged with the cluster).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Member:
    """A worker that exists in the fleet."""

    id: str
    launched_at: float  # seconds since the epoch


class FleetError(Exception):
    """The fleet could not do what was asked (API refused, quota, capacity); safe to retry later."""

    def __init__(self, message, code="FleetError"):
        super().__init__(message)
        self.code = code


class Fleet:
    """The interface every fleet implements."""

    name = "abstract"

    def members(self):
        """The workers that exist now: a list of Member."""
        raise NotImplementedError

    def launch(self):
        """Start one worker and return its Member. Raises FleetError when it can't."""
        raise NotImplementedError

    def terminate(self, worker_id):
        """Stop a worker at once, wherever it is in its work."""
        raise NotImplementedError

    def check(self):
        """Fail with FleetError when the fleet can't launch (checked when the cluster fires)."""
        return "ready"

    def close(self):
        """Release what the fleet holds; workers keep running."""


def make_fleet(settings, clock):
    """The fleet named by the settings; boto3 is imported only for the EC2 fleet."""
    if settings.fleet == "local":
        from .local import LocalFleet

        return LocalFleet(settings, clock=clock)
    from .ec2 import Ec2Fleet

    return Ec2Fleet(settings, clock=clock)
