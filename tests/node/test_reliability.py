"""Faults the node survives with nothing lost and nothing duplicated.

Process crashes use real node processes killed with SIGKILL; network faults use real peers
(dcmtk, pynetdicom) on loopback.
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select
from structlog.testing import capture_logs

from node.dimse_status import DimseStatus
from node.index.models import Instance, OutboxEntry, OutboxState, ReportJob, Study, StudyState
from node.index.session import IndexDatabase
from node.send_tool import send_datasets
from node.synthetic import synthetic_chest_study
from tests.node.conftest import MODALITY_AE_TITLE, NODE_AE_TITLE, wait_until
from tests.node.processes import CountingStorageSCP, NodeProcess, process_document
from tests.peers import SlowProxy

# -- helpers ------------------------------------------------------------------------------


def _study(patient_number: int = 1, size: int = 96, day: int = 0, **changes) -> pydicom.Dataset:
    dataset = synthetic_chest_study(
        patient_id=f"RELIABILITY-{patient_number:03d}",
        study_date=dt.date(2026, 2, 1) + dt.timedelta(days=day),
        seed=patient_number,
        size=size,
    )
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    return dataset


def _second_image(dataset: pydicom.Dataset, size: int | None = None) -> pydicom.Dataset:
    """Return another image of the same study and series, optionally with a larger matrix."""
    image = synthetic_chest_study(patient_id=dataset.PatientID, size=size or dataset.Rows, seed=99)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "StudyTime", "PatientName", "AccessionNumber"):
        setattr(image, keyword, getattr(dataset, keyword))
    image.InstanceNumber = 2
    return image


def _save(dataset: pydicom.Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _storescu(port: int, *paths: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "-aet", MODALITY_AE_TITLE, "-aec", NODE_AE_TITLE, "127.0.0.1", str(port), *map(str, paths)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(sender: subprocess.Popen, timeout_seconds: float = 30) -> None:
    """Wait for a sender whose peer went away, killing it if it hangs."""
    try:
        sender.communicate(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        sender.kill()
        sender.communicate()


def _incoming_files(data_dir: Path) -> list[Path]:
    return [path for path in (data_dir / "store" / ".incoming").rglob("*") if path.is_file()]


def _stored_files(data_dir: Path) -> list[Path]:
    store = data_dir / "store"
    return [path for path in store.rglob("*.dcm") if ".incoming" not in path.relative_to(store).parts]


def _scalar(database_url: str, statement):
    index = IndexDatabase(database_url)
    try:
        with index.transaction() as session:
            return session.scalar(statement)
    finally:
        index.dispose()


def _sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'index.sqlite3'}"


@pytest.fixture
def processes():
    started: list[NodeProcess] = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture
def counter():
    scp = CountingStorageSCP().start()
    yield scp
    scp.stop()


class BlockingStorageSCP(CountingStorageSCP):
    """Receives SRs but holds back the first response until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.first_received = threading.Event()
        self.release = threading.Event()

    def _on_store(self, event) -> int:
        status = super()._on_store(event)
        if not self.first_received.is_set():
            self.first_received.set()
            self.release.wait(60)
        return status


# -- kill -9 at each stage ----------------------------------------------------------------


def test_kill_during_c_store_keeps_acked_drops_partial(tmp_path, tiny_checkpoint, processes, counter):
    data_dir = tmp_path / "node"
    document = process_document(data_dir, tiny_checkpoint, destinations=[counter.destination()], node={"study_stable_seconds": 3})
    node = NodeProcess(tmp_path, "node", document)
    processes.append(node)
    node.wait_ready()

    acknowledged = _study()
    assert send_datasets(NODE_AE_TITLE, "127.0.0.1", node.port, [acknowledged], MODALITY_AE_TITLE) == [0]
    large = _second_image(acknowledged, size=2000)
    proxy = SlowProxy(node.port)
    try:
        sender = _storescu(proxy.port, _save(large, tmp_path / "large"))
        wait_until(lambda: any(path.stat().st_size > 0 for path in _incoming_files(data_dir)), 60, "the large data set is being received")
        node.kill()
    finally:
        proxy.stop()
    _finish(sender)
    assert sender.returncode != 0

    restarted = NodeProcess(tmp_path, "node", document)
    processes.append(restarted)
    restarted.wait_ready()
    stored_uids = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in _stored_files(data_dir)}
    assert stored_uids == {acknowledged.SOPInstanceUID}
    assert _incoming_files(data_dir) == []
    assert _scalar(_sqlite_url(data_dir), select(func.count()).select_from(Instance)) == 1
    wait_until(lambda: len(counter.received) == 1, 120, "one SR for the study")
    assert list(counter.studies.values()) == [acknowledged.StudyInstanceUID]


def test_kill_after_ack_before_stable_sends_one_sr(tmp_path, tiny_checkpoint, processes, counter):
    data_dir = tmp_path / "node"
    document = process_document(data_dir, tiny_checkpoint, destinations=[counter.destination()], node={"study_stable_seconds": 4})
    node = NodeProcess(tmp_path, "node", document)
    processes.append(node)
    node.wait_ready()
    assert send_datasets(NODE_AE_TITLE, "127.0.0.1", node.port, [_study()], MODALITY_AE_TITLE) == [0]
    node.kill()

    restarted = NodeProcess(tmp_path, "node", document)
    processes.append(restarted)
    wait_until(lambda: len(counter.received) == 1, 120, "the SR arrives after the restart")
    with pytest.raises(TimeoutError):
        restarted.wait_for_event("worker.job_claimed", timeout_seconds=5, count=2)
    assert list(counter.received.values()) == [1]


def test_kill_during_inference_sends_one_sr(tmp_path, tiny_checkpoint, processes, counter):
    data_dir = tmp_path / "node"
    document = process_document(
        data_dir,
        tiny_checkpoint,
        destinations=[counter.destination()],
        model={"path": str(tiny_checkpoint), "max_new_tokens": 1500},
    )
    node = NodeProcess(tmp_path, "node", document)
    processes.append(node)
    node.wait_ready()
    send_datasets(NODE_AE_TITLE, "127.0.0.1", node.port, [_study()], MODALITY_AE_TITLE)
    node.wait_for_event("worker.job_claimed", timeout_seconds=60)
    node.kill()
    assert counter.received == {}

    restarted = NodeProcess(tmp_path, "node", document)
    processes.append(restarted)
    wait_until(lambda: len(counter.received) == 1, 180, "the SR arrives after the restart")
    released = restarted.wait_for_event("worker.job_released", timeout_seconds=5)
    assert released[0]["reason"] == "lease owner is no longer running"
    assert _scalar(_sqlite_url(data_dir), select(ReportJob.attempts)) == 2
    assert list(counter.received.values()) == [1]


def test_kill_during_send_delivers_same_sr_once_more(tmp_path, tiny_checkpoint, processes):
    pacs = BlockingStorageSCP().start()
    try:
        data_dir = tmp_path / "node"
        document = process_document(data_dir, tiny_checkpoint, destinations=[pacs.destination(timeout_seconds=120)])
        node = NodeProcess(tmp_path, "node", document)
        processes.append(node)
        node.wait_ready()
        send_datasets(NODE_AE_TITLE, "127.0.0.1", node.port, [_study()], MODALITY_AE_TITLE)
        assert pacs.first_received.wait(120)
        node.kill()
        pacs.release.set()

        restarted = NodeProcess(tmp_path, "node", document)
        processes.append(restarted)
        restarted.wait_for_event("study.report_sent", timeout_seconds=120)
        # Delivery is at least once: the PACS saw the same SR (one SOP Instance UID) again,
        # because the node died before it read the first response.
        assert len(pacs.received) == 1
        assert list(pacs.received.values()) == [2]
        assert _scalar(_sqlite_url(data_dir), select(func.count()).where(OutboxEntry.state == OutboxState.SENT)) == 1
    finally:
        pacs.release.set()
        pacs.stop()


# -- destinations that are down or reject --------------------------------------------------


def test_pacs_down_then_back_delivers_once(make_node):
    pacs = CountingStorageSCP()
    node = make_node(
        destinations=[pacs.destination(retry_backoff_seconds=0.3, max_backoff_seconds=1, max_attempts=1000, timeout_seconds=5)]
    )
    with capture_logs() as logs:
        send_datasets(NODE_AE_TITLE, "127.0.0.1", node.receiver.port, [_study()], MODALITY_AE_TITLE)
        wait_until(
            lambda: len([entry for entry in logs if entry["event"] == "sender.retry_scheduled"]) >= 3,
            60,
            "three retries are scheduled while the PACS is down",
        )
        pacs.start()
        try:
            wait_until(lambda: any(entry["event"] == "study.report_sent" for entry in logs), 60, "the SR is sent")
        finally:
            pacs.stop()
    retries = [entry for entry in logs if entry["event"] == "sender.retry_scheduled"]
    assert [entry["attempt"] for entry in retries[:3]] == [1, 2, 3]
    assert list(pacs.received.values()) == [1]
    sent = [entry for entry in logs if entry["event"] == "sender.sr_sent"]
    assert sent[0]["attempt"] == len(retries) + 1


@pytest.mark.parametrize(
    "status",
    [DimseStatus.OUT_OF_RESOURCES, DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, DimseStatus.CANNOT_UNDERSTAND],
    ids=lambda status: status.name,
)
def test_rejecting_destination_marked_failed(make_node, status):
    pacs = CountingStorageSCP(status=int(status)).start()
    try:
        node = make_node(destinations=[pacs.destination(retry_backoff_seconds=0.2, max_attempts=3)])
        with capture_logs() as logs:
            send_datasets(NODE_AE_TITLE, "127.0.0.1", node.receiver.port, [_study()], MODALITY_AE_TITLE)
            wait_until(lambda: any(entry["event"] == "sender.send_failed" for entry in logs), 60, "the entry is marked failed")
        with node.index.transaction() as session:
            entry = session.scalars(select(OutboxEntry)).one()
            assert entry.state == OutboxState.FAILED
            assert entry.last_status == status
            assert entry.attempts == 3
            assert entry.sent_at is None
            assert session.scalars(select(Study)).one().state == StudyState.FAILED
        assert list(pacs.received.values()) == [3]
        assert not any(entry["event"] in ("sender.sr_sent", "study.report_sent") for entry in logs)
    finally:
        pacs.stop()


def test_destination_rejecting_association_marked_failed(make_node):
    pacs = CountingStorageSCP(ae_title="REAL_PACS").start()
    try:
        node = make_node(destinations=[pacs.destination(ae_title="WRONG_TITLE", retry_backoff_seconds=0.2, max_attempts=2)])
        # pynetdicom checks the called AE title only when require_called_aet is set.
        pacs._server.ae.require_called_aet = True
        with capture_logs() as logs:
            send_datasets(NODE_AE_TITLE, "127.0.0.1", node.receiver.port, [_study()], MODALITY_AE_TITLE)
            failed = wait_until(lambda: [entry for entry in logs if entry["event"] == "sender.send_failed"], 60, "failed")
        assert failed[0]["error"] == "association rejected"
        assert pacs.received == {}
    finally:
        pacs.stop()


# -- senders that abort, crowd or go silent -----------------------------------------------


def test_aborted_association_leaves_no_partial_instance(make_node, tmp_path):
    node = make_node(run_worker=False, node={"study_stable_seconds": 60})
    data_dir = node.config.node.data_dir
    first = _study()
    assert send_datasets(NODE_AE_TITLE, "127.0.0.1", node.receiver.port, [first], MODALITY_AE_TITLE) == [0]
    with node.index.transaction() as session:
        deadline_before = session.scalars(select(Study)).one().stable_deadline

    proxy = SlowProxy(node.receiver.port)
    try:
        with capture_logs() as logs:
            sender = _storescu(proxy.port, _save(_second_image(first, size=2000), tmp_path / "large"))
            wait_until(lambda: any(path.stat().st_size > 0 for path in _incoming_files(data_dir)), 60, "receiving")
            sender.kill()
            _finish(sender)
            wait_until(lambda: any(entry["event"] == "receiver.partial_dataset_discarded" for entry in logs), 30, "discarded")
    finally:
        proxy.stop()
    assert _incoming_files(data_dir) == []
    assert len(_stored_files(data_dir)) == 1
    with node.index.transaction() as session:
        study = session.scalars(select(Study)).one()
        assert study.instance_count == 1
        assert study.stable_deadline == deadline_before
        assert study.state == StudyState.RECEIVING


def test_twenty_concurrent_senders_indexed_once(make_node, tmp_path):
    node = make_node(run_worker=False, node={"max_associations": 25, "study_stable_seconds": 60})
    folders = []
    for sender_number in range(20):
        folder = tmp_path / f"sender{sender_number}"
        for study_number in range(3):
            study = _study(patient_number=sender_number * 10 + study_number, size=64)
            _save(study, folder)
            _save(_second_image(study), folder)
        folders.append(folder)
    with capture_logs() as logs:
        senders = [_storescu(node.receiver.port, *sorted(folder.iterdir())) for folder in folders]
        results = [sender.communicate(timeout=300) for sender in senders]
    assert [sender.returncode for sender in senders] == [0] * 20, results
    with node.index.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 120
        assert session.scalar(select(func.count(func.distinct(Instance.sop_instance_uid)))) == 120
        assert session.scalar(select(func.count()).select_from(Study)) == 60
    problems = [entry for entry in logs if entry["event"] in ("receiver.store_failed", "receiver.instance_rejected")]
    assert problems == []
    assert "database is locked" not in repr(logs)


def test_association_limit_rejects_excess(make_node):
    node = make_node(run_worker=False, node={"max_associations": 2})
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context(Verification)
    established = [ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AE_TITLE) for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in established)
        with capture_logs() as logs:
            excess = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AE_TITLE)
        assert excess.is_rejected
        rejections = [entry for entry in logs if entry["event"] == "receiver.association_rejected"]
        assert rejections[0]["reason"] == "more than 2 simultaneous associations"
    finally:
        for assoc in established:
            assoc.release()

    def associate_again():
        # The node counts an association until its thread has ended, shortly after the release.
        assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AE_TITLE)
        if assoc.is_established:
            assoc.release()
            return True
        return False

    wait_until(associate_again, 30, "a new association is accepted once the others are released", interval_seconds=0.5)


def test_silent_peers_timed_out_and_node_keeps_serving(make_node):
    node = make_node(run_worker=False, node={"acse_timeout_seconds": 1, "network_timeout_seconds": 2})
    threads_before = threading.active_count()

    # A TCP connection that never sends an association request.
    silent_socket = socket.create_connection(("127.0.0.1", node.receiver.port))
    silent_socket.settimeout(30)
    assert silent_socket.recv(1) == b""
    silent_socket.close()

    # An association that goes silent after it is established.
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context(Verification)
    silent = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AE_TITLE)
    assert silent.is_established
    wait_until(lambda: not silent.is_established, 30, "the node closes the silent association")

    wait_until(lambda: threading.active_count() <= threads_before, 30, "association threads end")
    fresh = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AE_TITLE)
    assert fresh.is_established
    assert fresh.send_c_echo().Status == 0
    fresh.release()


# -- disk space -------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_below_reserve_out_of_resources_then_resumes(make_node, small_filesystem):
    node = make_node(data_dir=small_filesystem / "node", run_worker=False, node={"free_disk_reserve_mb": 16})
    ballast = small_filesystem / "ballast"
    with ballast.open("wb") as file:
        file.write(b"\0" * (40 * 1024 * 1024))
    with capture_logs() as logs:
        statuses = send_datasets(NODE_AE_TITLE, "127.0.0.1", node.receiver.port, [_study(1)], MODALITY_AE_TITLE)
    assert statuses == [DimseStatus.OUT_OF_RESOURCES]
    rejected = [entry for entry in logs if entry["event"] == "receiver.instance_rejected"]
    assert rejected[0]["status_name"] == "OUT_OF_RESOURCES"

    ballast.unlink()
    assert send_datasets(NODE_AE_TITLE, "127.0.0.1", node.receiver.port, [_study(2)], MODALITY_AE_TITLE) == [0]
    with node.index.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
