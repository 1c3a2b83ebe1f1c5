"""Shared fixtures: a real S3-compatible server on loopback (moto's server mode, over HTTP),
a fresh bucket per test, an isolated cache, and generated datasets."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from xraylib import locals3, synthetic


def pytest_configure(config: pytest.Config) -> None:
    # The suite runs in 2 xdist workers (pyproject's addopts): each gets its share of torch's threads
    # (which follow the CPUs the process may use, as os.cpu_count() does not), here and in the
    # commands the tests start: two workers each spinning threads on every core spend half again the
    # CPU time for little gain in wall time.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        import torch

        threads = max(1, torch.get_num_threads() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def run_side_by_side(*commands: tuple[list[str], dict[str, str] | None],
                     timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Each (argv, env) of `commands` started at once, their results in order: commands that only
    reach an error spend most of their time importing, which the cores share."""
    running = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for argv, env in commands]
    results = []
    for process in running:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


@pytest.fixture(scope="session")
def s3_server():
    with locals3.local_s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3_server) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    locals3.create_bucket(name)
    yield name
    locals3.delete_bucket(name, s3_server.endpoint_url)


@pytest.fixture
def s3_client(s3_server):
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=s3_server.endpoint_url)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("XRAYLIB_CACHE_DIR", str(path))
    return path


@contextmanager
def scratch_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder for a module's shared fixture, removed when the fixture ends: a trained ResNet50
    with its checkpoint is several hundred MB, and pytest keeps a passing test's folders only
    under tmp_path (see tmp_path_retention_policy in pyproject.toml)."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A generated Kaggle-layout dataset, shared read-only by the tests of a session."""
    root = tmp_path_factory.mktemp("tiny") / "chest_xray"
    synthetic.generate_dataset(root, images_per_class=40, min_side=64, max_side=120, seed=1)
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root
