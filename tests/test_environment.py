"""The two install routes (pip via pyproject.toml, conda via environment.yml) must pin the same versions, and every
third-party package the code imports must be one of those pins (not a version that floats in through another)."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_carries_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins == {p for p in pip_section if not p.startswith("-e")}
    assert all("==" in p for p in pins), "every dependency is pinned"


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {_name(p) for p in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    local = {"wsi_pipeline", "ops"} | {p.stem for folder in ("tests", "scripts") for p in (ROOT / folder).glob("*.py")}
    imported = set()
    for path in [*ROOT.glob("wsi_pipeline/**/*.py"), *ROOT.glob("ops/*.py"), *ROOT.glob("tests/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = sorted(m for m in imported - local - set(sys.stdlib_module_names) if m != "__future__")
    providers = packages_distributions()
    unpinned = {m: providers.get(m) for m in third_party
                if not {_name(d) for d in providers.get(m, [])} & pinned}
    assert not unpinned, f"imported but not pinned in pyproject.toml (module: distributions): {unpinned}"
