"""The package as a library: importing it (or its pytest plugin) changes nothing in the host process."""
import json
import os
import subprocess
import sys


def test_importing_quantlab_and_its_plugin_sets_no_environment_variable():
    # quantlab is a pytest11 plugin: every pytest session where it is installed imports it.
    code = ("import os, json; before = dict(os.environ); import quantlab, quantlab.pytest_plugin, quantlab.spec; "
            "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(done.stdout) == []
