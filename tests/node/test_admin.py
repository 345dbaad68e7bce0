"""Admin operations against a running node: status, studies, audit trail, requeue and resend.

The commands run as an operator runs them, as `libra-node` subprocesses against the node's
configuration file while the node runs, with Orthanc as the PACS.
"""

from __future__ import annotations

import datetime as dt
import getpass
import io
import json
import re
import subprocess
import sys
import urllib.request

import pydicom
import pytest

from node import admin
from node.index.models import utc_now
from tests.node.conftest import dcmsend, orthanc_destination, wait_until
from tests.peers import CHEST_PA_JPEG_BASELINE, HIP_CR_RLE

SR_TIMEOUT_SECONDS = 120


def libra_node(node, *arguments: str) -> subprocess.CompletedProcess:
    """Run a `libra-node` subcommand against the node's configuration file."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *arguments, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def study_state(node, study_instance_uid: str) -> str | None:
    studies = [study for study in admin.list_studies(node.index) if study.study_instance_uid == study_instance_uid]
    return studies[0].state if studies else None


def wait_for_state(node, study_instance_uid: str, state: str) -> None:
    wait_until(
        lambda: study_state(node, study_instance_uid) == state,
        SR_TIMEOUT_SECONDS,
        f"study {study_instance_uid} reaches {state} (now {study_state(node, study_instance_uid)})",
    )


def orthanc_srs(orthanc) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{entry['_id']}/file")))
        for entry in orthanc.instances_with_modality("SR")
    ]


@pytest.fixture
def chest_study_uid() -> str:
    return str(pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture
def sent_node(make_node, orthanc, chest_study_uid):
    """A node, started from a configuration file, whose chest study's SR reached Orthanc."""
    node = make_node(config_file=True, destinations=[orthanc_destination(orthanc)])
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    wait_for_state(node, chest_study_uid, "sent")
    return node


def test_status_command_counts_states(sent_node):
    result = libra_node(sent_node, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["studies"] == {
        "receiving": 0, "waiting": 0, "queued": 0, "running": 0, "reported": 0, "sent": 1, "failed": 0, "skipped": 0
    }
    assert status["report_jobs"]["done"] == 1
    assert status["outbox"]["sent"] == 1

    table = libra_node(sent_node, "status")
    assert table.returncode == 0, table.stderr
    assert re.search(r"^sent\s+1$", table.stdout, re.MULTILINE)


def test_studies_command_lists_hash_not_patient_id(sent_node, chest_study_uid):
    source = pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True)
    result = libra_node(sent_node, "studies", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["study_instance_uid"] for row in rows] == [chest_study_uid]
    row = rows[0]
    assert row["state"] == "sent"
    assert row["instance_count"] == 1
    assert len(row["sr_sop_instance_uids"]) == 1
    assert len(row["patient_hash"]) == 12
    assert str(source.PatientID) not in result.stdout

    table = libra_node(sent_node, "studies", "--state", "sent", "--since", "1h")
    assert table.returncode == 0, table.stderr
    assert chest_study_uid in table.stdout
    assert row["sr_sop_instance_uids"][0] in table.stdout
    assert str(source.PatientID) not in table.stdout


def test_studies_filters_state_and_since(sent_node, chest_study_uid):
    assert libra_node(sent_node, "studies", "--json", "--state", "failed").stdout.strip() == "[]"
    future = (utc_now() + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    assert libra_node(sent_node, "studies", "--json", "--since", future).stdout.strip() == "[]"
    invalid = libra_node(sent_node, "studies", "--since", "yesterday")
    assert invalid.returncode == 2
    assert "--since 'yesterday' is neither an age" in invalid.stderr


def _assert_chained(events: list[admin.AuditRow], entity: str, final_state: str) -> None:
    """Each audit row of one entity starts where the previous one ended; the last is the current state."""
    rows = [event for event in events if event.entity == entity]
    assert rows, f"no audit rows for {entity}"
    assert rows[0].from_state == ""
    for previous, current in zip(rows, rows[1:]):
        assert current.from_state == previous.to_state, (entity, previous, current)
    assert rows[-1].to_state == final_state


def test_audit_trail_chains_every_state_change(sent_node, chest_study_uid):
    events = admin.study_audit(sent_node.index, chest_study_uid)
    _assert_chained(events, "study", "sent")
    _assert_chained(events, "job", "done")
    _assert_chained(events, "outbox", "sent")
    study_steps = [(event.from_state, event.to_state) for event in events if event.entity == "study"]
    assert study_steps == [
        ("", "receiving"), ("receiving", "queued"), ("queued", "running"), ("running", "reported"), ("reported", "sent")
    ]
    actors = {event.actor.split(":")[0] for event in events}
    assert actors == {"receiver", "stability", "worker", "sender"}

    result = libra_node(sent_node, "studies", "--audit", chest_study_uid)
    assert result.returncode == 0, result.stderr
    assert re.search(r"study\s+\d+\s+reported\s+sent\s+sender:\S+\s+SR delivered to every destination", result.stdout)


def test_requeue_command_writes_successor_sr(sent_node, orthanc, chest_study_uid):
    first_sr_uid = admin.list_studies(sent_node.index)[0].sr_sop_instance_uids[0]
    result = libra_node(sent_node, "requeue", chest_study_uid)
    assert result.returncode == 0, result.stderr
    assert "report job" in result.stdout

    orthanc.wait_for_instances("SR", 2, SR_TIMEOUT_SECONDS)
    wait_for_state(sent_node, chest_study_uid, "sent")
    successor = next(sr for sr in orthanc_srs(orthanc) if sr.SOPInstanceUID != first_sr_uid)
    predecessor_uid = (
        successor.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    )
    assert predecessor_uid == first_sr_uid

    admin_events = [event for event in admin.study_audit(sent_node.index, chest_study_uid) if event.actor.startswith("admin:")]
    assert {(event.entity, event.to_state) for event in admin_events} == {("job", "queued"), ("study", "queued")}
    assert all(event.actor == f"admin:{getpass.getuser()}" for event in admin_events)


def test_requeue_in_progress_study_rejected(make_node, chest_study_uid):
    node = make_node(run_worker=False, config_file=True)
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    wait_for_state(node, chest_study_uid, "queued")
    result = libra_node(node, "requeue", chest_study_uid)
    assert result.returncode == 2
    assert f"study {chest_study_uid} is queued; its report is still in progress" in result.stderr

    unknown = libra_node(node, "requeue", "1.2.3.4")
    assert unknown.returncode == 2
    assert "study 1.2.3.4 is not in the index" in unknown.stderr


def test_requeue_skipped_study_routes_again(make_node):
    node = make_node(run_worker=False)
    assert dcmsend(node.receiver.port, HIP_CR_RLE).returncode == 0
    hip_uid = str(pydicom.dcmread(HIP_CR_RLE, stop_before_pixels=True).StudyInstanceUID)
    wait_for_state(node, hip_uid, "skipped")
    result = admin.requeue_study(node.index, hip_uid, "admin:test")
    assert result.job_id is None
    assert result.state == "receiving"
    wait_for_state(node, hip_uid, "skipped")
    reasons = [event.reason for event in admin.study_audit(node.index, hip_uid) if event.to_state == "skipped"]
    assert reasons == ["not a chest study: Body Part Examined HIP"] * 2


def test_resend_command_delivers_again(sent_node, orthanc, chest_study_uid):
    sr_uid = admin.list_studies(sent_node.index)[0].sr_sop_instance_uids[0]
    orthanc_id = orthanc.instances_with_modality("SR")[0]["_id"]
    request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/instances/{orthanc_id}", method="DELETE")
    urllib.request.urlopen(request, timeout=30).close()
    assert orthanc.instances_with_modality("SR") == []

    result = libra_node(sent_node, "resend", sr_uid, "--to", "orthanc")
    assert result.returncode == 0, result.stderr
    assert f"SR {sr_uid} queued for delivery to orthanc" in result.stdout
    resent = orthanc.wait_for_instances("SR", 1, SR_TIMEOUT_SECONDS)
    assert resent[0]["SOPInstanceUID"] == sr_uid
    wait_for_state(sent_node, chest_study_uid, "sent")
    outbox_steps = [
        (event.from_state, event.to_state, event.actor.split(":")[0])
        for event in admin.study_audit(sent_node.index, chest_study_uid)
        if event.entity == "outbox"
    ]
    assert outbox_steps[-3:] == [("sent", "pending", "admin"), ("pending", "sending", "sender"), ("sending", "sent", "sender")]


def test_resend_invalid_requests_rejected(sent_node):
    sr_uid = admin.list_studies(sent_node.index)[0].sr_sop_instance_uids[0]
    unknown_destination = libra_node(sent_node, "resend", sr_uid, "--to", "nowhere")
    assert unknown_destination.returncode == 2
    assert "destination 'nowhere' is not configured (configured: orthanc)" in unknown_destination.stderr

    unknown_sr = libra_node(sent_node, "resend", "1.2.3.4")
    assert unknown_sr.returncode == 2
    assert "SR 1.2.3.4 is not in the index" in unknown_sr.stderr


def test_parse_since_accepts_ages_and_iso_times():
    now = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.timezone.utc)
    assert admin.parse_since("30m", now) == now - dt.timedelta(minutes=30)
    assert admin.parse_since("7d", now) == now - dt.timedelta(days=7)
    assert admin.parse_since("2026-01-30", now) == dt.datetime(2026, 1, 30, tzinfo=dt.timezone.utc)
    assert admin.parse_since("2026-01-30T08:00+01:00", now) == dt.datetime(2026, 1, 30, 7, tzinfo=dt.timezone.utc)
    with pytest.raises(admin.AdminError, match="neither an age"):
        admin.parse_since("last week", now)
