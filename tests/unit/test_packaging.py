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
