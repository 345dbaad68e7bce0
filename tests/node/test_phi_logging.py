"""No patient names, IDs, birth dates or accession numbers in any log line, at debug level.

Studies in several character sets, with a malformed birth date and a rejected duplicate, go
from dcmsend through a `libra-node run` process to Orthanc. The node logs at debug level,
which includes the standard library loggers of pynetdicom, highdicom and apscheduler.
Everything it writes to standard error (log lines, Python warnings, anything else) is then
searched for every form of each source's identifying values.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from node.log_config import (
    bind_patient_identifiers,
    patient_identifier_values,
    patient_identifiers_redacted,
    redact_patient_identifiers,
)
from node.sr_builder import DeviceIdentity, DraftReport, build_draft_sr
from node.synthetic import synthetic_chest_study
from tests.node.conftest import MODALITY_AE_TITLE, NODE_AE_TITLE, dcmsend, orthanc_destination
from tests.peers import free_port, start_orthanc, wait_for_port

SR_TIMEOUT_SECONDS = 240


@dataclass(frozen=True)
class Patient:
    """A source patient: the identifying values as written, and how they are encoded."""

    specific_character_set: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    accession_number: str
    name_bytes: bytes | None = None
    """Raw Patient Name bytes that replace the encoded name (for a mismatched character set)."""


PATIENTS = {
    # A name without a caret, which highdicom 0.28 quotes in a warning.
    "iso_ir_100": Patient("ISO_IR 100", "Zyxwvut Qponmlk", "PID-938172641", "19431107", "ACC-555012341"),
    "iso_ir_100_latin": Patient("ISO_IR 100", "Ærøskøbing^Søren", "PID-938172642", "19520229", "ACC-555012342"),
    "iso_ir_192": Patient("ISO_IR 192", "Dvořák^Zoë=王^小明", "PID-938172643", "19610315", "ACC-555012343"),
    "gb18030": Patient("GB18030", "欧阳^娜娜", "PID-938172644", "19700704", "ACC-555012344"),
    "iso_ir_192_with_invalid_utf8": Patient(
        "ISO_IR 192", "", "PID-938172645", "19810101", "ACC-555012345", name_bytes=b"Gr\xfcnwald^J\xfcrgen"
    ),
    "malformed_birth_date": Patient("ISO_IR 100", "Plunkett^Ottoline", "PID-938172646", "1943-11-07", "ACC-555012346"),
}


def write_patient_study(folder: Path, name: str, patient: Patient, seed: int) -> Path:
    """Write one synthetic chest image for the patient and return its path."""
    dataset = synthetic_chest_study(patient_id=patient.patient_id, size=128, seed=seed)
    dataset.SpecificCharacterSet = patient.specific_character_set
    dataset.AccessionNumber = patient.accession_number
    if patient.name_bytes is not None:
        dataset.add(DataElement(0x00100010, "PN", patient.name_bytes))
    else:
        dataset.PatientName = patient.patient_name
    # Not validated, because pydicom's warning about a malformed DA would quote it in the log.
    dataset.add(DataElement(0x00100030, "DA", patient.patient_birth_date, validation_mode=pydicom.config.IGNORE))
    path = folder / f"{name}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def searched_values(path: Path) -> set[str]:
    """Return every form of the file's identifying values that a log line must not contain."""
    return patient_identifier_values(pydicom.dcmread(path, stop_before_pixels=True))


def log_texts(stream_text: str) -> list[str]:
    """Return each log line as text, with JSON lines decoded so that escaped characters match."""
    texts = []
    for line in stream_text.splitlines():
        try:
            texts.append(json.dumps(json.loads(line), ensure_ascii=False))
        except json.JSONDecodeError:
            texts.append(line)
    return texts


def write_node_config(folder: Path, port: int, model_path: Path, orthanc) -> Path:
    """Write a TOML configuration for a `libra-node run` at debug level; return its path."""
    destination = orthanc_destination(orthanc)
    config_path = folder / "node.toml"
    config_path.write_text(
        f"""[node]
ae_title = "{NODE_AE_TITLE}"
bind_address = "127.0.0.1"
port = {port}
data_dir = "{folder / 'node'}"
study_stable_seconds = 1
stability_check_seconds = 0.2
free_disk_reserve_mb = 0

[[callers]]
ae_title = "{MODALITY_AE_TITLE}"

[[destinations]]
name = "{destination['name']}"
ae_title = "{destination['ae_title']}"
host = "{destination['host']}"
port = {destination['port']}

[model]
path = "{model_path}"
max_new_tokens = 16

[worker]
poll_seconds = 0.2

[admin]
port = 0

[logging]
format = "json"
level = "debug"
"""
    )
    return config_path


@pytest.mark.peers
def test_debug_logs_carry_no_patient_identity(tmp_path, tiny_checkpoint):
    sources = {
        name: write_patient_study(tmp_path, name, patient, seed)
        for seed, (name, patient) in enumerate(PATIENTS.items())
    }
    duplicate = pydicom.dcmread(sources["iso_ir_100"])
    duplicate.SeriesDescription = "changed content under the same SOP Instance UID"
    duplicate_path = tmp_path / "duplicate.dcm"
    duplicate.save_as(duplicate_path, enforce_file_format=True)

    orthanc = start_orthanc(tmp_path / "orthanc")
    port = free_port()
    stderr_path = tmp_path / "node-stderr.txt"
    try:
        config_path = write_node_config(tmp_path, port, tiny_checkpoint, orthanc)
        with stderr_path.open("wb") as stderr_file:
            node = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "run", "--config", str(config_path)],
                stdout=stderr_file,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(port, timeout_seconds=120)
            assert dcmsend(port, *sources.values()).returncode == 0
            # Rejected with DUPLICATE_SOP_INSTANCE, which dcmsend does not count as an error.
            dcmsend(port, duplicate_path)
            srs = orthanc.wait_for_instances("SR", len(PATIENTS), SR_TIMEOUT_SECONDS)
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=120)
    finally:
        orthanc.stop()

    texts = log_texts(stderr_path.read_text(encoding="utf-8", errors="replace"))
    joined = "\n".join(texts)
    # The node logged at debug level, the libraries too, and it stopped cleanly.
    assert '"logger": "pynetdicom._handlers"' in joined
    assert '"level": "debug"' in joined
    assert '"event": "receiver.instance_stored"' in joined
    assert '"patient_hash"' in joined
    assert '"status_name": "DUPLICATE_SOP_INSTANCE"' in joined
    assert '"event": "node.stopped"' in joined
    assert len(srs) == len(PATIENTS)

    for name, path in sources.items():
        for value in sorted(searched_values(path)):
            leaks = [text for text in texts if value in text]
            assert leaks == [], f"{name}: {value!r} appears in {len(leaks)} log lines, first: {leaks[:1]}"


def test_malformed_birth_date_sr_built(tmp_path):
    path = write_patient_study(tmp_path, "malformed", PATIENTS["malformed_birth_date"], 0)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    report = DraftReport(
        findings_text="The heart size is normal.",
        model_name="libra-v1.0-7b",
        checkpoint_sha256="0" * 64,
        is_demo_checkpoint=False,
        dicom_conversion="mimic",
        used_real_prior=False,
    )
    device = DeviceIdentity(generate_uid(), "libra-node", "0.1.0", "libra-node project", None)
    with capture_logs() as logs:
        sr = build_draft_sr(
            [header], copy.deepcopy(header), None, report, device,
            series_instance_uid=generate_uid(), series_number=901,
            series_description="Libra findings", sop_instance_uid=generate_uid(),
        )
    assert "PatientBirthDate" in sr
    assert sr["PatientBirthDate"].is_empty
    assert sr.PatientID == PATIENTS["malformed_birth_date"].patient_id
    emptied = [entry for entry in logs if entry["event"] == "sr_builder.invalid_attribute_emptied"]
    assert [entry["keyword"] for entry in emptied] == ["PatientBirthDate"]
    assert "1943-11-07" not in repr(logs)


def test_redaction_spares_uids_and_unbinds():
    dataset = synthetic_chest_study(patient_id="123456", patient_name="Quill^Ada")
    message = f"cannot convert '123456' for Quill Ada in {dataset.StudyInstanceUID}.123456.7"
    with patient_identifiers_redacted():
        bind_patient_identifiers(dataset)
        redacted = redact_patient_identifiers(message)
    assert redacted == f"cannot convert '[removed]' for [removed] in {dataset.StudyInstanceUID}.123456.7"
    assert redact_patient_identifiers(message) == message


def test_identifier_values_cover_name_forms():
    dataset = synthetic_chest_study(patient_id="PID-1", patient_name="Dvořák^Zoë=王^小明")
    dataset.PatientBirthDate = "19610315"
    values = patient_identifier_values(dataset)
    for expected in ("Dvořák^Zoë=王^小明", "Dvořák Zoë", "小明", "PID-1", "19610315", "1961-03-15"):
        assert expected in values, expected
