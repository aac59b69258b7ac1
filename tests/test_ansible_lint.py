"""The Ansible content passes ansible-lint's production profile (the brief's rule)."""

import os
import subprocess
import sys

from conftest import ROOT


def test_ansible_lint_production_profile_passes():
    bin_dir = os.path.dirname(sys.executable)
    run = subprocess.run(
        [os.path.join(bin_dir, "ansible-lint", ), "--profile", "production", "--nocolor"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"]),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Profile 'production' was required, and it passed" in run.stdout + run.stderr
