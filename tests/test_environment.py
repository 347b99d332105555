"""environment.yml must list exactly the pyproject dependencies (plus the dev extra)."""
import re
import tomllib

import pytest
import yaml
from conftest import REPO


def _norm(req: str) -> str:
    name, rest = re.match(r"^\s*([A-Za-z0-9_.\-]+)(.*)$", req).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def pyproject_requirements(text: str) -> set[str]:
    proj = tomllib.loads(text)["project"]
    return {_norm(r) for r in proj["dependencies"] + proj["optional-dependencies"]["dev"]}


def conda_requirements(text: str) -> set[str]:
    deps = yaml.safe_load(text)["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    return {_norm(r) for r in pip}


def drift(pyproject_text: str, env_text: str) -> tuple[set, set]:
    a, b = pyproject_requirements(pyproject_text), conda_requirements(env_text)
    return a - b, b - a


def test_environment_yml_equals_pyproject():
    only_pyproject, only_conda = drift((REPO / "pyproject.toml").read_text(), (REPO / "environment.yml").read_text())
    assert not only_pyproject and not only_conda, f"only in pyproject: {only_pyproject}; only in environment.yml: {only_conda}"


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("polars>=2.1,<3", "polars>=2.0,<3"),  # a changed bound
    lambda t: t.replace("      - uv>=0.5\n", ""),  # a dropped package
])
def test_drift_is_detected(edit):
    env = (REPO / "environment.yml").read_text()
    changed = edit(env)
    assert changed != env
    assert drift((REPO / "pyproject.toml").read_text(), changed) != (set(), set())


def test_environment_pins_python_like_pyproject():
    deps = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    req = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"python{req}" in deps
