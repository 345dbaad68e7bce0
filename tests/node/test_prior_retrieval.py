"""Prior retrieval: Orthanc stores the patient's earlier studies, the node receives only the current one."""

from __future__ import annotations

import copy
import io
import socket
import subprocess

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from structlog.testing import capture_logs

from node.index.models import ReportJob, Study, StudyState
from node.index.records import create_retrieval_placeholder
from tests.node.conftest import NODE_AE_TITLE, dcmsend, orthanc_destination, wait_until
from tests.peers import CHEST_CT, CHEST_PA_JPEG_BASELINE, HIP_CR_RLE, free_port, start_orthanc

SR_TIMEOUT_SECONDS = 120
QUERY_AE_TITLE = "QR_PACS"
CURRENT_STUDY_DATE = "20200315"

# Tests of the network paths and match filters run on SQLite only. The tests that write
# retrieved studies into the index run on both index databases.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _copy_as_study(path, study_date: str, issuer: str, accession_number: str) -> pydicom.Dataset:
    """Copy a shared file into a new study of the current study's patient, with new UIDs."""
    dataset = pydicom.dcmread(path)
    patient = pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True)
    dataset = copy.deepcopy(dataset)
    dataset.PatientID = patient.PatientID
    dataset.PatientName = patient.PatientName
    dataset.IssuerOfPatientID = issuer
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.StudyDate = study_date
    dataset.AccessionNumber = accession_number
    return dataset


def _upload(orthanc, dataset: pydicom.Dataset) -> None:
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    orthanc.post("/instances", buffer.getvalue())


def _save(dataset: pydicom.Dataset, path):
    dataset.save_as(path)
    return path


def _query_source(port: int, **extra) -> dict:
    return {"name": "qr", "ae_title": QUERY_AE_TITLE, "host": "127.0.0.1", "port": port} | extra


def _sr(orthanc) -> pydicom.Dataset:
    found = orthanc.wait_for_instances("SR", 1, SR_TIMEOUT_SECONDS)
    assert len(found) == 1
    return pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{found[0]['_id']}/file")))


def _other_evidence(sr: pydicom.Dataset) -> set[tuple[str, str]]:
    uids = set()
    for study_item in sr.get("PertinentOtherEvidenceSequence", []):
        for series_item in study_item.ReferencedSeriesSequence:
            for sop_item in series_item.ReferencedSOPSequence:
                uids.add((str(study_item.StudyInstanceUID), str(sop_item.ReferencedSOPInstanceUID)))
    return uids


def _comparison_text(sr: pydicom.Dataset) -> str:
    for section in sr.ContentSequence:
        if section.ValueType == "CONTAINER" and section.ConceptNameCodeSequence[0].CodeValue == "18834-2":
            return " ".join(str(item.TextValue) for item in section.ContentSequence if item.ValueType == "TEXT")
    raise AssertionError("the SR has no Previous Findings section")


def _retrieved_studies(node) -> list[Study]:
    with node.index.transaction() as session:
        return session.scalars(select(Study).where(Study.retrieved_from.is_not(None))).all()


def _job_count(node, study_instance_uid: str) -> int:
    with node.index.transaction() as session:
        return session.scalar(
            select(func.count())
            .select_from(ReportJob)
            .join(Study, ReportJob.study_fk == Study.id)
            .where(Study.study_instance_uid == study_instance_uid)
        )


@pytest.fixture
def start_query_orthanc(tmp_path):
    """Start an Orthanc with the node in its DicomModalities; each is stopped after the test."""
    servers = []

    def start(node_port: int):
        server = start_orthanc(
            tmp_path / f"query-orthanc-{len(servers)}",
            ae_title=QUERY_AE_TITLE,
            modalities={"libra": [NODE_AE_TITLE, "127.0.0.1", node_port]},
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("retrieve_method", ["move", "get"])
def test_prior_retrieved_and_named_in_sr(make_node, start_query_orthanc, tmp_path, retrieve_method):
    node_port = free_port()
    pacs = start_query_orthanc(node_port)
    prior = _copy_as_study(CHEST_PA_JPEG_BASELINE, "20190210", "HOSP_A", "PRIOR1")
    # A lateral image in the same series, which the node must not retrieve.
    prior_lateral = copy.deepcopy(prior)
    prior_lateral.SOPInstanceUID = generate_uid()
    prior_lateral.file_meta.MediaStorageSOPInstanceUID = prior_lateral.SOPInstanceUID
    prior_lateral.ViewPosition = "LL"
    prior_lateral.InstanceNumber = 2
    _upload(pacs, prior_lateral)
    _upload(pacs, prior)
    current = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, "HOSP_A", "CURR1")

    node = make_node(
        node={"port": node_port},
        destinations=[orthanc_destination(pacs)],
        query_sources=[_query_source(pacs.dicom_port, retrieve_method=retrieve_method)],
    )
    assert dcmsend(node.receiver.port, _save(current, tmp_path / "current.dcm")).returncode == 0
    sr = _sr(pacs)

    assert str(sr.StudyInstanceUID) == str(current.StudyInstanceUID)
    assert _other_evidence(sr) == {(str(prior.StudyInstanceUID), str(prior.SOPInstanceUID))}
    comparison = _comparison_text(sr)
    assert "PRIOR1" in comparison
    assert f"retrieved this prior study from PACS {QUERY_AE_TITLE}" in comparison

    retrieved = _retrieved_studies(node)
    assert [study.study_instance_uid for study in retrieved] == [str(prior.StudyInstanceUID)]
    assert retrieved[0].retrieved_from == QUERY_AE_TITLE
    assert retrieved[0].frontal_sop_instance_uid == str(prior.SOPInstanceUID)
    assert retrieved[0].instance_count == 1
    assert retrieved[0].state == StudyState.SKIPPED
    assert _job_count(node, str(prior.StudyInstanceUID)) == 0


@sqlite_only
def test_prior_later_and_non_chest_not_used(make_node, start_query_orthanc, tmp_path):
    node_port = free_port()
    pacs = start_query_orthanc(node_port)
    # The PACS leaves out the later day by the Study Date range. The node drops the later
    # study of the same day by its Study Time.
    later_chest = _copy_as_study(CHEST_PA_JPEG_BASELINE, "20210101", "HOSP_A", "LATER1")
    same_day_later_chest = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, "HOSP_A", "LATER2")
    same_day_later_chest.StudyTime = "150000"
    earlier_hip = _copy_as_study(HIP_CR_RLE, "20190101", "HOSP_A", "HIP1")
    earlier_ct = _copy_as_study(CHEST_CT, "20190601", "HOSP_A", "CT1")
    for dataset in (later_chest, same_day_later_chest, earlier_hip, earlier_ct):
        _upload(pacs, dataset)
    current = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, "HOSP_A", "CURR1")
    current.StudyTime = "100000"

    node = make_node(
        node={"port": node_port},
        destinations=[orthanc_destination(pacs)],
        query_sources=[_query_source(pacs.dicom_port)],
    )
    with capture_logs() as logs:
        assert dcmsend(node.receiver.port, _save(current, tmp_path / "current.dcm")).returncode == 0
        sr = _sr(pacs)

    assert _other_evidence(sr) == set()
    assert _comparison_text(sr).startswith("No prior chest study")
    assert "failed" not in _comparison_text(sr)
    assert _retrieved_studies(node) == []
    found = [entry for entry in logs if entry["event"] == "prior_retrieval.studies_found"]
    assert found[0]["matches"] == 2
    assert found[0]["rejected"] == {"not earlier than the current study": 1}
    assert found[0]["candidates"] == 1
    skipped = [entry for entry in logs if entry["event"] == "prior_retrieval.candidate_skipped"]
    assert [entry["candidate_study_instance_uid"] for entry in skipped] == [str(earlier_hip.StudyInstanceUID)]
    assert skipped[0]["reason"] == "not a chest study: Body Part Examined HIP"


@sqlite_only
@pytest.mark.parametrize(("current_issuer", "prior_issuer"), [("HOSP_A", "HOSP_B"), ("", "HOSP_B")])
def test_prior_other_issuer_not_used(make_node, start_query_orthanc, tmp_path, current_issuer, prior_issuer):
    node_port = free_port()
    pacs = start_query_orthanc(node_port)
    _upload(pacs, _copy_as_study(CHEST_PA_JPEG_BASELINE, "20190210", prior_issuer, "PRIOR1"))
    current = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, current_issuer, "CURR1")

    node = make_node(
        node={"port": node_port},
        destinations=[orthanc_destination(pacs)],
        query_sources=[_query_source(pacs.dicom_port)],
    )
    assert dcmsend(node.receiver.port, _save(current, tmp_path / "current.dcm")).returncode == 0
    sr = _sr(pacs)

    assert _other_evidence(sr) == set()
    assert _comparison_text(sr).startswith("No prior chest study")
    assert _retrieved_studies(node) == []


@sqlite_only
def test_prior_source_stopped_sr_without_prior(make_node, start_query_orthanc, orthanc, tmp_path):
    node_port = free_port()
    pacs = start_query_orthanc(node_port)
    _upload(pacs, _copy_as_study(CHEST_PA_JPEG_BASELINE, "20190210", "HOSP_A", "PRIOR1"))
    pacs.stop()
    current = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, "HOSP_A", "CURR1")

    node = make_node(
        node={"port": node_port},
        destinations=[orthanc_destination(orthanc)],
        query_sources=[_query_source(pacs.dicom_port, query_timeout_seconds=5)],
    )
    with capture_logs() as logs:
        assert dcmsend(node.receiver.port, _save(current, tmp_path / "current.dcm")).returncode == 0
        sr = _sr(orthanc)

    assert _other_evidence(sr) == set()
    assert f"The search for an earlier study at PACS {QUERY_AE_TITLE} failed" in _comparison_text(sr)
    failures = [entry for entry in logs if entry["event"] == "prior_retrieval.source_failed"]
    assert len(failures) == 1
    assert failures[0]["stage"] == "query"
    assert "connection was refused" in failures[0]["reason"]


@sqlite_only
def test_prior_source_silent_times_out(make_node, orthanc, tmp_path):
    # A listening socket that never responds plays a PACS that hangs.
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        current = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, "HOSP_A", "CURR1")
        node = make_node(
            destinations=[orthanc_destination(orthanc)],
            query_sources=[_query_source(silent.getsockname()[1], query_timeout_seconds=1.5)],
        )
        with capture_logs() as logs:
            assert dcmsend(node.receiver.port, _save(current, tmp_path / "current.dcm")).returncode == 0
            sr = _sr(orthanc)
    finally:
        silent.close()

    assert _other_evidence(sr) == set()
    assert f"The search for an earlier study at PACS {QUERY_AE_TITLE} failed" in _comparison_text(sr)
    failures = [entry for entry in logs if entry["event"] == "prior_retrieval.source_failed"]
    assert len(failures) == 1
    assert failures[0]["timed_out"] is True
    assert "timed out after 1.5 s" in failures[0]["reason"]


def test_retrieved_study_never_queued(make_node, tmp_path):
    node = make_node(run_worker=False, query_sources=[_query_source(free_port())])
    prior = _copy_as_study(CHEST_PA_JPEG_BASELINE, "20190210", "HOSP_A", "PRIOR1")
    current = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, "HOSP_A", "CURR1")
    assert dcmsend(node.receiver.port, _save(current, tmp_path / "current.dcm")).returncode == 0

    def current_study_queued():
        with node.index.transaction() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == str(current.StudyInstanceUID))).first()
            return study if study is not None and study.state == StudyState.QUEUED else None

    patient_fk = wait_until(current_study_queued, 30, "the current study is queued").patient_fk
    with node.index.transaction() as session:
        create_retrieval_placeholder(session, str(prior.StudyInstanceUID), patient_fk, QUERY_AE_TITLE, "test")
    assert dcmsend(node.receiver.port, _save(prior, tmp_path / "prior.dcm"), calling_ae_title=QUERY_AE_TITLE).returncode == 0

    def prior_routed():
        with node.index.transaction() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == str(prior.StudyInstanceUID))).first()
            return study if study is not None and study.state == StudyState.SKIPPED and study.instance_count == 1 else None

    study = wait_until(prior_routed, 30, "the retrieved study is routed")
    assert study.frontal_sop_instance_uid == str(prior.SOPInstanceUID)
    assert study.state_reason.startswith(f"prior study retrieved from {QUERY_AE_TITLE}; never reported")
    assert _job_count(node, str(prior.StudyInstanceUID)) == 0
    assert _job_count(node, str(current.StudyInstanceUID)) == 1


def test_placeholder_takes_patient_of_instance(make_node, tmp_path):
    node = make_node(run_worker=False, query_sources=[_query_source(free_port())])
    other_patient = _copy_as_study(CHEST_PA_JPEG_BASELINE, "20190210", "HOSP_A", "PRIOR1")
    other_patient.PatientID = "SOMEONE-ELSE"
    current = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, "HOSP_A", "CURR1")
    assert dcmsend(node.receiver.port, _save(current, tmp_path / "current.dcm")).returncode == 0

    def current_patient_fk():
        with node.index.transaction() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == str(current.StudyInstanceUID))).first()
            return study.patient_fk if study is not None else None

    patient_fk = wait_until(current_patient_fk, 30, "the current study is indexed")
    with node.index.transaction() as session:
        create_retrieval_placeholder(session, str(other_patient.StudyInstanceUID), patient_fk, QUERY_AE_TITLE, "test")
    assert dcmsend(node.receiver.port, _save(other_patient, tmp_path / "other.dcm"), calling_ae_title=QUERY_AE_TITLE).returncode == 0

    with node.index.transaction() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == str(other_patient.StudyInstanceUID))).one()
        assert study.patient.patient_id == "SOMEONE-ELSE"
        assert study.patient_fk != patient_fk
        assert study.accession_number == "PRIOR1"
        assert study.study_date == "20190210"


@sqlite_only
def test_receiver_accepts_query_source_caller(make_node):
    node = make_node(run_worker=False, query_sources=[_query_source(free_port())])
    result = subprocess.run(
        ["echoscu", "127.0.0.1", str(node.receiver.port), "-aet", QUERY_AE_TITLE, "-aec", NODE_AE_TITLE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@sqlite_only
def test_receiver_rejects_query_source_from_other_host(make_node):
    # The node never connects to this documentation address (RFC 5737); it is only compared.
    node = make_node(run_worker=False, query_sources=[_query_source(free_port(), host="192.0.2.10")])
    with capture_logs() as logs:
        result = subprocess.run(
            ["echoscu", "127.0.0.1", str(node.receiver.port), "-aet", QUERY_AE_TITLE, "-aec", NODE_AE_TITLE],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    rejections = [entry for entry in logs if entry["event"] == "receiver.association_rejected"]
    assert rejections[0]["calling_ae_title"] == QUERY_AE_TITLE


@sqlite_only
def test_prior_move_failure_sr_without_prior(make_node, start_query_orthanc, tmp_path):
    # Orthanc has the node's AE title in DicomModalities, but with a port where nothing
    # listens, so the C-STORE sub-operation of its C-MOVE fails.
    node_port = free_port()
    pacs = start_query_orthanc(free_port())
    prior = _copy_as_study(CHEST_PA_JPEG_BASELINE, "20190210", "HOSP_A", "PRIOR1")
    _upload(pacs, prior)
    current = _copy_as_study(CHEST_PA_JPEG_BASELINE, CURRENT_STUDY_DATE, "HOSP_A", "CURR1")

    node = make_node(
        node={"port": node_port},
        destinations=[orthanc_destination(pacs)],
        query_sources=[_query_source(pacs.dicom_port)],
    )
    with capture_logs() as logs:
        assert dcmsend(node.receiver.port, _save(current, tmp_path / "current.dcm")).returncode == 0
        sr = _sr(pacs)

    assert _other_evidence(sr) == set()
    assert f"The search for an earlier study at PACS {QUERY_AE_TITLE} failed" in _comparison_text(sr)
    failures = [entry for entry in logs if entry["event"] == "prior_retrieval.source_failed"]
    assert [entry["stage"] for entry in failures] == ["retrieve"]
    placeholders = _retrieved_studies(node)
    assert [study.study_instance_uid for study in placeholders] == [str(prior.StudyInstanceUID)]
    assert placeholders[0].instance_count == 0
    assert placeholders[0].state == StudyState.SKIPPED
    assert placeholders[0].state_reason.startswith(f"prior retrieve from {QUERY_AE_TITLE} failed: C-MOVE")
