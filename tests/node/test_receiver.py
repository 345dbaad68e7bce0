"""Receiver: association checks, C-ECHO, and the C-STORE statuses for good and bad input."""

from __future__ import annotations

import copy
import socket
import subprocess
import threading

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import func, select
from structlog.testing import capture_logs

from node.dimse_status import DimseStatus
from node.index.models import Instance
from node.receiver import LargeReadAssociationSocket
from tests.node.conftest import MODALITY_AE_TITLE, NODE_AE_TITLE, dcmsend
from tests.peers import CHEST_CT, CHEST_PA_JPEG_BASELINE


def _echoscu(port: int, calling: str = MODALITY_AE_TITLE, called: str = NODE_AE_TITLE):
    return subprocess.run(
        ["echoscu", "127.0.0.1", str(port), "-aet", calling, "-aec", called], capture_output=True, text=True, timeout=60
    )


def _store(port: int, dataset, calling: str = MODALITY_AE_TITLE) -> int | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(dataset.SOPClassUID, str(dataset.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE_TITLE)
    assert assoc.is_established
    try:
        response = assoc.send_c_store(dataset)
        return int(response.Status) if "Status" in response else None
    finally:
        assoc.release()


def _instance_count(node) -> int:
    with node.index.transaction() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def _store_files(node) -> list:
    return [path for path in node.store.root.rglob("*.dcm") if ".incoming" not in path.parts]


@pytest.fixture
def chest():
    return pydicom.dcmread(CHEST_PA_JPEG_BASELINE)


@pytest.fixture
def receiving_node(make_node):
    return make_node(run_worker=False)


def test_c_echo_from_allowed_caller_succeeds(receiving_node):
    result = _echoscu(receiving_node.receiver.port)
    assert result.returncode == 0, result.stderr


def test_association_unknown_calling_ae_rejected(receiving_node):
    with capture_logs() as logs:
        result = _echoscu(receiving_node.receiver.port, calling="INTRUDER")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" not in result.stderr
    rejections = [entry for entry in logs if entry["event"] == "receiver.association_rejected"]
    assert rejections[0]["calling_ae_title"] == "INTRUDER"


def test_association_wrong_called_ae_rejected(receiving_node):
    with capture_logs() as logs:
        result = _echoscu(receiving_node.receiver.port, called="SOMEONE_ELSE")
    assert result.returncode != 0
    assert any(entry["event"] == "receiver.association_rejected" for entry in logs)


def test_association_caller_from_wrong_host_rejected(make_node):
    node = make_node(run_worker=False, callers=[{"ae_title": MODALITY_AE_TITLE, "host": "127.0.0.2"}])
    assert _echoscu(node.receiver.port).returncode != 0


def test_c_store_valid_instance_stored_and_indexed(receiving_node, chest):
    assert _store(receiving_node.receiver.port, chest) == DimseStatus.SUCCESS
    assert _instance_count(receiving_node) == 1
    stored = _store_files(receiving_node)
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).SOPInstanceUID == chest.SOPInstanceUID


def test_c_store_identical_duplicate_stored_once(receiving_node, chest):
    assert _store(receiving_node.receiver.port, chest) == DimseStatus.SUCCESS
    assert _store(receiving_node.receiver.port, chest) == DimseStatus.SUCCESS
    assert _instance_count(receiving_node) == 1


def test_c_store_different_duplicate_keeps_first(receiving_node, chest):
    assert _store(receiving_node.receiver.port, chest) == DimseStatus.SUCCESS
    changed = copy.deepcopy(chest)
    changed.SeriesDescription = "changed"
    assert _store(receiving_node.receiver.port, changed) == DimseStatus.DUPLICATE_SOP_INSTANCE
    stored = _store_files(receiving_node)
    assert pydicom.dcmread(stored[0]).SeriesDescription == chest.SeriesDescription


def test_c_store_same_uid_other_study_keeps_first(receiving_node, chest):
    assert _store(receiving_node.receiver.port, chest) == DimseStatus.SUCCESS
    moved = copy.deepcopy(chest)
    moved.StudyInstanceUID = generate_uid()
    assert _store(receiving_node.receiver.port, moved) == DimseStatus.DUPLICATE_SOP_INSTANCE
    assert _instance_count(receiving_node) == 1
    stored = _store_files(receiving_node)
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).StudyInstanceUID == chest.StudyInstanceUID


def test_accepted_association_uses_large_read_socket(receiving_node):
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", receiving_node.receiver.port, ae_title=NODE_AE_TITLE)
    assert assoc.is_established
    try:
        accepted = receiving_node.receiver._server.active_associations
        assert [type(association.dul.socket) for association in accepted] == [LargeReadAssociationSocket]
    finally:
        assoc.release()


def _reader_over(connection: socket.socket) -> LargeReadAssociationSocket:
    reader = LargeReadAssociationSocket.__new__(LargeReadAssociationSocket)
    reader.socket = connection
    return reader


def test_large_read_socket_joins_partial_sends():
    receiving, sending = socket.socketpair()
    payload = bytes(range(256)) * 1000
    chunks = [payload[start : start + 7000] for start in range(0, len(payload), 7000)]
    sender = threading.Thread(target=lambda: [sending.sendall(chunk) for chunk in chunks])
    sender.start()
    try:
        assert _reader_over(receiving).recv(len(payload)) == payload
    finally:
        sender.join()
        receiving.close()
        sending.close()


def test_large_read_socket_returns_short_read_on_close():
    receiving, sending = socket.socketpair()
    sending.sendall(b"abc")
    sending.close()
    try:
        data = _reader_over(receiving).recv(10)
    finally:
        receiving.close()
    assert data == bytearray(b"abc")
    assert isinstance(data, bytearray)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        (lambda ds: delattr(ds, "SeriesInstanceUID"), DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2.3/../../etc"), DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2." + "3" * 70), DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        (lambda ds: setattr(ds, "Modality", "OT"), DimseStatus.SOP_CLASS_NOT_SUPPORTED),
    ],
    ids=["missing-study-uid", "missing-series-uid", "study-uid-with-slash", "series-uid-too-long", "secondary-capture-not-xray"],
)
def test_c_store_bad_dataset_rejected_nothing_stored(receiving_node, chest, change, expected):
    change(chest)
    assert _store(receiving_node.receiver.port, chest) == expected
    assert _instance_count(receiving_node) == 0
    assert _store_files(receiving_node) == []


def test_c_store_truncated_pixel_data_cannot_understand(receiving_node, tmp_path, monkeypatch):
    dataset = pydicom.dcmread(CHEST_PA_JPEG_BASELINE)
    dataset.decompress()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    full_path = tmp_path / "full.dcm"
    dataset.save_as(full_path, enforce_file_format=True)
    truncated_path = tmp_path / "truncated.dcm"
    truncated_path.write_bytes(full_path.read_bytes()[:-5000])

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiving_node.receiver.port, ae_title=NODE_AE_TITLE)
    response = assoc.send_c_store(truncated_path)
    assoc.release()
    assert response.Status == DimseStatus.CANNOT_UNDERSTAND
    assert _instance_count(receiving_node) == 0


def test_c_store_ct_context_rejected_others_accepted(receiving_node):
    with capture_logs() as logs:
        result = dcmsend(receiving_node.receiver.port, CHEST_CT, CHEST_PA_JPEG_BASELINE)
    assert "No presentation context" in result.stderr
    assert _instance_count(receiving_node) == 1
    rejected = [entry for entry in logs if entry["event"] == "receiver.presentation_contexts_rejected"]
    assert rejected[0]["rejected_sop_class_uids"] == ["1.2.840.10008.5.1.4.1.1.2"]


def test_c_store_log_lines_carry_no_patient_identity(receiving_node, chest):
    with capture_logs() as logs:
        assert _store(receiving_node.receiver.port, chest) == DimseStatus.SUCCESS
    text = repr(logs)
    assert str(chest.PatientID) not in text
    assert str(chest.PatientName) not in text
    assert any(entry.get("sop_instance_uid") == chest.SOPInstanceUID for entry in logs)


def test_c_store_same_patient_id_other_issuer_is_other_patient(receiving_node, chest):
    from node.index.models import Patient

    other = copy.deepcopy(chest)
    other.IssuerOfPatientID = "OTHER_HOSPITAL"
    other.StudyInstanceUID = generate_uid()
    other.SeriesInstanceUID = generate_uid()
    other.SOPInstanceUID = generate_uid()
    assert _store(receiving_node.receiver.port, chest) == DimseStatus.SUCCESS
    with capture_logs() as logs:
        assert _store(receiving_node.receiver.port, other) == DimseStatus.SUCCESS
    with receiving_node.index.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Patient)) == 2
    clashes = [entry for entry in logs if entry["event"] == "index.patient_id_clash"]
    assert len(clashes) == 1
    assert str(chest.PatientID) not in repr(clashes)


def test_send_tool_sends_compressed_files_in_own_syntax(receiving_node):
    from node.send_tool import send_datasets
    from tests.peers import CHEST_CT, CHEST_PA_J2K, CHEST_PA_JPEGLS, HIP_CR_RLE

    datasets = [pydicom.dcmread(path) for path in (CHEST_PA_JPEG_BASELINE, CHEST_PA_J2K, CHEST_PA_JPEGLS, HIP_CR_RLE, CHEST_CT)]
    statuses = send_datasets(NODE_AE_TITLE, "127.0.0.1", receiving_node.receiver.port, datasets, MODALITY_AE_TITLE)
    assert statuses == [0, 0, 0, 0, None]
    with receiving_node.index.transaction() as session:
        stored = dict(session.execute(select(Instance.sop_instance_uid, Instance.transfer_syntax_uid)).all())
    for dataset in datasets[:4]:
        assert stored[dataset.SOPInstanceUID] == dataset.file_meta.TransferSyntaxUID
