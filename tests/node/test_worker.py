"""Worker: batches of ready jobs, a bad job failing alone, and model text made safe for DICOM."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from node.index.models import JobState, ReportJob
from node.synthetic import synthetic_chest_study
from node.worker import EMPTY_FINDINGS_TEXT, Worker, clean_findings_text
from tests.node.conftest import dcmsend, wait_until

QUEUE_TIMEOUT_SECONDS = 60


def _queue_studies(node, tmp_path, count: int) -> None:
    paths = []
    for number in range(count):
        dataset = synthetic_chest_study(
            patient_id=f"SYNTHETIC-BATCH-{number}", study_date=dt.date(2026, 2, 1 + number), seed=number, size=64
        )
        path = tmp_path / f"study{number}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    result = dcmsend(node.receiver.port, *paths)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(_job_states(node)) == count, QUEUE_TIMEOUT_SECONDS, f"{count} report jobs queued")


def _job_states(node) -> list[JobState]:
    with node.index.transaction() as session:
        return list(session.scalars(select(ReportJob.state).order_by(ReportJob.id)))


def _worker(node) -> Worker:
    worker = Worker(node.config, node.index, node.store, worker_id="worker:test")
    worker.load_model()
    return worker


def test_worker_runs_ready_jobs_as_one_batch(make_node, tmp_path):
    node = make_node(run_worker=False)
    _queue_studies(node, tmp_path, 3)
    worker = _worker(node)
    with capture_logs() as logs:
        assert worker.run_once() is True
    generated = [entry for entry in logs if entry["event"] == "worker.report_generated"]
    assert [entry["batch_size"] for entry in generated] == [3, 3, 3]
    assert _job_states(node) == [JobState.DONE] * 3


def test_worker_batch_limited_by_max_batch_size(make_node, tmp_path):
    node = make_node(run_worker=False, worker={"max_batch_size": 2})
    _queue_studies(node, tmp_path, 3)
    worker = _worker(node)
    assert worker.run_once() is True
    assert _job_states(node) == [JobState.DONE, JobState.DONE, JobState.QUEUED]
    assert worker.run_once() is True
    assert _job_states(node) == [JobState.DONE] * 3


def test_worker_unreadable_image_fails_its_job_only(make_node, tmp_path):
    node = make_node(run_worker=False, worker={"max_attempts": 1})
    _queue_studies(node, tmp_path, 2)
    stored = sorted(path for path in node.store.root.rglob("*.dcm") if ".incoming" not in path.parts)
    stored[0].write_bytes(b"not DICOM")
    worker = _worker(node)
    assert worker.run_once() is True
    assert sorted(_job_states(node)) == sorted([JobState.DONE, JobState.FAILED])


def test_worker_failed_batch_retried_one_by_one(make_node, tmp_path, monkeypatch):
    node = make_node(run_worker=False)
    _queue_studies(node, tmp_path, 2)
    worker = _worker(node)
    generate_batch = worker.generator.generate_batch

    def fail_on_batches(requests, **kwargs):
        if len(requests) > 1:
            raise RuntimeError("out of memory in the batch")
        return generate_batch(requests, **kwargs)

    monkeypatch.setattr(worker.generator, "generate_batch", fail_on_batches)
    with capture_logs() as logs:
        assert worker.run_once() is True
    assert any(entry["event"] == "worker.batch_failed" for entry in logs)
    assert _job_states(node) == [JobState.DONE] * 2


@pytest.mark.parametrize(
    ("text", "expected", "removed"),
    [
        ("Clear lungs.", "Clear lungs.", 0),
        ("Line one.\nLine two.\tTabbed.", "Line one.\nLine two.\tTabbed.", 0),
        ("Heart \x03size\x00 normal\x7f.", "Heart size normal.", 3),
        ("Pleural effusion \x85resolved.", "Pleural effusion resolved.", 1),
        ("Ärztlicher Befund: Lunge frei.", "Ärztlicher Befund: Lunge frei.", 0),
        ("\x01\x02", EMPTY_FINDINGS_TEXT, 2),
        ("   ", EMPTY_FINDINGS_TEXT, 0),
    ],
)
def test_clean_findings_text_removes_forbidden_control_characters(text, expected, removed):
    assert clean_findings_text(text) == (expected, removed)
