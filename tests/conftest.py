"""Shared fixtures: real peers on loopback and the shared radiograph files."""

from __future__ import annotations

import pytest

from tests.peers import CXR_DIR, start_orthanc


@pytest.fixture(scope="session")
def cxr_dir():
    """The folder of real radiograph files beside the repository (never copied into it)."""
    if not CXR_DIR.is_dir():
        pytest.fail(f"shared radiographs not found at {CXR_DIR}: clone the project beside its shared/ folder")
    return CXR_DIR


@pytest.fixture
def orthanc(tmp_path):
    """An Orthanc PACS on free loopback ports, stopped after the test."""
    server = start_orthanc(tmp_path / "orthanc")
    yield server
    server.stop()
