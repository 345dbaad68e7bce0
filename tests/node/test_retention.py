"""Retention: old images and delivered SRs leave the store, never before their SR is sent."""

from __future__ import annotations

import datetime as dt

import pydicom
import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from node import admin
from node.index.models import Instance, StructuredReport, utc_now
from tests.node.conftest import dcmsend, orthanc_destination, wait_until
from tests.peers import CHEST_PA_JPEG_BASELINE, HIP_CR_RLE, free_port

LATER = dt.timedelta(days=31)


def _study_files(node) -> list:
    return sorted(path for path in node.store.root.rglob("*.dcm") if ".incoming" not in path.parts)


def _wait_for_state(node, state: str) -> None:
    wait_until(lambda: [study.state for study in admin.list_studies(node.index)] == [state], 120, f"the study is {state}")


def test_retention_removes_sent_study_files(make_node, orthanc):
    node = make_node(destinations=[orthanc_destination(orthanc)], retention={"max_age_days": 30})
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    _wait_for_state(node, "sent")
    assert len(_study_files(node)) == 2

    assert node.retention.run_once(now=utc_now()).instances == 0
    assert len(_study_files(node)) == 2

    with capture_logs() as logs:
        result = node.retention.run_once(now=utc_now() + LATER)
    assert (result.studies, result.instances, result.structured_reports) == (1, 1, 1)
    assert _study_files(node) == []
    assert [path for path in node.store.root.iterdir() if path.name != ".incoming"] == []
    with node.index.transaction() as session:
        assert session.scalars(select(Instance.removed_at)).one() is not None
        assert session.scalars(select(StructuredReport.removed_at)).one() is not None
    assert any(entry["event"] == "retention.files_removed" for entry in logs)

    study = admin.list_studies(node.index)[0]
    audit = admin.study_audit(node.index, study.study_instance_uid)
    assert audit[-1].actor.startswith("retention:")
    assert "removed 1 image file(s) and 1 SR file(s)" in audit[-1].reason

    with pytest.raises(admin.ConflictError, match="removed by retention"):
        admin.requeue_study(node.index, study.study_instance_uid, "admin:test")
    with pytest.raises(admin.ConflictError, match="removed by retention"):
        admin.resend_sr(node.index, study.sr_sop_instance_uids[0], node.config.destinations, "admin:test")


def test_retention_keeps_files_until_sr_sent(make_node):
    unreachable = {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port(), "retry_backoff_seconds": 60}
    node = make_node(destinations=[unreachable], retention={"max_age_days": 30})
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    _wait_for_state(node, "reported")

    result = node.retention.run_once(now=utc_now() + LATER)
    assert (result.instances, result.structured_reports) == (0, 0)
    assert len(_study_files(node)) == 2


def test_retention_removes_skipped_study_images(make_node):
    node = make_node(run_worker=False, retention={"max_age_days": 30})
    assert dcmsend(node.receiver.port, HIP_CR_RLE).returncode == 0
    _wait_for_state(node, "skipped")
    result = node.retention.run_once(now=utc_now() + LATER)
    assert result.instances == 1
    assert _study_files(node) == []


def test_retention_keeps_receiving_study(make_node):
    node = make_node(run_worker=False, node={"study_stable_seconds": 3600}, retention={"max_age_days": 30})
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    assert node.retention.run_once(now=utc_now() + LATER).instances == 0
    assert len(_study_files(node)) == 1


def test_retention_scheduled_run_removes_files(make_node, orthanc):
    # About 0.9 s: files older than that go at the next check, every half second.
    node = make_node(
        destinations=[orthanc_destination(orthanc)],
        retention={"max_age_days": 1e-5, "check_interval_seconds": 0.5},
    )
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    wait_until(lambda: _study_files(node) == [] and admin.list_studies(node.index)[0].state == "sent", 120, "retention removed the files")
    study_uid = str(pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True).StudyInstanceUID)
    reasons = [event.reason for event in admin.study_audit(node.index, study_uid) if event.actor.startswith("retention:")]
    assert reasons
