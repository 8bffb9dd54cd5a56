"""The declared support range is the tested one: pyproject.toml's floors are what CI's second stage installs
(.ci/oldest.txt), and the runtime refuses what the floors exclude."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    floors = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
        if match:
            floors[match.group(1).lower()] = match.group(2)
    return floors


def _ci_pins():
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _release(version):
    return tuple(int(part) for part in version.split("."))


def test_every_floor_is_declared():
    assert set(_floors()) >= {"torch", "triton", "transformers", "numpy"}, _floors()


def test_ci_installs_the_floors_of_triton_and_transformers():
    floors, pins = _floors(), _ci_pins()
    assert set(pins) == {"triton", "transformers"}, pins
    for name, version in pins.items():
        assert _release(version)[:2] == _release(floors[name])[:2], (name, version, floors[name])


def test_ci_runs_each_stage():
    script = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/oldest.txt" in script and script.count("python -m pytest tests -q") == 2
    assert 'numpy==${numpy_floor}.*' in script
