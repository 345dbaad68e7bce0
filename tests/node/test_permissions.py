"""File modes: everything the node creates under data_dir is readable by its user only.

The node runs under a umask of 000 here, so a file or folder created with the default
mode would be readable and writable by everyone and the checks below would fail.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import select

from node.index.models import Study, StudyState
from tests.node.conftest import dcmsend, wait_until
from tests.peers import CHEST_PA_JPEG_BASELINE

OWNER_ONLY_BITS = stat.S_IRWXG | stat.S_IRWXO



@pytest.fixture
def database_url():
    """The index files checked here are SQLite's, so these nodes run on SQLite only."""
    return ""

@pytest.fixture
def permissive_umask():
    """Run the test with umask 000 and restore the previous umask afterwards."""
    previous = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(previous)


def group_or_other_access(root: Path) -> dict[str, str]:
    """Return every path under `root` (and root) that group or others may access, with its mode."""
    found = {}
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if mode & OWNER_ONLY_BITS:
            found[str(path.relative_to(root))] = oct(stat.S_IMODE(mode))
    return found


def test_permissions_data_dir_owner_only(make_node, tmp_path, permissive_umask):
    data_dir = tmp_path / "node"
    node = make_node(data_dir=data_dir)
    temporary_file_modes = []
    original_store_file = node.receiver.ingest.store_file

    def store_recording_temporary_mode(temporary_path, *args, **kwargs):
        temporary_file_modes.append(stat.S_IMODE(os.stat(temporary_path).st_mode))
        return original_store_file(temporary_path, *args, **kwargs)

    node.receiver.ingest.store_file = store_recording_temporary_mode
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0

    def reported():
        with node.index.transaction() as session:
            return session.scalars(select(Study).where(Study.state == StudyState.REPORTED)).first()

    wait_until(reported, 120, "the study's SR is written")

    # Checked while the node runs, because SQLite removes its WAL and SHM files at close.
    assert group_or_other_access(data_dir) == {}
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm", "patient_hash.key", "device_uid"):
        assert (data_dir / name).is_file(), name
    stored_files = [path for path in (data_dir / "store").rglob("*.dcm") if ".incoming" not in path.parts]
    assert len(stored_files) == 2, "one received instance and one SR"
    assert temporary_file_modes == [0o600]
