"""The declared dependency ranges: their floors are the ones CI pins, and the installed releases lie inside them."""

import configparser
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


ROOT = Path(__file__).resolve().parents[1]


def declared_requirements() -> dict[str, Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].strip().splitlines()
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def floor_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def test_every_dependency_has_a_floor_and_a_ceiling_and_ci_pins_the_floor():
    requirements, pins = declared_requirements(), floor_pins()
    assert requirements.keys() == pins.keys()
    for name, requirement in requirements.items():
        operators = {s.operator: Version(s.version) for s in requirement.specifier}
        assert operators.keys() == {">=", "<"}, f"{name}: declare a floor (>=) and a ceiling (<)"
        assert operators[">="] == pins[name], f"{name}: setup.cfg's floor and .ci/floors.txt differ"


def test_the_installed_releases_are_inside_the_declared_ranges():
    for name, requirement in declared_requirements().items():
        installed = Version(version(name))
        # Local builds such as torch's `2.13.0+cpu` satisfy the range of their public version.
        assert Version(installed.public) in requirement.specifier, f"{name} {installed} is outside {requirement}"
