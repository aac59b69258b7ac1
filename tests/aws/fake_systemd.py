"""Stand-ins for what the tests' machine lacks: systemd as PID 1, dnf, useradd.

The worker's user data calls `dnf`, `useradd` and `systemctl` by name; the tests put small scripts
of those names first on PATH that call into this module. Every call is recorded (one JSON line
each in calls.log of $FAKE_SYSTEMD_DIR). `systemctl start UNIT` runs the unit as systemd would, in
the ways that matter here: the environment file, `${VAR}` and `$$` in command lines, ExecStart,
then ExecStopPost with $SERVICE_RESULT. `systemctl poweroff` is only recorded.
"""

import json
import os
import re
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = ("systemctl", "dnf", "useradd")


def install(bin_dir):
    """Write the fake commands into bin_dir (to be put first on PATH)."""
    os.makedirs(bin_dir, exist_ok=True)
    for name in COMMANDS:
        path = os.path.join(bin_dir, name)
        with open(path, "w") as script:
            script.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {HERE!r})\n"
                         f"import fake_systemd\nsys.exit(fake_systemd.main({name!r}, sys.argv[1:]))\n")
        os.chmod(path, 0o755)


def unit_records(state_dir):
    """What the started unit did, in order: {"exec_start", "main_pid"}, {"exit_status"}, {"exec_stop_post"}."""
    try:
        with open(os.path.join(state_dir, "unit.json")) as records:
            return [json.loads(line) for line in records]
    except FileNotFoundError:
        return []


def calls(state_dir):
    """The recorded calls, in order: a list of [command, arg, ...]."""
    try:
        with open(os.path.join(state_dir, "calls.log")) as log:
            return [json.loads(line) for line in log]
    except FileNotFoundError:
        return []


def parse_unit(path):
    """The [Service] section of a unit: {key: [values, in order]}."""
    section, service = None, {}
    with open(path) as unit:
        for line in unit:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
            elif section == "Service":
                key, _, value = line.partition("=")
                service.setdefault(key.strip(), []).append(value.strip())
    return service


def read_environment_file(path):
    environment = {}
    with open(path) as env_file:
        for line in env_file:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                environment[key] = value
    return environment


def command_line(value, environment):
    """argv of an Exec*= value, with systemd's prefixes dropped and its substitutions made."""
    value = value.lstrip("+-@!:")
    argv = []
    for word in shlex.split(value):
        word = word.replace("$$", "\0")
        word = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: environment.get(m.group(1) or m.group(2), ""), word)
        argv.append(word.replace("\0", "$"))
    return argv


def unit_environment(service):
    # systemd gives a unit little of its own environment; the stand-ins need theirs.
    environment = {k: v for k, v in os.environ.items() if k == "PATH" or k.startswith("FAKE_")}
    for env_file in service.get("EnvironmentFile", []):
        environment.update(read_environment_file(env_file.lstrip("-")))
    return environment


def run_unit(path, state_dir):
    """Run a unit's ExecStart to its end, then its ExecStopPost commands; record each step."""
    service = parse_unit(path)
    environment = unit_environment(service)
    argv = command_line(service["ExecStart"][0], environment)
    with open(os.path.join(state_dir, "unit.log"), "ab") as output, \
            open(os.path.join(state_dir, "unit.json"), "a") as records:
        def record(**fields):
            records.write(json.dumps(fields) + "\n")
            records.flush()
        main_process = subprocess.Popen(argv, env=environment, stdout=output, stderr=subprocess.STDOUT)
        record(exec_start=argv, main_pid=main_process.pid)
        status = main_process.wait()
        record(exit_status=status)
        stop_environment = dict(environment, SERVICE_RESULT="success" if status == 0 else "exit-code",
                                EXIT_CODE="exited", EXIT_STATUS=str(status))
        for value in service.get("ExecStopPost", []):
            stop_argv = command_line(value, environment)
            record(exec_stop_post=stop_argv)
            subprocess.call(stop_argv, env=stop_environment, stdout=output, stderr=subprocess.STDOUT)
    return status


def main(command, args):
    state_dir = os.environ["FAKE_SYSTEMD_DIR"]
    with open(os.path.join(state_dir, "calls.log"), "a") as log:
        log.write(json.dumps([command] + args) + "\n")
    if command == "systemctl" and args and args[0] == "start":
        unit_path = os.path.join(os.environ["FAKE_UNIT_DIR"], args[-1])
        runner = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "run", unit_path, state_dir],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        with open(os.path.join(state_dir, "unit.pid"), "w") as pid_file:
            pid_file.write(str(runner.pid))
    return 0


if __name__ == "__main__" and sys.argv[1] == "run":
    sys.exit(run_unit(sys.argv[2], sys.argv[3]))
