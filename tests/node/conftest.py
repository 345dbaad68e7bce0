"""Fixtures for node tests: a node running in the test process, wired to real peers."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import tomlkit

from node.config import load_config, parse_config
from node.service import NodeService
from tests.peers import free_port, postgres_database

NODE_AE_TITLE = "LIBRA_NODE"
MODALITY_AE_TITLE = "MODALITY1"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny random Libra checkpoint, built once per test session."""
    from libra_model.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "libra-tiny-demo")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """The index URL of a test: SQLite in the node's data folder, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield ""
        return
    with postgres_database() as url:
        yield url


def node_document(data_dir: Path, model_path: Path | None, database_url: str = "", **sections) -> dict:
    """Return the configuration document of a test node on free loopback ports."""
    document = {
        "node": {
            "ae_title": NODE_AE_TITLE,
            "bind_address": "127.0.0.1",
            "port": free_port(),
            "data_dir": str(data_dir),
            "database_url": database_url,
            "study_stable_seconds": 1.0,
            "stability_check_seconds": 0.2,
            "free_disk_reserve_mb": 0,
        },
        "callers": [{"ae_title": MODALITY_AE_TITLE}],
        "model": {"path": str(model_path) if model_path else "", "max_new_tokens": 16},
        "worker": {"poll_seconds": 0.2},
        "logging": {"format": "console"},
        "admin": {"port": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(document.get(section), dict):
            document[section] = document[section] | values
        else:
            document[section] = values
    return document


def node_config(data_dir: Path, model_path: Path | None, database_url: str = "", **sections):
    """Return a validated configuration for a test node on free loopback ports."""
    return parse_config(node_document(data_dir, model_path, database_url, **sections), source="test configuration")


@pytest.fixture
def make_node(tmp_path, tiny_checkpoint, database_url):
    """Start nodes in this process, on SQLite and on PostgreSQL; each is stopped after the test."""
    services: list[NodeService] = []

    def start(data_dir: Path | None = None, run_worker: bool = True, config_file: bool = False, **sections) -> NodeService:
        """Start a node; with `config_file`, from a TOML file that reloads and AE edits change."""
        data_dir = data_dir or tmp_path / "node"
        config_path = None
        if config_file:
            config_path = data_dir.parent / f"{data_dir.name}.toml"
            config_path.write_text(tomlkit.dumps(node_document(data_dir, tiny_checkpoint, database_url, **sections)))
            config = load_config(config_path)
        else:
            config = node_config(data_dir, tiny_checkpoint, database_url, **sections)
        service = NodeService(config, run_worker=run_worker, config_path=config_path)
        service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        if not service.stopped.is_set():
            service.stop()


def orthanc_destination(orthanc, **extra) -> dict:
    """Return a [[destinations]] entry for a running Orthanc fixture."""
    return {"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port} | extra


def dcmsend(port: int, *files: Path, calling_ae_title: str = MODALITY_AE_TITLE, called_ae_title: str = NODE_AE_TITLE):
    """Send files with dcmtk's dcmsend, which proposes each file's own transfer syntax.

    dcmsend goes on after a failed file (--no-halt), as a modality sending a study would.
    """
    return subprocess.run(
        ["dcmsend", "127.0.0.1", str(port), *map(str, files), "-aet", calling_ae_title, "-aec", called_ae_title, "--no-halt"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_until(predicate, timeout_seconds: float, message: str, interval_seconds: float = 0.2):
    """Poll `predicate` until it returns a truthy value, which is returned, or fail the test."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_seconds} s: {message}")
        time.sleep(interval_seconds)
