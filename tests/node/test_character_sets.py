"""Patient names in ISO_IR 100, ISO_IR 192 and GB18030, and names whose bytes do not match
their declared Specific Character Set.

Valid names reach the index decoded and the SR byte for byte. A name with invalid bytes is
stored and indexed (with replacement characters in the index), the node keeps serving, and
the SR carries the source's own bytes while it keeps the source's character set.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from sqlalchemy import select
from structlog.testing import capture_logs

from node.index.models import Instance, Study
from node.service import NodeService
from node.sr_builder import DeviceIdentity, DraftReport, build_draft_sr
from node.synthetic import synthetic_chest_study
from tests.node.conftest import dcmsend, node_config, orthanc_destination
from tests.peers import start_orthanc

PATIENT_NAME_TAG = 0x00100010
SR_TIMEOUT_SECONDS = 240


@dataclass(frozen=True)
class NameCase:
    """A Specific Character Set and the raw Patient Name bytes written under it."""

    specific_character_set: str
    raw_patient_name: bytes
    valid: bool


CASES = {
    "iso_ir_100": NameCase("ISO_IR 100", "Müller^Jürgen".encode("latin-1"), True),
    "iso_ir_192": NameCase("ISO_IR 192", "Dvořák^Zoë=王^小明".encode("utf-8"), True),
    "gb18030": NameCase("GB18030", "王^小明".encode("gb18030"), True),
    "iso_ir_100_with_utf8_bytes": NameCase("ISO_IR 100", "Müller^Jürgen".encode("utf-8"), False),
    "iso_ir_100_with_gb18030_bytes": NameCase("ISO_IR 100", "王^小明".encode("gb18030"), False),
    "iso_ir_192_with_invalid_utf8": NameCase("ISO_IR 192", b"M\xfcller^J\xfcrgen", False),
    "gb18030_with_invalid_bytes": NameCase("GB18030", b"\x81\x30\xff\xff^Wang", False),
}
INVALID_CASES = {name: case for name, case in CASES.items() if not case.valid}

DEVICE = DeviceIdentity(
    device_uid=generate_uid(),
    node_name="libra-node",
    node_version="0.1.0",
    manufacturer="libra-node project",
    institution_name=None,
)


def padded(raw_value: bytes) -> bytes:
    """Return a value padded with one space to an even length, as it is written."""
    return raw_value + b" " if len(raw_value) % 2 else raw_value


def write_case(folder: Path, name: str, case: NameCase, patient_number: int) -> Path:
    """Write a synthetic chest image whose Patient Name has the case's raw bytes."""
    dataset = synthetic_chest_study(patient_id=f"CHARSET-{patient_number:04d}", size=128, seed=patient_number)
    dataset.SpecificCharacterSet = case.specific_character_set
    dataset.add(DataElement(PATIENT_NAME_TAG, "PN", padded(case.raw_patient_name)))
    path = folder / f"{name}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def raw_patient_name(source: Path | bytes) -> bytes:
    """Return the undecoded Patient Name bytes of a file (a path or the file's bytes)."""
    dataset = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True)
    return dataset.get_item(PATIENT_NAME_TAG).value


def decoded_patient_name(path: Path) -> str:
    """Return the Patient Name as pydicom decodes it (with replacement characters if invalid)."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).PatientName)


def draft_report(findings_text: str) -> DraftReport:
    return DraftReport(
        findings_text=findings_text,
        model_name="libra-v1.0-7b",
        checkpoint_sha256="0" * 64,
        is_demo_checkpoint=False,
        dicom_conversion="mimic",
        used_real_prior=False,
    )


def build_sr(source_path: Path, findings_text: str) -> pydicom.Dataset:
    """Build a draft SR from a file's header as the worker does, and read it back."""
    header = pydicom.dcmread(source_path, stop_before_pixels=True)
    sr = build_draft_sr(
        [header], header, None, draft_report(findings_text), DEVICE,
        series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


# --- SR builder -------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", CASES)
def test_sr_name_bytes_kept_with_source_charset(tmp_path, case_name):
    case = CASES[case_name]
    source_path = write_case(tmp_path, case_name, case, 1)
    sr = build_sr(source_path, "The heart size is normal.")
    assert sr.SpecificCharacterSet == case.specific_character_set
    assert sr.get_item(PATIENT_NAME_TAG).value == padded(case.raw_patient_name)


@pytest.mark.parametrize("case_name", ["iso_ir_100", "iso_ir_100_with_utf8_bytes", "iso_ir_100_with_gb18030_bytes"])
def test_sr_name_text_kept_after_utf8_switch(tmp_path, case_name):
    case = CASES[case_name]
    source_path = write_case(tmp_path, case_name, case, 1)
    sr = build_sr(source_path, "Heart size → unchanged.")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    # The name reads as the source's declared character set makes it read, even when the
    # source's bytes were meant in another one.
    assert str(sr.PatientName) == decoded_patient_name(source_path)


def test_sr_undecodable_name_replaced_after_utf8_switch(tmp_path):
    # 0xA1 is not a character of ISO 8859-6, and ISO_IR 127 cannot encode the arrow, so the SR
    # switches to UTF-8 and the invalid byte cannot be carried.
    case = NameCase("ISO_IR 127", b"Ali^\xa1", False)
    source_path = write_case(tmp_path, "iso_ir_127_invalid", case, 1)
    with capture_logs() as logs:
        sr = build_sr(source_path, "Heart size → unchanged.")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == "Ali^\ufffd"
    replaced = [entry for entry in logs if entry["event"] == "sr_builder.undecodable_value_replaced"]
    assert [entry["keyword"] for entry in replaced] == ["PatientName"]


@pytest.mark.parametrize("case_name", INVALID_CASES)
def test_sr_undecodable_name_copy_logged_without_value(tmp_path, case_name):
    case = CASES[case_name]
    source_path = write_case(tmp_path, case_name, case, 1)
    with capture_logs() as logs:
        build_sr(source_path, "The heart size is normal.")
    copied = [entry for entry in logs if entry["event"] == "sr_builder.undecodable_value_copied"]
    decodable_as_declared = case.specific_character_set == "ISO_IR 100"
    assert [entry["keyword"] for entry in copied] == ([] if decodable_as_declared else ["PatientName"])
    assert decoded_patient_name(source_path) not in repr(logs)


# --- Whole path: C-STORE in, index, SR out at Orthanc -----------------------------------------


@dataclass(frozen=True)
class CaseOutcome:
    """What the node made of one case: the source, its stored file, index row and SR."""

    source_path: Path
    stored_path: Path
    indexed_patient_name: str
    sr: pydicom.Dataset
    sr_raw_patient_name: bytes


@pytest.fixture(scope="module")
def node_run(tmp_path_factory, tiny_checkpoint):
    """Send one study per case through one node to Orthanc, and collect every outcome."""
    workdir = tmp_path_factory.mktemp("character-sets")
    orthanc = start_orthanc(workdir / "orthanc")
    node = None
    try:
        config = node_config(workdir / "node", tiny_checkpoint, destinations=[orthanc_destination(orthanc)])
        node = NodeService(config)
        node.start()
        sources = {name: write_case(workdir, name, case, number) for number, (name, case) in enumerate(CASES.items())}
        result = dcmsend(node.receiver.port, *sources.values())
        assert result.returncode == 0, result.stderr

        found = orthanc.wait_for_instances("SR", len(CASES), SR_TIMEOUT_SECONDS)
        srs = {}
        for entry in found:
            sr_bytes = orthanc.get_bytes(f"/instances/{entry['_id']}/file")
            sr = pydicom.dcmread(io.BytesIO(sr_bytes))
            srs[str(sr.StudyInstanceUID)] = (sr, raw_patient_name(sr_bytes))

        outcomes = {}
        with node.index.transaction() as session:
            for name, source_path in sources.items():
                source = pydicom.dcmread(source_path, stop_before_pixels=True)
                study_instance_uid = str(source.StudyInstanceUID)
                study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
                instance = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == str(source.SOPInstanceUID))
                ).one()
                sr, sr_raw = srs[study_instance_uid]
                outcomes[name] = CaseOutcome(
                    source_path, node.store.absolute(instance.file_path), study.patient_name, sr, sr_raw
                )
        yield node, outcomes
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


@pytest.mark.peers
@pytest.mark.parametrize("case_name", CASES)
def test_node_stores_name_bytes_unchanged(node_run, case_name):
    _, outcomes = node_run
    outcome = outcomes[case_name]
    assert raw_patient_name(outcome.stored_path) == padded(CASES[case_name].raw_patient_name)


@pytest.mark.peers
@pytest.mark.parametrize("case_name", CASES)
def test_node_indexes_decoded_name(node_run, case_name):
    _, outcomes = node_run
    outcome = outcomes[case_name]
    assert outcome.indexed_patient_name == decoded_patient_name(outcome.source_path)


@pytest.mark.peers
@pytest.mark.parametrize("case_name", CASES)
def test_node_sr_carries_name(node_run, case_name):
    _, outcomes = node_run
    outcome = outcomes[case_name]
    case = CASES[case_name]
    if outcome.sr.SpecificCharacterSet == case.specific_character_set:
        assert outcome.sr_raw_patient_name == padded(case.raw_patient_name)
    else:
        # Only a character set that cannot encode the generated text is replaced.
        assert outcome.sr.SpecificCharacterSet == "ISO_IR 192"
        assert case.specific_character_set == "ISO_IR 100"
        assert str(outcome.sr.PatientName) == decoded_patient_name(outcome.source_path)


@pytest.mark.peers
def test_node_keeps_serving_after_bad_names(node_run, tmp_path):
    node, _ = node_run
    path = write_case(tmp_path, "after", CASES["iso_ir_100"], 99)
    assert dcmsend(node.receiver.port, path).returncode == 0
