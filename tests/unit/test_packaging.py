"""pyproject.toml never asks for the distribution called ``taskd`` on the package index:
that name belongs to an unrelated project (ours is ``taskd-queue``), so a requirement such
as ``taskd[dashboard]`` installs someone else's ``taskd`` package beside this one."""
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_requirement_names_the_unrelated_taskd_distribution():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "taskd-queue"
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}
    assert "taskd" not in names, requirements


def test_install_hints_name_taskd_queue():
    """Every extra named in an error message, a doc or a unit file is ``taskd-queue[...]``:
    ``pip install 'taskd[redis]'`` would fetch the unrelated project."""
    files = [*ROOT.glob("taskd/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md",
             *ROOT.glob("systemd/*")]
    wrong = [f"{path.relative_to(ROOT)}: {line.strip()}"
             for path in files for line in path.read_text().splitlines()
             if re.search(r"install\s+'?taskd\[", line)]
    assert wrong == []
