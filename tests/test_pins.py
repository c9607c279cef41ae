"""The dependency pins: exact, identical in pyproject.toml, environment.yml and constraints.txt, and installed."""
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.+\-]*)$")


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for requirement in requirements:
        match = PIN.match(requirement)
        assert match, f"pyproject.toml: {requirement!r} is not an exact pin (name==version)"
        pins[match[1].lower()] = match[2]
    return pins


def environment_pins() -> dict[str, str]:
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    pip_section = text.split("- pip:", 1)[1]
    entries = re.findall(r"^\s+-\s+(\S+)\s*$", pip_section, flags=re.M)
    return {m[1].lower(): m[2] for m in map(PIN.match, entries) if m}


def test_every_dependency_is_pinned_exactly_with_the_required_versions():
    pins = pyproject_pins()
    assert pins["torch"] == "2.13.0" and pins["nbval"] == "0.11.0"
    assert pins["jupyterlab"].startswith("4.6.") and pins["ipywidgets"].startswith("8.1.")
    assert {"matplotlib", "numpy", "tqdm", "pytest"} <= set(pins)


def test_environment_yml_carries_the_same_pins():
    assert environment_pins() == pyproject_pins()
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s+-\s+python=3\.11\s*$", text, flags=re.M)


def test_installed_versions_match_the_pins():
    for name, pinned in pyproject_pins().items():
        assert version(name).split("+")[0] == pinned, f"{name} {version(name)} installed, {pinned} pinned"


def test_constraints_lock_every_direct_pin_to_the_same_version():
    lines = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    locked = {m[1].lower(): m[2] for m in map(PIN.match, lines) if m}
    assert all(not line.strip() or line.startswith("#") or PIN.match(line) for line in lines)
    for name, pinned in pyproject_pins().items():
        assert locked.get(name) == pinned, f"constraints.txt has {name}=={locked.get(name)}, pyproject {pinned}"
    assert len(locked) > 50  # the transitive packages are locked too


def test_installed_packages_match_the_lock():
    lines = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    for name, locked in (m.groups() for m in map(PIN.match, lines) if m):
        assert version(name).split("+")[0] == locked, f"{name} {version(name)} installed, {locked} locked"
