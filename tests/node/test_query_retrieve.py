"""Query/Retrieve SCU: permission checks against Orthanc, deadlines and role selection against pynetdicom peers."""

from __future__ import annotations

import time

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from sqlalchemy import select
from structlog.testing import capture_logs

from node.cli import main
from node.config import QuerySourceSettings
from node.dimse_status import query_retrieve_status_name
from node.index.models import Patient, Study, StudyState
from node.index.session import IndexDatabase
from node.prior_query import PriorSearchRequest
from node.prior_retrieval import PriorRetriever
from node.query_retrieve import Deadline, QueryRetrieveError, QuerySourceClient, check_query_source
from node.store import FileStore
from tests.node.conftest import NODE_AE_TITLE, node_config
from tests.peers import CHEST_PA_JPEG_BASELINE, free_port, start_orthanc

PEER_AE_TITLE = "PYNETDICOM_QR"


def _source(port: int, retrieve_method: str = "move", ae_title: str = "ORTHANC", **extra) -> QuerySourceSettings:
    return QuerySourceSettings(
        name="qr", ae_title=ae_title, host="127.0.0.1", port=port, retrieve_method=retrieve_method, **extra
    )


@pytest.fixture
def start_peer():
    """Start pynetdicom Q/R SCPs on free loopback ports; each is shut down after the test."""
    servers = []

    def start(handlers, contexts):
        ae = AE(ae_title=PEER_AE_TITLE)
        for context in contexts:
            abstract_syntax, options = context if isinstance(context, tuple) else (context, {})
            ae.add_supported_context(abstract_syntax, **options)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        return port

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize(("retrieve_method", "retrieve_request"), [("move", "C-MOVE"), ("get", "C-GET")])
def test_check_query_source_registered_passes(tmp_path, retrieve_method, retrieve_request):
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"libra": [NODE_AE_TITLE, "127.0.0.1", free_port()]})
    try:
        checks = check_query_source(_source(orthanc.dicom_port, retrieve_method), NODE_AE_TITLE)
    finally:
        orthanc.stop()
    assert [check.request for check in checks] == ["C-ECHO", "C-FIND", retrieve_request]
    for check in checks:
        assert check.passed, check.detail


@pytest.mark.parametrize("retrieve_method", ["move", "get"])
def test_check_query_source_unregistered_fails(tmp_path, retrieve_method):
    orthanc = start_orthanc(tmp_path / "orthanc")
    try:
        echo, find, retrieve = check_query_source(_source(orthanc.dicom_port, retrieve_method), NODE_AE_TITLE)
    finally:
        orthanc.stop()
    assert echo.passed
    assert not find.passed
    assert "AllowFind" in find.detail
    assert not retrieve.passed
    assert ("AllowMove" if retrieve_method == "move" else "AllowGet") in retrieve.detail


def test_check_query_source_stopped_fails(tmp_path):
    orthanc = start_orthanc(tmp_path / "orthanc")
    orthanc.stop()
    checks = check_query_source(_source(orthanc.dicom_port), NODE_AE_TITLE)
    assert [check.passed for check in checks] == [False, False, False]
    assert "connection was refused" in checks[0].detail


def test_ae_test_query_command_exit_status(tmp_path, capsys):
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"libra": [NODE_AE_TITLE, "127.0.0.1", free_port()]})
    config_path = tmp_path / "node.toml"
    config_path.write_text(
        f'[node]\nae_title = "{NODE_AE_TITLE}"\n\n'
        f'[[query_sources]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
    )
    try:
        status = main(["ae", "test-query", "pacs", "--config", str(config_path)])
    finally:
        orthanc.stop()
    output = capsys.readouterr().out
    assert status == 0
    assert [line.split()[:2] for line in output.splitlines()[1:]] == [
        ["PASS", "C-ECHO"],
        ["PASS", "C-FIND"],
        ["PASS", "C-MOVE"],
    ]


def test_ae_test_query_command_unknown_name(tmp_path, capsys):
    config_path = tmp_path / "node.toml"
    config_path.write_text("")
    assert main(["ae", "test-query", "pacs", "--config", str(config_path)]) == 2
    assert "query source 'pacs' is not in" in capsys.readouterr().err


def test_find_past_deadline_times_out(start_peer):
    def handle_find(event):
        for number in range(40):
            time.sleep(0.25)
            answer = Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            answer.StudyInstanceUID = f"1.2.3.{number}"
            yield 0xFF00, answer

    port = start_peer([(evt.EVT_C_FIND, handle_find)], [StudyRootQueryRetrieveInformationModelFind])
    client = QuerySourceClient(_source(port, ae_title=PEER_AE_TITLE), NODE_AE_TITLE)
    deadline = Deadline(1.0)
    assoc = client.associate([(StudyRootQueryRetrieveInformationModelFind, None)], deadline)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    with pytest.raises(QueryRetrieveError) as raised:
        client.find(assoc, identifier, deadline)
    assert raised.value.timed_out
    assert "timed out after 1 s" in str(raised.value)


def test_find_failure_status_named(start_peer):
    def handle_find(event):
        yield 0xA700, None

    port = start_peer([(evt.EVT_C_FIND, handle_find)], [StudyRootQueryRetrieveInformationModelFind])
    client = QuerySourceClient(_source(port, ae_title=PEER_AE_TITLE), NODE_AE_TITLE)
    deadline = Deadline(10)
    assoc = client.associate([(StudyRootQueryRetrieveInformationModelFind, None)], deadline)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    with pytest.raises(QueryRetrieveError, match=r"status 0xA700 \(OUT_OF_RESOURCES\)") as raised:
        client.find(assoc, identifier, deadline)
    assert raised.value.status == 0xA700
    assert not raised.value.timed_out


@pytest.mark.parametrize(("peer_case", "expected_reason"), [
    ("no_scp_role", "SCP/SCU role selection"),
    ("no_get_context", "C-GET to PYNETDICOM_QR@127.0.0.1"),
])
def test_c_get_refused_fails_search(start_peer, tmp_path, peer_case, expected_reason):
    """A PACS that refuses C-GET or the node's Storage SCP role: the failure is logged, no prior."""
    image = pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True)
    prior_study_instance_uid = generate_uid()

    def handle_find(event):
        level = event.identifier.QueryRetrieveLevel
        answer = Dataset()
        answer.QueryRetrieveLevel = level
        answer.StudyInstanceUID = prior_study_instance_uid
        if level == "STUDY":
            answer.PatientID = "P1"
            answer.IssuerOfPatientID = ""
            answer.StudyDate = "20190101"
            answer.StudyTime = "080000"
            answer.StudyDescription = "CHEST"
        elif level == "SERIES":
            answer.SeriesInstanceUID = "1.2.3.4"
            answer.Modality = "CR"
            answer.BodyPartExamined = "CHEST"
        else:
            answer.SeriesInstanceUID = "1.2.3.4"
            answer.SOPInstanceUID = "1.2.3.4.5"
            answer.SOPClassUID = image.SOPClassUID
            answer.ViewPosition = "PA"
        yield 0xFF00, answer

    def handle_get(event):
        yield 0
        yield 0x0000, None

    # pynetdicom accepts a proposed SCP role only for a context added with scp_role=True. The
    # first peer supports the storage classes but refuses the node the SCP role; the second
    # grants the role but does not support C-GET.
    if peer_case == "no_scp_role":
        contexts = [
            (StudyRootQueryRetrieveInformationModelFind, {}),
            (StudyRootQueryRetrieveInformationModelGet, {}),
            (SecondaryCaptureImageStorage, {}),
        ]
    else:
        contexts = [
            (StudyRootQueryRetrieveInformationModelFind, {}),
            (SecondaryCaptureImageStorage, {"scu_role": True, "scp_role": True}),
        ]
    port = start_peer([(evt.EVT_C_FIND, handle_find), (evt.EVT_C_GET, handle_get)], contexts)
    config = node_config(
        tmp_path / "node",
        None,
        query_sources=[{"name": "qr", "ae_title": PEER_AE_TITLE, "host": "127.0.0.1", "port": port, "retrieve_method": "get"}],
    )
    index = IndexDatabase(config.database_url)
    index.upgrade_schema()
    try:
        with index.transaction() as session:
            patient = Patient(patient_id="P1", issuer_of_patient_id="", patient_hash="h")
            session.add(patient)
            session.flush()
            current = Study(
                study_instance_uid=generate_uid(),
                patient_fk=patient.id,
                study_date="20200101",
                study_time="080000",
                state=StudyState.RUNNING,
            )
            session.add(current)
            session.flush()
            request = PriorSearchRequest(
                study_instance_uid=current.study_instance_uid,
                patient_fk=patient.id,
                patient_id="P1",
                issuer_of_patient_id="",
                patient_hash="h",
                study_date="20200101",
                study_time="080000",
            )
        retriever = PriorRetriever(config, index, FileStore(tmp_path / "store"), b"k" * 32, actor="test")
        with capture_logs() as logs:
            result = retriever.search(request)
        with index.transaction() as session:
            placeholder = session.scalars(select(Study).where(Study.study_instance_uid == prior_study_instance_uid)).one()
    finally:
        index.dispose()

    assert result.retrieved_study_instance_uid is None
    assert result.failed_ae_titles == (PEER_AE_TITLE,)
    failures = [entry for entry in logs if entry["event"] == "prior_retrieval.source_failed"]
    assert [entry["stage"] for entry in failures] == ["retrieve"]
    assert expected_reason in failures[0]["reason"]
    assert placeholder.instance_count == 0
    assert placeholder.state_reason.startswith(f"prior retrieve from {PEER_AE_TITLE} failed: ")


@pytest.mark.parametrize(
    ("status", "name"),
    [(0x0000, "SUCCESS"), (0xA801, "MOVE_DESTINATION_UNKNOWN"), (0xC123, "UNABLE_TO_PROCESS"), (0x1234, "0x1234")],
)
def test_query_retrieve_status_name(status, name):
    assert query_retrieve_status_name(status) == name
