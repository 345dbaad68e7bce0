"""Sender: delivers outbox entries (one SR to one destination) with C-STORE, retrying with backoff.

An entry is marked sent only after the destination returned a success or warning status
for the C-STORE. A refused association, a lost connection or a failure status schedules a
retry after an exponentially growing wait. After `max_attempts` the entry is marked failed
with the last status and stays visible. Entries are claimed under a lease (SKIP LOCKED on
PostgreSQL), so two senders never send one entry at the same time.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    Verification,
)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import DestinationSettings, NodeConfig
from node.dimse_status import status_category, status_name
from node.index.models import OutboxEntry, OutboxState, StructuredReport, StudyState, utc_now
from node.index.leases import is_dead_local_owner, lease_owner_name
from node.index.session import IndexDatabase, record_audit
from node.log_config import bind_patient_identifiers, patient_identifiers_redacted
from node.metrics import NodeMetrics
from node.store import FileStore
from node.tls import TLSConfigError, peer_context

log = structlog.get_logger(__name__)

SR_STORAGE_SOP_CLASSES = (EnhancedSRStorage, ComprehensiveSRStorage, BasicTextSRStorage)
_SEND_LEASE_SECONDS = 300


@dataclass(frozen=True)
class SendResult:
    """The outcome of one C-STORE attempt."""

    delivered: bool
    status: int | None
    error: str


def send_file(destination: DestinationSettings, path: Path, calling_ae_title: str) -> SendResult:
    """Send one DICOM file with C-STORE and return the outcome; never raises for network faults.

    With `destination.tls` the association runs over TLS, and a certificate or host name
    that fails verification ends it before any DICOM message is sent.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = destination.timeout_seconds
    ae.dimse_timeout = destination.timeout_seconds
    ae.network_timeout = destination.timeout_seconds
    ae.connection_timeout = destination.timeout_seconds
    for sop_class in SR_STORAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_context = None
    if destination.tls:
        try:
            tls_context = peer_context(destination)
        except TLSConfigError as exc:
            # Possible after a configuration reload; the start-up check covers the first load.
            return SendResult(False, None, f"TLS configuration invalid: {exc}")
    tls_args = (tls_context, destination.tls_server_hostname or destination.host) if tls_context else None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except OSError as exc:
        return SendResult(False, None, f"connection failed: {exc}")
    if not assoc.is_established:
        if tls_context is not None and tls_context.handshake_error:
            return SendResult(False, None, f"TLS handshake failed: {tls_context.handshake_error}")
        if assoc.is_rejected:
            return SendResult(False, None, "association rejected")
        return SendResult(False, None, "association not established (aborted or no answer)")
    try:
        response = assoc.send_c_store(path)
    except (ValueError, RuntimeError, OSError) as exc:
        assoc.abort()
        return SendResult(False, None, f"C-STORE not sent: {exc}")
    status = int(response.Status) if response is not None and "Status" in response else None
    assoc.release()
    if status is None:
        return SendResult(False, None, "no C-STORE response (timeout or aborted association)")
    if status_category(status) in ("success", "warning"):
        return SendResult(True, status, "")
    comment = str(response.get("ErrorComment", "")) if response is not None else ""
    return SendResult(False, status, f"C-STORE failed with status 0x{status:04X}{': ' + comment if comment else ''}")


def echo(host: str, port: int, called_ae_title: str, calling_ae_title: str, timeout_seconds: float = 10.0) -> int | None:
    """Send a C-ECHO and return its status, or None when no association was established."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae_title)
    if not assoc.is_established:
        return None
    try:
        response = assoc.send_c_echo()
        return int(response.Status) if response is not None and "Status" in response else None
    finally:
        assoc.release()


class Sender:
    """A thread that delivers due outbox entries.

    `config` may be replaced at any time by a reloaded configuration with new destinations.
    Each send reads it once, so a send in progress finishes with the settings it started with.
    """

    def __init__(
        self,
        config: NodeConfig,
        index: IndexDatabase,
        store: FileStore,
        poll_seconds: float = 0.5,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.store = store
        self.poll_seconds = poll_seconds
        self.metrics = metrics or NodeMetrics()
        self.sender_id = lease_owner_name("sender")
        for destination in config.destinations:
            if destination.tls:
                # Built once here so that a missing or invalid file stops the node at start.
                peer_context(destination)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start delivering in a background thread."""
        self.release_dead_claims()
        self._thread = threading.Thread(target=self._run, name="libra-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 60.0) -> None:
        """Stop after the send in hand and wait for the thread.

        An entry still being sent after `timeout_seconds` is made pending again, so that no
        row stays claimed by a process that is exiting.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
            if self._thread.is_alive():
                self._release(lambda owner: owner == self.sender_id, "sender stopping; entry released")

    def release_dead_claims(self) -> int:
        """Make the entries of crashed senders on this host due again without waiting for their leases."""
        return self._release(lambda owner: is_dead_local_owner(owner, "sender"), "lease owner is no longer running")

    def _release(self, owner_matches, reason: str) -> int:
        with self.index.transaction() as session:
            sending = session.scalars(select(OutboxEntry).where(OutboxEntry.state == OutboxState.SENDING)).all()
            released = [entry for entry in sending if owner_matches(entry.lease_owner)]
            for entry in released:
                record_audit(
                    session,
                    entity="outbox",
                    entity_id=entry.id,
                    from_state=OutboxState.SENDING.value,
                    to_state=OutboxState.PENDING.value,
                    actor=self.sender_id,
                    reason=f"{reason} ({entry.lease_owner})",
                    study_instance_uid=entry.structured_report.study.study_instance_uid,
                )
                log.warning("sender.entry_released", outbox_id=entry.id, destination=entry.destination, reason=reason)
                entry.state = OutboxState.PENDING
                entry.lease_owner = ""
                entry.lease_expires_at = None
                entry.next_attempt_at = utc_now()
            return len(released)

    def wake(self) -> None:
        """Look for due entries now instead of at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                handled = self.send_once()
            except Exception as exc:  # noqa: BLE001 - the loop must survive database hiccups
                log.error("sender.loop_failed", exc_info=exc)
                handled = False
            if not handled:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def send_once(self) -> bool:
        """Claim and send one due entry; return False when none was due."""
        claimed = self._claim_entry()
        if claimed is None:
            return False
        entry_id, destination_name, file_path, sr_sop_instance_uid, attempt = claimed
        config = self.config
        destination = next((item for item in config.destinations if item.name == destination_name), None)
        context = {
            "outbox_id": entry_id,
            "destination": destination_name,
            "sr_sop_instance_uid": sr_sop_instance_uid,
            "attempt": attempt,
        }
        if destination is None:
            result = SendResult(False, None, f"destination {destination_name!r} is no longer configured")
            self._record_result(entry_id, result, final=True, context=context)
            return True
        path = self.store.absolute(file_path)
        with patient_identifiers_redacted():
            started = time.monotonic()
            try:
                bind_patient_identifiers(pydicom.dcmread(path, stop_before_pixels=True))
            except (InvalidDicomError, OSError) as exc:
                result = SendResult(False, None, f"SR file {file_path} cannot be read: {exc}")
            else:
                result = send_file(destination, path, config.node.ae_title)
            self.metrics.send_seconds.labels(
                destination=destination_name, outcome="sent" if result.delivered else "failed"
            ).observe(time.monotonic() - started)
            final = not result.delivered and attempt >= destination.max_attempts
            self._record_result(entry_id, result, final=final, context=context, destination=destination)
        return True

    def _claim_entry(self):
        now = utc_now()
        with self.index.transaction() as session:
            query = (
                select(OutboxEntry)
                .where(
                    ((OutboxEntry.state == OutboxState.PENDING) & (OutboxEntry.next_attempt_at <= now))
                    | ((OutboxEntry.state == OutboxState.SENDING) & (OutboxEntry.lease_expires_at < now))
                )
                .order_by(OutboxEntry.next_attempt_at, OutboxEntry.id)
                .limit(1)
            )
            if not self.index.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            entry = session.scalars(query).first()
            if entry is None:
                return None
            report = entry.structured_report
            record_audit(
                session,
                entity="outbox",
                entity_id=entry.id,
                from_state=entry.state.value,
                to_state=OutboxState.SENDING.value,
                actor=self.sender_id,
                reason=f"attempt {entry.attempts + 1}" + ("; lease expired, reclaimed" if entry.state == OutboxState.SENDING else ""),
                study_instance_uid=report.study.study_instance_uid,
            )
            entry.state = OutboxState.SENDING
            entry.lease_owner = self.sender_id
            entry.lease_expires_at = now + dt.timedelta(seconds=_SEND_LEASE_SECONDS)
            entry.attempts += 1
            return entry.id, entry.destination, report.file_path, report.sop_instance_uid, entry.attempts

    def _record_result(self, entry_id: int, result: SendResult, *, final: bool, context: dict, destination=None) -> None:
        now = utc_now()
        status_fields = {}
        if result.status is not None:
            status_fields = {"status": f"0x{result.status:04X}", "status_name": status_name(result.status)}
        with self.index.transaction() as session:
            entry = session.get(OutboxEntry, entry_id)
            report: StructuredReport = entry.structured_report
            study = report.study
            entry.last_status = result.status
            entry.lease_owner = ""
            entry.lease_expires_at = None
            if result.delivered:
                entry.state = OutboxState.SENT
                entry.sent_at = now
                entry.last_error = ""
                reason = "delivered"
            elif final:
                entry.state = OutboxState.FAILED
                entry.last_error = result.error
                reason = f"gave up after {entry.attempts} attempts: {result.error}"
            else:
                backoff = min(
                    destination.retry_backoff_seconds * 2 ** (entry.attempts - 1), destination.max_backoff_seconds
                )
                entry.state = OutboxState.PENDING
                entry.last_error = result.error
                entry.next_attempt_at = now + dt.timedelta(seconds=backoff)
                reason = f"attempt {entry.attempts} failed: {result.error}; retry in {backoff:.0f} s"
            record_audit(
                session,
                entity="outbox",
                entity_id=entry.id,
                from_state=OutboxState.SENDING.value,
                to_state=entry.state.value,
                actor=self.sender_id,
                reason=reason,
                study_instance_uid=study.study_instance_uid,
            )
            study_outcome = self._update_study(session, report, actor=self.sender_id)

        context = context | {"study_instance_uid": study.study_instance_uid} | status_fields
        if result.delivered:
            log.info("sender.sr_sent", **context)
        elif final:
            log.error("sender.send_failed", error=result.error, **context)
        else:
            log.warning("sender.retry_scheduled", error=result.error, retry_at=entry.next_attempt_at.isoformat(), **context)
        if study_outcome is not None:
            self.metrics.study_outcomes.labels(outcome=study_outcome.value).inc()
        if study_outcome == StudyState.SENT:
            log.info("study.report_sent", study_instance_uid=study.study_instance_uid, sr_sop_instance_uid=report.sop_instance_uid)
        elif study_outcome == StudyState.FAILED:
            log.error("study.failed", study_instance_uid=study.study_instance_uid, reason=study.state_reason)

    def _update_study(self, session: Session, report: StructuredReport, actor: str) -> StudyState | None:
        """Move the study to sent or failed once every entry of its latest report is final."""
        study = report.study
        if study.state != StudyState.REPORTED:
            return None
        latest_job_fk = session.scalars(
            select(StructuredReport.job_fk)
            .where(StructuredReport.study_fk == study.id)
            .order_by(StructuredReport.id.desc())
            .limit(1)
        ).first()
        if report.job_fk != latest_job_fk:
            return None
        entries = session.scalars(
            select(OutboxEntry)
            .join(StructuredReport, OutboxEntry.structured_report_fk == StructuredReport.id)
            .where(StructuredReport.job_fk == latest_job_fk)
        ).all()
        states = {entry.state for entry in entries}
        if states == {OutboxState.SENT}:
            new_state, reason = StudyState.SENT, "SR delivered to every destination"
        elif states <= {OutboxState.SENT, OutboxState.FAILED}:
            failed = sorted(entry.destination for entry in entries if entry.state == OutboxState.FAILED)
            new_state, reason = StudyState.FAILED, f"SR not delivered to {', '.join(failed)}"
        else:
            return None
        record_audit(
            session,
            entity="study",
            entity_id=study.id,
            from_state=study.state.value,
            to_state=new_state.value,
            actor=actor,
            reason=reason,
            study_instance_uid=study.study_instance_uid,
        )
        study.state = new_state
        study.state_reason = "" if new_state == StudyState.SENT else reason
        return new_state
