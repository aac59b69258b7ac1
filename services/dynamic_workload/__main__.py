"""Command line: ``python3 -m dynamic_workload SERVICE [options]``, one entry per service."""

import importlib
import sys

COMMANDS = {
    "endpoint": "endpoint",
    "balancer": "balancer",
    "worker": "worker",
    "supervise": "supervisor",
    "bundle": "bundle",
    "fleet": "fleetcli",
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python3 -m dynamic_workload {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"dynamic_workload.{COMMANDS[sys.argv[1]]}")
    return module.main(sys.argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main())
