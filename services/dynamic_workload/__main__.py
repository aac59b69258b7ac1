"""Command line: ``python3 -m dynamic_workload COMMAND [options]``.

The client's commands (submit, results, status, watch; see cli.py) and one entry per service.
"""

import importlib
import sys

CLIENT_COMMANDS = ("submit", "results", "status", "watch")
COMMANDS = {
    "endpoint": "endpoint",
    "balancer": "balancer",
    "worker": "worker",
    "supervise": "supervisor",
    "bundle": "bundle",
    "fleet": "fleetcli",
}


def main():
    if sys.argv[1:2] and (sys.argv[1] in CLIENT_COMMANDS or sys.argv[1].startswith("--url")):
        from .cli import main as client_main

        return client_main(sys.argv[1:])
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python3 -m dynamic_workload {{{','.join(CLIENT_COMMANDS + tuple(COMMANDS))}}} [options]",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"dynamic_workload.{COMMANDS[sys.argv[1]]}")
    return module.main(sys.argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main())
