"""HTTP admin endpoint: health, metrics, the JSON API, and its token and origin checks."""

from __future__ import annotations

import base64
import http.client
import json
import socket

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE

from node.config import ConfigError
from node.dimse_status import DimseStatus
from tests.node.conftest import MODALITY_AE_TITLE, NODE_AE_TITLE, dcmsend, orthanc_destination, wait_until
from tests.peers import CHEST_PA_JPEG_BASELINE

TOKEN = "0123456789abcdef0123456789abcdef"


def request(node, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    """Send one request to the node's admin endpoint; return (status, headers, decoded body)."""
    connection = http.client.HTTPConnection("127.0.0.1", node.admin.port, timeout=60)
    all_headers = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    content_type = response.getheader("Content-Type", "")
    decoded = json.loads(raw) if content_type.startswith("application/json") else raw.decode()
    return response.status, response, decoded


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_healthz_ready_with_all_checks(make_node):
    node = make_node()
    wait_until(lambda: node.worker.model_loaded.is_set(), 120, "the model is loaded")
    status, _, body = request(node, "GET", "/healthz")
    assert status == 200
    assert body == {"live": True, "ready": True, "checks": {"database": True, "store": True, "model_loaded": True, "listener": True}}


def test_healthz_not_ready_without_listener(make_node):
    node = make_node(run_worker=False)
    node.receiver.stop()
    status, _, body = request(node, "GET", "/healthz")
    assert status == 503
    assert body["ready"] is False
    assert body["checks"]["listener"] is False
    assert body["checks"]["model_loaded"] is None


def test_metrics_count_stored_and_rejected_instances(make_node):
    node = make_node(run_worker=False)
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    changed = pydicom.dcmread(CHEST_PA_JPEG_BASELINE)
    changed.SeriesDescription = "changed"
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context(changed.SOPClassUID, str(changed.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AE_TITLE)
    assert int(assoc.send_c_store(changed).Status) == DimseStatus.DUPLICATE_SOP_INSTANCE
    assoc.release()
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE, calling_ae_title="INTRUDER").returncode != 0
    wait_until(lambda: request(node, "GET", "/api/status")[2]["studies"]["queued"] == 1, 30, "the study is queued")

    status, response, text = request(node, "GET", "/metrics")
    assert status == 200
    assert response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    values = metric_values(text)
    assert values[("libra_node_instances_received_total", ())] == 1
    assert values[("libra_node_instances_rejected_total", (("reason", "DUPLICATE_SOP_INSTANCE"),))] == 1
    assert values[("libra_node_associations_rejected_total", (("reason", "calling_ae_title_not_recognized"),))] == 1
    assert values[("libra_node_studies", (("state", "queued"),))] == 1
    assert values[("libra_node_report_jobs", (("state", "queued"),))] == 1
    assert values[("libra_node_outbox_entries", (("state", "pending"),))] == 0


def test_metrics_histograms_after_report_sent(make_node, orthanc):
    node = make_node(destinations=[orthanc_destination(orthanc)])
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    orthanc.wait_for_instances("SR", 1, 120)
    wait_until(lambda: request(node, "GET", "/api/status")[2]["studies"]["sent"] == 1, 30, "the study is sent")
    values = metric_values(request(node, "GET", "/metrics")[2])
    assert values[("libra_node_report_job_seconds_count", (("outcome", "done"),))] == 1
    assert values[("libra_node_model_seconds_count", ())] == 1
    assert values[("libra_node_send_seconds_count", (("destination", "orthanc"), ("outcome", "sent")))] == 1
    assert values[("libra_node_study_outcomes_total", (("outcome", "sent"),))] == 1
    assert values[("libra_node_studies", (("state", "sent"),))] == 1


def test_api_lists_studies_audit_and_outbox(make_node, orthanc):
    node = make_node(destinations=[orthanc_destination(orthanc)])
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    study_uid = str(pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True).StudyInstanceUID)
    wait_until(lambda: request(node, "GET", "/api/studies?state=sent")[2], 120, "the study is listed as sent")
    _, _, studies = request(node, "GET", "/api/studies?state=sent&since=1h")
    assert [study["study_instance_uid"] for study in studies] == [study_uid]
    _, _, audit = request(node, "GET", f"/api/studies/{study_uid}/audit")
    assert audit[-1]["to_state"] == "sent"
    _, _, outbox = request(node, "GET", "/api/outbox?state=sent")
    assert [entry["sr_sop_instance_uid"] for entry in outbox] == studies[0]["sr_sop_instance_uids"]

    status, _, body = request(node, "POST", f"/api/srs/{outbox[0]['sr_sop_instance_uid']}/resend", {"to": "orthanc"})
    assert status == 200
    assert body[0]["action"] == "queued"

    assert request(node, "GET", "/api/studies?state=done")[0] == 400
    assert request(node, "GET", "/api/studies?limit=0")[0] == 400
    assert request(node, "GET", "/api/studies/1.2.3/audit")[0] == 404
    assert request(node, "POST", "/api/studies/1.2.3/requeue", {})[0] == 404


def test_api_requeue_in_progress_conflict(make_node):
    node = make_node(run_worker=False)
    dataset = pydicom.dcmread(CHEST_PA_JPEG_BASELINE)
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    status, _, body = request(node, "POST", f"/api/studies/{dataset.StudyInstanceUID}/requeue", {})
    assert status == 409
    assert "still in progress" in body["error"]


def test_api_ae_edits_need_config_file(make_node):
    node = make_node(run_worker=False)
    status, _, body = request(node, "POST", "/api/ae/callers", {"ae_title": "CT01"})
    assert status == 409
    assert "started without a configuration file" in body["error"]
    status, _, body = request(node, "GET", "/api/ae")
    assert body["callers"] == [{"ae_title": MODALITY_AE_TITLE, "host": ""}]


def test_api_ae_invalid_title_rejected(make_node):
    node = make_node(run_worker=False, config_file=True)
    status, _, body = request(node, "POST", "/api/ae/callers", {"ae_title": "X" * 17})
    assert status == 400
    assert "has 17 characters" in body["error"]
    status, _, body = request(node, "POST", "/api/ae/destinations", {"name": "bad name", "ae_title": "P", "host": "h", "port": 1})
    assert status == 400
    assert "name = 'bad name'" in body["error"]


def test_api_destination_echo(make_node, orthanc):
    node = make_node(run_worker=False, config_file=True, destinations=[orthanc_destination(orthanc)])
    status, _, body = request(node, "POST", "/api/ae/destinations/orthanc/echo", {})
    assert status == 200
    assert body["succeeded"] is True
    assert body["status"] == "0x0000"


def test_api_post_without_json_rejected(make_node):
    node = make_node(run_worker=False)
    status, _, body = request(node, "POST", "/api/reload", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    assert "Content-Type: application/json" in body["error"]


def test_api_cross_origin_post_rejected(make_node):
    node = make_node(run_worker=False)
    status, _, body = request(node, "POST", "/api/reload", {}, headers={"Origin": "http://example.test"})
    assert status == 403
    assert "Origin 'http://example.test' is not this server" in body["error"]


def test_api_foreign_host_header_rejected(make_node):
    node = make_node(run_worker=False)
    status, _, body = request(node, "GET", "/api/status", headers={"Host": f"rebound.example.test:{node.admin.port}"})
    assert status == 403
    assert "is not a loopback address" in body["error"]


def test_api_unknown_path_and_method(make_node):
    node = make_node(run_worker=False)
    assert request(node, "GET", "/api/nothing")[0] == 404
    assert request(node, "DELETE", "/api/status", headers={"Content-Type": "application/json"})[0] == 405


def test_admin_port_in_use_fails_start(make_node):
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        port = occupied.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            make_node(run_worker=False, admin={"port": port})


def test_admin_off_loopback_requires_token(make_node):
    with pytest.raises(ConfigError, match="admin.token must be set"):
        make_node(run_worker=False, admin={"bind_address": "0.0.0.0", "port": 0})


def test_token_required_when_configured(make_node):
    node = make_node(run_worker=False, admin={"port": 0, "token": TOKEN})
    status, response, body = request(node, "GET", "/api/status")
    assert status == 401
    assert response.getheader("WWW-Authenticate").startswith("Basic")
    assert request(node, "GET", "/api/status", headers={"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    assert request(node, "GET", "/api/status", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert request(node, "GET", "/healthz")[0] == 200


def test_token_as_basic_password_names_actor(make_node):
    node = make_node(run_worker=False, admin={"port": 0, "token": TOKEN})
    dataset = pydicom.dcmread(CHEST_PA_JPEG_BASELINE)
    dataset.StudyDescription = "HIP"
    dataset.BodyPartExamined = "HIP"
    dataset.StudyInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context(dataset.SOPClassUID, str(dataset.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AE_TITLE)
    assert int(assoc.send_c_store(dataset).Status) == DimseStatus.SUCCESS
    assoc.release()
    credentials = {"Authorization": "Basic " + base64.b64encode(f"alice:{TOKEN}".encode()).decode()}
    wait_until(
        lambda: request(node, "GET", "/api/studies?state=skipped", headers=credentials)[2], 30, "the study is skipped"
    )
    status, _, body = request(node, "POST", f"/api/studies/{dataset.StudyInstanceUID}/requeue", {}, headers=credentials)
    assert status == 200, body
    _, _, audit = request(node, "GET", f"/api/studies/{dataset.StudyInstanceUID}/audit", headers=credentials)
    assert [event["actor"] for event in audit if event["actor"].startswith("admin:")] == ["admin:alice"]
