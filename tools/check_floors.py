"""Check that the dependency floors in pyproject.toml are true: install every runtime dependency at
exactly its floor (`torch>=2.4` becomes `torch==2.4.0`) in a fresh virtual environment, then run the
suite there.

    python3 tools/check_floors.py [--venv DIR] [pytest arguments...]

The test tools themselves (moto, pytest, ...) come at their newest versions that the floors allow.
The `sagemaker` extra is left out, with its tests: the SageMaker SDK needs a far newer boto3
(sagemaker-core's own floor) than xraylib does, so those run at the newest versions only.
A floor is the oldest release the code runs with: when this fails, raise the floor that broke, or
make the code work with it. Takes several minutes (downloads torch); not part of `make test`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def floor_pins(requirements: list[str]) -> list[str]:
    """'torch>=2.4' -> 'torch==2.4.0'; a requirement without a floor is left as it is."""
    pins = []
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)\s*", requirement)
        if match is None:
            pins.append(requirement)
            continue
        name, extras, version = match.groups()
        parts = version.split(".")
        pins.append(f"{name}{extras or ''}=={'.'.join(parts + ['0'] * (3 - len(parts)))}")
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default="/tmp/xraylib-floors", help="where to make the virtual environment")
    args, pytest_args = parser.parse_known_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = floor_pins(project["dependencies"])
    extras = project["optional-dependencies"]
    test_tools = [r for r in extras["test"] if r not in extras.get("sagemaker", [])]
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    constraints = venv / "floors.txt"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints.write_text("\n".join(pins) + "\n")
    print("installing the floors:", " ".join(pins), flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *pins], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *test_tools], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    return subprocess.run([str(python), "-m", "pytest", "-p", "no:cacheprovider", "--ignore", "tests/test_sagemaker.py",
                           *pytest_args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
