"""Operator commands on a cluster's fleet, with the settings of its run directory.

    python3 -m dynamic_workload fleet check --run-dir DIR
    python3 -m dynamic_workload fleet list --run-dir DIR
    python3 -m dynamic_workload fleet terminate-all --run-dir DIR

``check`` runs when the cluster fires: with the EC2 fleet the launch template must exist.
``terminate-all`` is what local teardown runs after stopping the services: with the EC2
fleet (a dry run against an emulated EC2) it terminates every worker instance tagged with
the cluster; with the local fleet the supervisor's stop has ended the workers already.
"""

import argparse
import os
import time

from .config import Settings
from .fleets import FleetError, make_fleet
from .supervisor import read_env_file


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dynamic_workload fleet", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("check", "list", "terminate-all"))
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    env_file = os.path.join(args.run_dir, "cluster.env")
    if not os.path.exists(env_file):
        print("nothing to do: no cluster settings in " + args.run_dir)
        return 0
    settings = Settings.from_env(dict(os.environ, **read_env_file(env_file)))
    if args.action == "terminate-all" and settings.fleet != "ec2":
        print("nothing to do: the local fleet's workers stop with the supervisor")
        return 0
    fleet = make_fleet(settings, time.time)
    try:
        if args.action == "check":
            print(fleet.check())
            return 0
        if args.action == "list":
            for member in fleet.members():
                print(member.id, member.launched_at)
            return 0
        ids = fleet.terminate_all()
    except FleetError as error:
        print(f"failed: {error}")
        return 1
    print(f"terminated {len(ids)}: {' '.join(ids)}" if ids else "nothing to do: no live worker instance")
    return 0
