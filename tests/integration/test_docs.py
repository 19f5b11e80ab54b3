"""The examples in docs/ are run, as doctests, against a real worker."""
import re
import subprocess
import sys

import pytest
import yaml

from conftest import PYTHONPATH, ROOT


@pytest.mark.parametrize("page", ["executing-tasks.md", "routing.md"])
def test_doc_examples_run(page, topo, workers):
    sample = yaml.safe_load((ROOT / "etc" / "taskd.yaml").read_text())
    sample["worker"].pop("control_socket")
    path = topo.config(sample)
    workers(path).ready()
    env = {"PYTHONPATH": PYTHONPATH, "TASKD_CONFIG": str(path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "run_doc_examples.py"),
                          str(ROOT / "docs" / page)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    examples = int(re.search(r"(\d+) examples, 0 failed", out.stdout).group(1))
    assert examples >= 8, out.stdout


def test_workflow_doc_examples_run(topo, workers):
    """docs/workflows.md, against a worker with the Redis result store."""
    import os
    sample = yaml.safe_load((ROOT / "etc" / "taskd.yaml").read_text())
    sample["worker"].pop("control_socket")
    sample["result_backend"] = os.environ.get("TASKD_TEST_REDIS", "redis://127.0.0.1:6379/0")
    path = topo.config(sample)
    workers(path).ready()
    env = {"PYTHONPATH": PYTHONPATH, "TASKD_CONFIG": str(path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "run_doc_examples.py"),
                          str(ROOT / "docs" / "workflows.md")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    examples = int(re.search(r"(\d+) examples, 0 failed", out.stdout).group(1))
    assert examples >= 20, out.stdout
