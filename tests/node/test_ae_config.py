"""`libra-node ae`: AE titles and destinations edited in the configuration file, and C-ECHO tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node import ae_config
from node.config import ConfigError, load_config
from tests.peers import REPO_ROOT, free_port


@pytest.fixture
def config_path(tmp_path) -> Path:
    """A copy of the documented example configuration."""
    path = tmp_path / "node.toml"
    shutil.copy(REPO_ROOT / "config" / "node.toml", path)
    path.chmod(0o640)
    return path


def libra_node_ae(config_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "ae", *arguments, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ae_add_then_remove_restores_file(config_path):
    original = config_path.read_text()
    added = libra_node_ae(config_path, "add", "caller", "CT01", "--host", "10.0.0.7", "--no-reload")
    assert added.returncode == 0, added.stderr
    added = libra_node_ae(config_path, "add", "destination", "archive", "ARCHIVE@10.0.0.9:104", "--sr-class", "basic_text", "--no-reload")
    assert added.returncode == 0, added.stderr

    edited = config_path.read_text()
    assert "# Where draft SRs are sent." in edited
    assert edited.index('ae_title = "CT01"') < edited.index("# Where draft SRs are sent.")
    config = load_config(config_path)
    assert [(caller.ae_title, caller.host) for caller in config.callers] == [("MODALITY1", ""), ("CT01", "10.0.0.7")]
    assert config.destinations[-1].sr_class.value == "basic_text"
    assert (config_path.stat().st_mode & 0o777) == 0o640

    assert libra_node_ae(config_path, "remove", "caller", "CT01", "--no-reload").returncode == 0
    assert libra_node_ae(config_path, "remove", "destination", "archive", "--no-reload").returncode == 0
    assert config_path.read_text() == original


def test_ae_list_prints_callers_and_destinations(config_path):
    result = libra_node_ae(config_path, "list", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["callers"] == [{"ae_title": "MODALITY1", "host": ""}]
    assert listing["destinations"][0]["name"] == "pacs"

    table = libra_node_ae(config_path, "list")
    assert "MODALITY1" in table.stdout
    assert "PACS" in table.stdout


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("A" * 17, "has 17 characters; the maximum is 16"),
        ("CT\\01", "contains a backslash"),
        ("CT\x0701", "contains a control character"),
        ("    ", "empty or all spaces"),
    ],
    ids=["too-long", "backslash", "control-character", "all-spaces"],
)
def test_ae_add_invalid_title_rejected(config_path, title, expected):
    original = config_path.read_text()
    result = libra_node_ae(config_path, "add", "caller", title, "--no-reload")
    assert result.returncode == 2
    assert expected in result.stderr
    assert config_path.read_text() == original


def test_ae_add_invalid_destination_title_rejected(config_path):
    result = libra_node_ae(config_path, "add", "destination", "far", "P" * 17 + "@10.0.0.5:104", "--no-reload")
    assert result.returncode == 2
    assert "has 17 characters" in result.stderr


def test_ae_add_duplicate_rejected(config_path):
    with pytest.raises(ae_config.AEConfigError, match="'MODALITY1' is already allowed"):
        ae_config.add_caller(config_path, "MODALITY1")
    destination = ae_config.make_destination({"name": "pacs", "ae_title": "PACS2", "host": "10.0.0.5", "port": 104})
    with pytest.raises(ae_config.AEConfigError, match="destination 'pacs' already exists"):
        ae_config.add_destination(config_path, destination)


def test_ae_remove_last_caller_needs_flag(config_path):
    rejected = libra_node_ae(config_path, "remove", "caller", "MODALITY1", "--no-reload")
    assert rejected.returncode == 2
    assert "last [[callers]] entry" in rejected.stderr
    assert load_config(config_path).callers

    allowed = libra_node_ae(config_path, "remove", "caller", "MODALITY1", "--allow-any-caller", "--no-reload")
    assert allowed.returncode == 0, allowed.stderr
    assert load_config(config_path).callers == []


def test_ae_remove_unknown_entry_rejected(config_path):
    with pytest.raises(ae_config.AEConfigError, match="calling AE title 'CT99' is not in"):
        ae_config.remove_caller(config_path, "CT99")
    with pytest.raises(ae_config.AEConfigError, match="destination 'nowhere' is not in"):
        ae_config.remove_destination(config_path, "nowhere")


def test_ae_edit_keeps_invalid_file_untouched(config_path):
    config_path.write_text(config_path.read_text().replace("port = 11112", "port = 70000"))
    broken = config_path.read_text()
    with pytest.raises(ConfigError, match="node.port = 70000"):
        ae_config.add_caller(config_path, "CT01")
    assert config_path.read_text() == broken


def test_ae_test_echo_reports_round_trip(config_path, orthanc):
    config_path.write_text(config_path.read_text().replace("port = 4242", f"port = {orthanc.dicom_port}").replace('ae_title = "PACS"', f'ae_title = "{orthanc.ae_title}"'))
    result = libra_node_ae(config_path, "test", "pacs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeeded: status 0x0000, round trip" in result.stdout

    as_json = json.loads(libra_node_ae(config_path, "test", "pacs", "--json").stdout)
    assert as_json["succeeded"] is True
    assert as_json["round_trip_ms"] > 0


def test_ae_test_closed_port_fails(config_path):
    config_path.write_text(config_path.read_text().replace("port = 4242", f"port = {free_port()}"))
    result = libra_node_ae(config_path, "test", "pacs", "--timeout", "5")
    assert result.returncode == 1
    assert "failed: no association" in result.stdout

    unknown = libra_node_ae(config_path, "test", "nowhere")
    assert unknown.returncode == 2
    assert "destination 'nowhere' is not configured" in unknown.stderr
