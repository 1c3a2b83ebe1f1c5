"""The ways xraylib is installed stay in step: pyproject.toml, environment.yml (conda, SageMaker),
the Dockerfile (which cannot be built here, so it is checked as text), the Makefile and README."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_name(requirement: str) -> str:
    """'scikit-learn>=1.3' -> 'scikit-learn'; 'moto[server]>=5' -> 'moto'; names compared normalized (PEP 503)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            found.append((instruction.upper(), args.strip()))
    return found


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "xraylib"
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    installs_xraylib = [p for p in pip if p in (".", "-e .")]
    assert installs_xraylib, "environment.yml must install xraylib itself (`-e .` or `.`)"
    env_names = {requirement_name(p) for p in pip if p not in installs_xraylib}
    runtime = {requirement_name(r) for r in pyproject()["project"]["dependencies"]}
    test = {requirement_name(r) for r in pyproject()["project"]["optional-dependencies"]["test"]}
    assert env_names - runtime - test == set(), \
        "in environment.yml but in neither pyproject.toml's dependencies nor its test extra"
    assert runtime - env_names == set(), "in pyproject.toml's dependencies but not in environment.yml"
    # `make test-browser` drives Chromium with Playwright, in a conda env (SageMaker) as in .venv.
    assert "playwright" in env_names & test
    # The packages the design names are there.
    assert {"jupyterlab", "torch", "torchvision", "boto3", "matplotlib", "scikit-learn", "papermill"} <= env_names
    # The floors are the same in both (tools/check_floors.py checks pyproject.toml's by installing them).
    env_specs = {requirement_name(p): p.replace(" ", "") for p in pip if p not in installs_xraylib}
    for requirement in pyproject()["project"]["dependencies"]:
        assert env_specs[requirement_name(requirement)] == requirement.replace(" ", ""), requirement


def test_dockerfile_base_image_is_pinned():
    froms = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    name, _, tag = image.partition(":")
    assert name == "python"
    assert tag and tag != "latest", f"pin the base image by an exact tag, not {image!r}"
    # An exact Python release (3.11.9), not a moving one (3.11, 3).
    assert re.match(r"^3\.1[1-9]\.\d+(-[a-z]+)*$", tag), tag
    python = tuple(int(x) for x in tag.split("-")[0].split("."))
    required = pyproject()["project"]["requires-python"]
    assert python[:2] >= tuple(int(x) for x in required.removeprefix(">=").split("."))


def test_dockerfile_commands_exist():
    instructions = dockerfile_instructions()
    project = pyproject()["project"]
    # `docker run IMAGE xraylib ...` runs the console script; the default command runs JupyterLab.
    assert project["scripts"]["xraylib"] == "xraylib.cli:main"
    assert "jupyterlab" in {requirement_name(r) for r in project["dependencies"]}
    cmd = [args for instruction, args in instructions if instruction == "CMD"]
    assert len(cmd) == 1
    argv = json.loads(cmd[0])  # exec form: signals reach JupyterLab
    assert argv[:2] == ["jupyter", "lab"]
    assert "--ip=0.0.0.0" in argv and "--port=8888" in argv
    assert ("EXPOSE", "8888") in instructions
    copies = [shlex.split(args) for instruction, args in instructions if instruction == "COPY"]
    sources = {src.rstrip("/") for args in copies for src in args[:-1]}
    assert {"notebooks", "xraylib", "pyproject.toml"} <= sources
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert "pip install ." in runs
    assert any(instruction == "USER" and args not in ("root", "0") for instruction, args in instructions)


def test_dockerfile_torch_matches_makefile():
    makefile = (ROOT / "Makefile").read_text()
    make_torch = re.search(r"^TORCH \?= (.+)$", makefile, re.MULTILINE).group(1).split()
    docker_torch = re.search(r'ARG TORCH_PACKAGES="([^"]+)"', (ROOT / "Dockerfile").read_text()).group(1).split()
    assert sorted(docker_torch) == sorted(make_torch)


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "chest_xray", "demo-output"} <= ignored
    assert not {"xraylib", "notebooks", "pyproject.toml", "README.md"} & ignored


def test_readme_covers_the_workflow():
    readme = (ROOT / "README.md").read_text()
    for needed in ("make demo", "make test", "make lab", "xraylib upload", "xraylib run train", "environment.yml",
                   "--weights", "## Results on real chest X-rays", "## Performance", "docs/demo_confusion_matrix.png"):
        assert needed in readme, needed
    assert (ROOT / "docs" / "demo_confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_floor_pins_are_the_oldest_release_each_requirement_admits():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_floors", ROOT / "tools" / "check_floors.py")
    check_floors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_floors)
    assert check_floors.floor_pins(["torch>=2.4", "numpy>=1.26.0", "moto[server]>=5", "x<2"]) == [
        "torch==2.4.0", "numpy==1.26.0", "moto[server]==5.0.0", "x<2"]
    pins = check_floors.floor_pins(pyproject()["project"]["dependencies"])
    assert all("==" in pin for pin in pins), "every runtime dependency has a floor that tools/check_floors.py installs"
