"""Configuration reload: new callers and destinations apply without dropping associations."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pydicom
import pytest
import tomlkit
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import ConfigError
from node.dimse_status import DimseStatus
from tests.node.conftest import MODALITY_AE_TITLE, NODE_AE_TITLE, node_document, wait_until
from tests.peers import CHEST_PA_JPEG_BASELINE, free_port, wait_for_port


def _associate(port: int, calling_ae_title: str, dataset: pydicom.Dataset | None = None):
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(Verification)
    if dataset is not None:
        ae.add_requested_context(dataset.SOPClassUID, str(dataset.file_meta.TransferSyntaxUID))
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE_TITLE)


def _echo_status(port: int, calling_ae_title: str) -> int | None:
    assoc = _associate(port, calling_ae_title)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _api_post(node, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.admin.port}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _api_delete(node, path: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.admin.port}{path}", method="DELETE", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_reload_keeps_open_association(make_node):
    node = make_node(run_worker=False, config_file=True)
    dataset = pydicom.dcmread(CHEST_PA_JPEG_BASELINE)
    open_association = _associate(node.receiver.port, MODALITY_AE_TITLE, dataset)
    assert open_association.is_established
    try:
        added = _api_post(node, "/api/ae/callers", {"ae_title": "MODALITY2"})
        assert added["reload"]["callers"] == [MODALITY_AE_TITLE, "MODALITY2"]
        removed = _api_delete(node, f"/api/ae/callers/{MODALITY_AE_TITLE}")
        assert removed["reload"]["callers"] == ["MODALITY2"]

        assert open_association.is_established
        assert int(open_association.send_c_store(dataset).Status) == DimseStatus.SUCCESS
    finally:
        open_association.release()

    assert _echo_status(node.receiver.port, MODALITY_AE_TITLE) is None
    assert _echo_status(node.receiver.port, "MODALITY2") == DimseStatus.SUCCESS
    assert [caller.ae_title for caller in node.config.callers] == ["MODALITY2"]


def test_reload_applies_new_destination_to_sender(make_node):
    node = make_node(run_worker=False, config_file=True)
    _api_post(node, "/api/ae/destinations", {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 104})
    assert [destination.name for destination in node.sender.config.destinations] == ["archive"]
    assert node.worker is None
    assert node.receiver.config is node.config


def test_reload_invalid_file_keeps_running_config(make_node):
    node = make_node(run_worker=False, config_file=True)
    node.config_path.write_text(node.config_path.read_text().replace('ae_title = "MODALITY1"', 'ae_title = "MODALITY\\\\1"'))
    with pytest.raises(ConfigError, match="contains a backslash"):
        node.reload_config()
    assert [caller.ae_title for caller in node.config.callers] == [MODALITY_AE_TITLE]
    assert _echo_status(node.receiver.port, MODALITY_AE_TITLE) == DimseStatus.SUCCESS


def test_reload_reports_sections_needing_restart(make_node):
    node = make_node(run_worker=False, config_file=True)
    node.config_path.write_text(node.config_path.read_text().replace("study_stable_seconds = 1.0", "study_stable_seconds = 5.0"))
    result = node.reload_config()
    assert result.restart_needed_for == ("node",)
    assert node.config.node.study_stable_seconds == 1.0


def test_sighup_reloads_running_node(tmp_path, tiny_checkpoint):
    """A `libra-node run` process applies an `ae add --no-reload` edit when it receives SIGHUP."""
    document = node_document(tmp_path / "node", tiny_checkpoint, worker={"enabled": False}, admin={"port": free_port()})
    document["logging"] = {"format": "json"}
    config_path = tmp_path / "node.toml"
    config_path.write_text(tomlkit.dumps(document))
    port = document["node"]["port"]
    log_path = tmp_path / "node.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "run", "--config", str(config_path)], stderr=log_file, stdout=log_file
        )
    try:
        wait_for_port(port, timeout_seconds=120)
        assert _echo_status(port, "MODALITY2") is None
        edit = subprocess.run(
            [sys.executable, "-m", "node.cli", "ae", "add", "caller", "MODALITY2", "--no-reload", "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert edit.returncode == 0, edit.stderr
        assert _echo_status(port, "MODALITY2") is None

        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "node.config_reloaded" in log_path.read_text(), 30, "the node logs node.config_reloaded")
        assert _echo_status(port, "MODALITY2") == DimseStatus.SUCCESS
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode == 0


def test_ae_command_reloads_running_node(make_node):
    node = make_node(run_worker=False, config_file=True)
    config = tomlkit.parse(node.config_path.read_text())
    config["admin"]["port"] = node.admin.port
    node.config_path.write_text(tomlkit.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "ae", "add", "caller", "MODALITY3", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "The running node reloaded its callers and destinations." in result.stdout
    assert _echo_status(node.receiver.port, "MODALITY3") == DimseStatus.SUCCESS
