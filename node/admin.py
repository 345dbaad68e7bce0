"""Admin operations on the index, shared by the command line and the HTTP API.

Status counts, study and outbox listings, a study's audit trail, requeue (a new report job for a
study) and resend (a new delivery of an existing SR). Every change is written with an audit row
whose actor names the admin, in the same transaction as the change. Listings carry the keyed
`patient_hash`, never Patient ID or Patient Name.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.config import DestinationSettings
from node.index.models import (
    AuditEvent,
    Instance,
    JobState,
    OutboxEntry,
    OutboxState,
    Patient,
    ReportJob,
    Series,
    StructuredReport,
    Study,
    StudyState,
    utc_now,
)
from node.index.session import IndexDatabase, record_audit

log = structlog.get_logger(__name__)

# The states that `status` counts and `studies --state` filters on. "receiving" and "waiting"
# split the index state RECEIVING: receiving while the stable deadline is in the future (an
# instance arrived within study_stable_seconds), waiting once it has passed and the study
# waits for the study-stable timer to route it. "reported" means the SR is written and
# waits for delivery.
DISPLAY_STATES = ("receiving", "waiting", "queued", "running", "reported", "sent", "failed", "skipped")

_IN_PROGRESS_STATES = (StudyState.RECEIVING, StudyState.QUEUED, StudyState.RUNNING)
_DURATION_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class AdminError(ValueError):
    """An admin request that cannot be carried out; its message states the cause and the next step."""


class NotFoundError(AdminError):
    """The study, SR or destination named in an admin request does not exist."""


class ConflictError(AdminError):
    """The request does not fit the current state, for example a requeue of a running study."""


@dataclass(frozen=True)
class StudySummary:
    """One row of the study listing."""

    study_instance_uid: str
    patient_hash: str
    received_at: dt.datetime
    instance_count: int
    state: str
    state_reason: str
    sr_sop_instance_uids: tuple[str, ...]

    def as_dict(self) -> dict:
        """Return the row as JSON-compatible values (times in ISO 8601, UTC)."""
        row = asdict(self)
        row["received_at"] = self.received_at.isoformat()
        row["sr_sop_instance_uids"] = list(self.sr_sop_instance_uids)
        return row


@dataclass(frozen=True)
class AuditRow:
    """One audit event of a study, its jobs or its outbox entries."""

    occurred_at: dt.datetime
    entity: str
    entity_id: int
    from_state: str
    to_state: str
    actor: str
    reason: str

    def as_dict(self) -> dict:
        """Return the row as JSON-compatible values."""
        return asdict(self) | {"occurred_at": self.occurred_at.isoformat()}


@dataclass(frozen=True)
class OutboxSummary:
    """One delivery of an SR to a destination."""

    outbox_id: int
    sr_sop_instance_uid: str
    study_instance_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: dt.datetime
    sent_at: dt.datetime | None
    last_status: int | None
    last_error: str

    def as_dict(self) -> dict:
        """Return the row as JSON-compatible values."""
        return asdict(self) | {
            "next_attempt_at": self.next_attempt_at.isoformat(),
            "sent_at": self.sent_at.isoformat() if self.sent_at else None,
        }


@dataclass(frozen=True)
class RequeueResult:
    """The outcome of a requeue: a new queued job, or a new routing of the study."""

    study_instance_uid: str
    job_id: int | None
    state: str
    message: str


@dataclass(frozen=True)
class ResendResult:
    """The outcome of a resend for one destination."""

    sr_sop_instance_uid: str
    destination: str
    outbox_id: int
    action: str


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """Parse a `--since` value: an age such as 30m, 24h, 7d or 2w, or an ISO 8601 date or time.

    An ISO time without an offset is taken as UTC.

    Raises
    ------
    AdminError
        When the text is neither form; the message shows examples.
    """
    now = now or utc_now()
    match = _DURATION_PATTERN.match(text.strip())
    if match:
        amount, unit = match.groups()
        return now - dt.timedelta(**{_DURATION_UNITS[unit]: float(amount)})
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise AdminError(
            f"--since {text!r} is neither an age (for example 30m, 24h, 7d) nor an ISO date or time "
            "(for example 2026-01-31 or 2026-01-31T08:00)"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def display_state(study: Study, now: dt.datetime) -> str:
    """Return the study's state as `status` shows it, splitting RECEIVING into receiving and waiting."""
    if study.state == StudyState.RECEIVING and (study.stable_deadline is None or study.stable_deadline <= now):
        return "waiting"
    return study.state.value


def _state_filter(state: str, now: dt.datetime):
    if state not in DISPLAY_STATES:
        raise AdminError(f"state {state!r} is not one of {', '.join(DISPLAY_STATES)}")
    if state == "receiving":
        return (Study.state == StudyState.RECEIVING) & (Study.stable_deadline > now)
    if state == "waiting":
        return (Study.state == StudyState.RECEIVING) & (
            Study.stable_deadline.is_(None) | (Study.stable_deadline <= now)
        )
    return Study.state == StudyState(state)


def status_counts(index: IndexDatabase, now: dt.datetime | None = None) -> dict[str, int]:
    """Return the number of studies in each of `DISPLAY_STATES`."""
    now = now or utc_now()
    counts = dict.fromkeys(DISPLAY_STATES, 0)
    with index.transaction() as session:
        for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state)):
            counts[state.value] = count
        waiting = session.scalar(select(func.count()).select_from(Study).where(_state_filter("waiting", now)))
    counts["receiving"] -= waiting
    counts["waiting"] = waiting
    return counts


def queue_depths(index: IndexDatabase) -> dict[str, dict[str, int]]:
    """Return the number of report jobs and outbox entries in each state."""
    with index.transaction() as session:
        jobs = dict(session.execute(select(ReportJob.state, func.count()).group_by(ReportJob.state)).all())
        outbox = dict(session.execute(select(OutboxEntry.state, func.count()).group_by(OutboxEntry.state)).all())
    return {
        "report_jobs": {state.value: jobs.get(state, 0) for state in JobState},
        "outbox": {state.value: outbox.get(state, 0) for state in OutboxState},
    }


def _latest_sr_uids(session: Session, study_ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
    """Return, per study, the SOP Instance UIDs of the SRs of its latest report job."""
    latest: dict[int, tuple[int, list[str]]] = {}
    rows = session.execute(
        select(StructuredReport.study_fk, StructuredReport.job_fk, StructuredReport.sop_instance_uid)
        .where(StructuredReport.study_fk.in_(study_ids))
        .order_by(StructuredReport.id)
    )
    for study_id, job_id, sop_instance_uid in rows:
        if study_id not in latest or latest[study_id][0] != job_id:
            latest[study_id] = (job_id, [])
        latest[study_id][1].append(sop_instance_uid)
    return {study_id: tuple(uids) for study_id, (_, uids) in latest.items()}


def list_studies(
    index: IndexDatabase,
    state: str | None = None,
    since: dt.datetime | None = None,
    limit: int = 100,
    now: dt.datetime | None = None,
) -> list[StudySummary]:
    """Return studies, most recently received first.

    Parameters
    ----------
    state
        Only studies in this state (one of `DISPLAY_STATES`).
    since
        Only studies whose latest instance arrived at or after this time.
    limit
        The maximum number of rows.

    Raises
    ------
    AdminError
        When `state` is not one of `DISPLAY_STATES`.
    """
    now = now or utc_now()
    query = select(Study, Patient.patient_hash).join(Patient, Study.patient_fk == Patient.id)
    if state:
        query = query.where(_state_filter(state, now))
    if since is not None:
        query = query.where(Study.last_received_at >= since)
    query = query.order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
    with index.transaction() as session:
        rows = session.execute(query).all()
        sr_uids = _latest_sr_uids(session, [study.id for study, _ in rows])
        return [
            StudySummary(
                study_instance_uid=study.study_instance_uid,
                patient_hash=hashed_patient,
                received_at=study.last_received_at,
                instance_count=study.instance_count,
                state=display_state(study, now),
                state_reason=study.state_reason,
                sr_sop_instance_uids=sr_uids.get(study.id, ()),
            )
            for study, hashed_patient in rows
        ]


def study_audit(index: IndexDatabase, study_instance_uid: str) -> list[AuditRow]:
    """Return the audit trail of a study, its report jobs and its outbox entries, oldest first.

    Raises
    ------
    NotFoundError
        When the study is not in the index.
    """
    with index.transaction() as session:
        _get_study(session, study_instance_uid)
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.study_instance_uid == study_instance_uid)
            .order_by(AuditEvent.occurred_at, AuditEvent.id)
        ).all()
        return [
            AuditRow(
                occurred_at=event.occurred_at,
                entity=event.entity,
                entity_id=event.entity_id,
                from_state=event.from_state,
                to_state=event.to_state,
                actor=event.actor,
                reason=event.reason,
            )
            for event in events
        ]


def list_outbox(index: IndexDatabase, limit: int = 50, state: str | None = None) -> list[OutboxSummary]:
    """Return outbox entries, newest first, optionally only those in one `OutboxState`.

    Raises
    ------
    AdminError
        When `state` is not an outbox state.
    """
    query = (
        select(OutboxEntry, StructuredReport.sop_instance_uid, Study.study_instance_uid)
        .join(StructuredReport, OutboxEntry.structured_report_fk == StructuredReport.id)
        .join(Study, StructuredReport.study_fk == Study.id)
    )
    if state:
        try:
            query = query.where(OutboxEntry.state == OutboxState(state))
        except ValueError as exc:
            valid = ", ".join(member.value for member in OutboxState)
            raise AdminError(f"outbox state {state!r} is not one of {valid}") from exc
    query = query.order_by(OutboxEntry.id.desc()).limit(limit)
    with index.transaction() as session:
        return [
            OutboxSummary(
                outbox_id=entry.id,
                sr_sop_instance_uid=sr_sop_instance_uid,
                study_instance_uid=study_instance_uid,
                destination=entry.destination,
                state=entry.state.value,
                attempts=entry.attempts,
                next_attempt_at=entry.next_attempt_at,
                sent_at=entry.sent_at,
                last_status=entry.last_status,
                last_error=entry.last_error,
            )
            for entry, sr_sop_instance_uid, study_instance_uid in session.execute(query)
        ]


def _get_study(session: Session, study_instance_uid: str, for_update: bool = False) -> Study:
    query = select(Study).where(Study.study_instance_uid == study_instance_uid)
    if for_update and session.get_bind().dialect.name != "sqlite":
        query = query.with_for_update()
    study = session.scalars(query).first()
    if study is None:
        raise NotFoundError(
            f"study {study_instance_uid} is not in the index; list studies with 'libra-node studies'"
        )
    return study


def _present_instance_uids(session: Session, study: Study) -> set[str]:
    return set(
        session.scalars(
            select(Instance.sop_instance_uid)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.study_fk == study.id, Instance.removed_at.is_(None))
        )
    )


def requeue_study(index: IndexDatabase, study_instance_uid: str, actor: str) -> RequeueResult:
    """Queue a new report job for a study whose report is finished (reported, sent or failed).

    The worker then writes a new SR version whose Predecessor Documents Sequence names the
    earlier SR. A skipped study, or one whose frontal image is gone, is routed again by the
    study-stable timer with the current routing rules instead: it goes back to receiving with
    a deadline of now.

    Raises
    ------
    NotFoundError
        When the study is not in the index.
    ConflictError
        When the study is still receiving, queued or running, when a report job for it is
        already queued or running, or when retention removed all its images.
    """
    now = utc_now()
    with index.transaction() as session:
        study = _get_study(session, study_instance_uid, for_update=True)
        if study.state in _IN_PROGRESS_STATES:
            raise ConflictError(
                f"study {study_instance_uid} is {study.state.value}; its report is still in progress, "
                "so there is nothing to requeue"
            )
        open_job = session.scalars(
            select(ReportJob.id).where(
                ReportJob.study_fk == study.id, ReportJob.state.in_([JobState.QUEUED, JobState.RUNNING])
            )
        ).first()
        if open_job is not None:
            raise ConflictError(f"study {study_instance_uid} already has report job {open_job} queued or running")
        present = _present_instance_uids(session, study)
        if not present:
            raise ConflictError(
                f"the images of study {study_instance_uid} were removed by retention; "
                "send the study to the node again to report on it"
            )

        previous_state = study.state.value
        if study.frontal_sop_instance_uid in present:
            job = ReportJob(study_fk=study.id, state=JobState.QUEUED, created_at=now, updated_at=now)
            session.add(job)
            session.flush()
            record_audit(
                session,
                entity="job",
                entity_id=job.id,
                to_state=JobState.QUEUED.value,
                actor=actor,
                reason="requeued by admin",
                study_instance_uid=study_instance_uid,
            )
            study.state = StudyState.QUEUED
            study.state_reason = ""
            job_id, reason = job.id, f"requeued by admin; job {job.id}"
            message = f"report job {job.id} queued for study {study_instance_uid}"
        else:
            study.state = StudyState.RECEIVING
            study.state_reason = ""
            study.stable_deadline = now
            job_id, reason = None, "requeued by admin; routing again"
            message = f"study {study_instance_uid} will be routed again with the current routing rules"
        record_audit(
            session,
            entity="study",
            entity_id=study.id,
            from_state=previous_state,
            to_state=study.state.value,
            actor=actor,
            reason=reason,
            study_instance_uid=study_instance_uid,
        )
        new_state = study.state.value
    log.info("admin.study_requeued", study_instance_uid=study_instance_uid, job_id=job_id, actor=actor)
    return RequeueResult(study_instance_uid, job_id, new_state, message)


def _resend_targets(
    report: StructuredReport, destinations: Sequence[DestinationSettings], to: str | None
) -> list[DestinationSettings]:
    if to is not None:
        destination = next((item for item in destinations if item.name == to), None)
        if destination is None:
            configured = ", ".join(item.name for item in destinations) or "none"
            raise NotFoundError(f"destination {to!r} is not configured (configured: {configured})")
        if destination.sr_class.value != report.sr_class:
            raise ConflictError(
                f"SR {report.sop_instance_uid} is a {report.sr_class} SR, but destination {to!r} takes "
                f"{destination.sr_class.value} SRs; requeue the study to write one for it"
            )
        return [destination]
    targets = [item for item in destinations if item.sr_class.value == report.sr_class]
    if not targets:
        raise ConflictError(
            f"no configured destination takes {report.sr_class} SRs such as {report.sop_instance_uid}; "
            "name one with --to or add a [[destinations]] entry"
        )
    return targets


def resend_sr(
    index: IndexDatabase,
    sr_sop_instance_uid: str,
    destinations: Sequence[DestinationSettings],
    actor: str,
    to: str | None = None,
) -> list[ResendResult]:
    """Deliver an existing SR again, to one destination or to every destination of its SR class.

    A finished delivery (sent or failed) starts over with its attempt count at zero. A
    destination without a delivery of this SR gets a new outbox entry. A delivery that is
    still pending or sending is left as it is.

    Raises
    ------
    NotFoundError
        When the SR or the destination named by `to` is unknown.
    ConflictError
        When retention removed the SR's file, when the destination takes another SR class, or
        when every target delivery is still pending.
    """
    now = utc_now()
    results: list[ResendResult] = []
    with index.transaction() as session:
        report = session.scalars(
            select(StructuredReport).where(StructuredReport.sop_instance_uid == sr_sop_instance_uid)
        ).first()
        if report is None:
            raise NotFoundError(
                f"SR {sr_sop_instance_uid} is not in the index; list SR UIDs with 'libra-node studies'"
            )
        if report.removed_at is not None:
            raise ConflictError(
                f"the file of SR {sr_sop_instance_uid} was removed by retention; requeue its study for a new SR"
            )
        study = report.study
        entries = {entry.destination: entry for entry in report.outbox_entries}
        for destination in _resend_targets(report, destinations, to):
            entry = entries.get(destination.name)
            if entry is not None and entry.state in (OutboxState.PENDING, OutboxState.SENDING):
                results.append(ResendResult(sr_sop_instance_uid, destination.name, entry.id, "already_pending"))
                continue
            previous_state = entry.state.value if entry is not None else ""
            if entry is None:
                entry = OutboxEntry(structured_report_fk=report.id, destination=destination.name)
                session.add(entry)
            entry.state = OutboxState.PENDING
            entry.attempts = 0
            entry.next_attempt_at = now
            entry.lease_owner = ""
            entry.lease_expires_at = None
            entry.last_error = ""
            session.flush()
            record_audit(
                session,
                entity="outbox",
                entity_id=entry.id,
                from_state=previous_state,
                to_state=OutboxState.PENDING.value,
                actor=actor,
                reason=f"resend of SR {sr_sop_instance_uid} requested by admin",
                study_instance_uid=study.study_instance_uid,
            )
            results.append(ResendResult(sr_sop_instance_uid, destination.name, entry.id, "queued"))
        if all(result.action == "already_pending" for result in results):
            raise ConflictError(
                f"SR {sr_sop_instance_uid} is already waiting for delivery to "
                f"{', '.join(result.destination for result in results)}"
            )
        _reopen_study_for_delivery(session, study, report, actor)
    log.info(
        "admin.sr_resend_queued",
        sr_sop_instance_uid=sr_sop_instance_uid,
        study_instance_uid=study.study_instance_uid,
        destinations=[result.destination for result in results if result.action == "queued"],
        actor=actor,
    )
    return results


def _reopen_study_for_delivery(session: Session, study: Study, report: StructuredReport, actor: str) -> None:
    """Put a finished study back to reported when the resent SR is from its latest report.

    The sender moves a study to sent or failed only from reported, so this lets the study's
    state follow the new delivery. An older SR version leaves the study as it is.
    """
    latest_job_fk = session.scalar(
        select(StructuredReport.job_fk)
        .where(StructuredReport.study_fk == study.id)
        .order_by(StructuredReport.id.desc())
        .limit(1)
    )
    if report.job_fk != latest_job_fk or study.state not in (StudyState.SENT, StudyState.FAILED):
        return
    record_audit(
        session,
        entity="study",
        entity_id=study.id,
        from_state=study.state.value,
        to_state=StudyState.REPORTED.value,
        actor=actor,
        reason=f"SR {report.sop_instance_uid} queued for delivery again",
        study_instance_uid=study.study_instance_uid,
    )
    study.state = StudyState.REPORTED
    study.state_reason = ""
