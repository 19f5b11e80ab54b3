"""The installable distribution: build it, install the wheel in a clean virtualenv, use it.

``python -m build`` makes the sdist and, from it, the wheel (in an isolated build
environment). The wheel goes into a new virtualenv without the system's site
packages, its dependencies from the pip cache or the index; then that venv's
``taskd --help`` runs, and a worker from that venv runs one task sent from here.
Costs about 25 s (the build and the install; the pip cache keeps them from the
network after the first run).
"""
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import BROKER_URL, ROOT


@pytest.mark.timeout(180)
def test_the_wheel_installs_in_a_clean_venv_and_its_worker_runs_a_task(topo, tmp_path, app_for):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=150)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(dist.glob("taskd_queue-*-py3-none-any.whl"))
    assert len(wheels) == 1 and list(dist.glob("taskd_queue-*.tar.gz"))
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "taskd/worker/aiochild.py" in names and not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              str(wheels[0])], capture_output=True, text=True, timeout=150)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TASKD_CONFIG")}
    helped = subprocess.run([str(venv / "bin" / "taskd"), "--help"], capture_output=True,
                            text=True, env=env, timeout=30)
    assert helped.returncode == 0 and "usage: taskd" in helped.stdout

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "wheeltasks.py").write_text(
        "import taskd\nfrom taskd import current_app\n\napp = current_app()\n\n\n"
        "@app.task(name='wheeltasks.where')\nasync def where(x):\n"
        "    return {'x': x, 'taskd': taskd.__file__}\n")
    path = topo.config({"imports": ["wheeltasks"], "broker": {"url": BROKER_URL}},
                       concurrency=1)
    # Not the suite's Worker fixture: that one runs the repository's taskd.
    proc = subprocess.Popen([str(venv / "bin" / "taskd"), "worker", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(env, PYTHONPATH=str(app_dir), PYTHONUNBUFFERED="1"),
                            cwd=str(app_dir))
    try:
        answer = app_for(path).send_task("wheeltasks.where", [7]).get(timeout=30)
        assert answer["x"] == 7
        assert answer["taskd"].startswith(str(venv)), answer      # the wheel's taskd ran it
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
