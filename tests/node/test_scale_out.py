"""Scale-out on one PostgreSQL index: several receivers, workers and senders, each SR sent once."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from node.index.models import JobState, OutboxEntry, OutboxState, ReportJob, StructuredReport
from node.index.session import IndexDatabase
from node.send_tool import send_datasets
from node.synthetic import synthetic_chest_study
from tests.node.conftest import wait_until
from tests.node.processes import CountingStorageSCP, NodeProcess, process_document
from tests.peers import postgres_database


@pytest.fixture
def postgres_url():
    with postgres_database() as url:
        yield url


@pytest.fixture
def processes():
    started: list[NodeProcess] = []
    yield started
    for process in started:
        process.kill()


def _studies(count: int, size: int = 96):
    return [
        synthetic_chest_study(
            patient_id=f"SCALE-{number:03d}",
            study_date=dt.date(2026, 1, 1) + dt.timedelta(days=number),
            seed=number,
            size=size,
        )
        for number in range(count)
    ]


def _count(index: IndexDatabase, statement) -> int:
    with index.transaction() as session:
        return session.scalar(statement)


def test_two_receivers_three_workers_each_sr_once(tmp_path, tiny_checkpoint, postgres_url, processes):
    counter = CountingStorageSCP().start()
    try:
        shared_store = tmp_path / "shared"
        sections = {"destinations": [counter.destination()]}
        receivers = [
            NodeProcess(tmp_path, f"receiver{number}", process_document(shared_store, tiny_checkpoint, postgres_url, **sections), extra_args=("--no-worker",))
            for number in (1, 2)
        ]
        workers = [
            NodeProcess(tmp_path, f"worker{number}", process_document(shared_store, tiny_checkpoint, postgres_url, **sections), command="worker")
            for number in (1, 2, 3)
        ]
        processes.extend(receivers + workers)
        for process in receivers + workers:
            process.wait_ready()

        studies = _studies(30)
        for number, receiver in enumerate(receivers):
            statuses = send_datasets("LIBRA_NODE", "127.0.0.1", receiver.port, studies[number::2], "MODALITY1")
            assert statuses == [0] * 15

        wait_until(lambda: len(counter.received) >= 30, 240, "30 SRs arrive at the counting SCP")
        index = IndexDatabase(postgres_url)
        wait_until(
            lambda: _count(index, select(func.count()).where(OutboxEntry.state == OutboxState.SENT)) == 30,
            60,
            "30 outbox entries are sent",
        )
        assert sorted(counter.received.values()) == [1] * 30
        assert len(set(counter.studies.values())) == 30
        assert _count(index, select(func.count()).select_from(ReportJob)) == 30
        assert _count(index, select(func.count()).where(ReportJob.state == JobState.DONE, ReportJob.attempts == 1)) == 30
        assert _count(index, select(func.count()).select_from(StructuredReport)) == 30
        workers_used = {entry["job_id"] for worker in workers for entry in worker.events() if entry["event"] == "worker.job_claimed"}
        assert len(workers_used) == 30
        index.dispose()
    finally:
        counter.stop()


def test_killed_worker_job_completed_by_another(tmp_path, tiny_checkpoint, postgres_url, processes):
    counter = CountingStorageSCP().start()
    try:
        shared_store = tmp_path / "shared"
        sections = {
            "destinations": [counter.destination()],
            # A long generation keeps the first worker busy until it is killed.
            "model": {"path": str(tiny_checkpoint), "max_new_tokens": 1500},
            "worker": {"poll_seconds": 0.2, "lease_seconds": 6},
        }
        receiver = NodeProcess(tmp_path, "receiver", process_document(shared_store, tiny_checkpoint, postgres_url, **sections), extra_args=("--no-worker",))
        workers = [
            NodeProcess(tmp_path, f"worker{number}", process_document(shared_store, tiny_checkpoint, postgres_url, **sections), command="worker")
            for number in (1, 2)
        ]
        processes.extend([receiver, *workers])
        for process in (receiver, *workers):
            process.wait_ready()

        send_datasets("LIBRA_NODE", "127.0.0.1", receiver.port, _studies(1), "MODALITY1")
        claimed_by = wait_until(
            lambda: [worker for worker in workers if any(entry["event"] == "worker.job_claimed" for entry in worker.events())],
            60,
            "a worker claims the job",
        )
        killed = claimed_by[0]
        survivor = workers[1] if killed is workers[0] else workers[0]
        killed.kill()
        assert counter.received == {}

        # The survivor was already running, so it takes the job over only when the lease expires,
        # as a worker on another machine would.
        wait_until(
            lambda: any(entry["event"] == "worker.job_claimed" and entry["reclaimed"] for entry in survivor.events()),
            60,
            "the surviving worker reclaims the job after the lease expires",
        )
        wait_until(lambda: len(counter.received) == 1, 180, "the SR arrives after the reclaim")
        index = IndexDatabase(postgres_url)
        wait_until(lambda: _count(index, select(func.count()).where(OutboxEntry.state == OutboxState.SENT)) == 1, 30, "the outbox entry is sent")
        assert list(counter.received.values()) == [1]
        assert _count(index, select(func.count()).select_from(StructuredReport)) == 1
        index.dispose()
    finally:
        counter.stop()


def test_two_senders_send_each_entry_once(tmp_path, tiny_checkpoint, postgres_url, processes):
    counter = CountingStorageSCP()
    shared_store = tmp_path / "shared"
    sections = {"destinations": [counter.destination(retry_backoff_seconds=1, max_backoff_seconds=1, max_attempts=1000)]}
    # First the 20 SRs are written while the destination is down, so they wait in the outbox.
    producer = NodeProcess(tmp_path, "producer", process_document(shared_store, tiny_checkpoint, postgres_url, **sections))
    processes.append(producer)
    producer.wait_ready()
    send_datasets("LIBRA_NODE", "127.0.0.1", producer.port, _studies(20), "MODALITY1")
    index = IndexDatabase(postgres_url)
    wait_until(lambda: _count(index, select(func.count()).select_from(OutboxEntry)) == 20, 180, "20 outbox entries exist")
    assert producer.terminate() == 0
    assert _count(index, select(func.count()).where(OutboxEntry.state == OutboxState.SENT)) == 0

    counter.start()
    try:
        senders = [
            NodeProcess(tmp_path, f"sender{number}", process_document(shared_store, tiny_checkpoint, postgres_url, **sections), extra_args=("--no-worker",))
            for number in (1, 2)
        ]
        processes.extend(senders)
        wait_until(lambda: _count(index, select(func.count()).where(OutboxEntry.state == OutboxState.SENT)) == 20, 120, "20 entries sent")
        assert len(counter.received) == 20
        assert sorted(counter.received.values()) == [1] * 20
        sent_by = {sender.name: len([entry for entry in sender.events() if entry["event"] == "sender.sr_sent"]) for sender in senders}
        assert sum(sent_by.values()) == 20
    finally:
        counter.stop()
        index.dispose()


def test_sigterm_leaves_nothing_claimed(tmp_path, tiny_checkpoint, postgres_url, processes):
    shared_store = tmp_path / "shared"
    sections = {"model": {"path": str(tiny_checkpoint), "max_new_tokens": 1500}, "worker": {"poll_seconds": 0.2, "lease_seconds": 600}}
    node = NodeProcess(tmp_path, "node", process_document(shared_store, tiny_checkpoint, postgres_url, **sections))
    processes.append(node)
    node.wait_ready()
    send_datasets("LIBRA_NODE", "127.0.0.1", node.port, _studies(1), "MODALITY1")
    node.wait_for_event("worker.job_claimed", timeout_seconds=60)
    assert node.terminate() == 0
    index = IndexDatabase(postgres_url)
    with index.transaction() as session:
        jobs = session.scalars(select(ReportJob)).all()
        assert [job.lease_owner for job in jobs] == [""]
        assert jobs[0].state in (JobState.QUEUED, JobState.DONE)
    index.dispose()
