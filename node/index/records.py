"""Index writes made by the receiver: one instance with its patient, study and series rows.

Also the placeholder study row that the prior retrieval writes before it requests a prior
image from a PACS, so that the image is marked as retrieved from its first moment in the index.
"""

from __future__ import annotations

import datetime as dt

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.headers import InstanceHeader
from node.index.models import Instance, Patient, Series, Study, StudyState, utc_now
from node.index.session import record_audit

log = structlog.get_logger(__name__)

# A study in one of these states gets a new report when a late instance arrives.
_REOPENED_STATES = {StudyState.REPORTED, StudyState.SENT, StudyState.FAILED, StudyState.SKIPPED}


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """Return the index row of an instance, or None."""
    return session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).first()


def _get_or_create_patient(session: Session, header: InstanceHeader, patient_hash: str) -> Patient:
    patient = session.scalars(
        select(Patient).where(
            Patient.patient_id == header.patient_id,
            Patient.issuer_of_patient_id == header.issuer_of_patient_id,
        )
    ).first()
    if patient is None:
        other_issuers = session.scalars(
            select(Patient.patient_hash).where(
                Patient.patient_id == header.patient_id,
                Patient.issuer_of_patient_id != header.issuer_of_patient_id,
            )
        ).all()
        if other_issuers:
            # Same Patient ID from another issuer: kept as a different patient, never one prior chain.
            log.warning(
                "index.patient_id_clash",
                patient_hash=patient_hash,
                other_patient_hashes=list(other_issuers),
                study_instance_uid=header.study_instance_uid,
            )
        patient = Patient(
            patient_id=header.patient_id,
            issuer_of_patient_id=header.issuer_of_patient_id,
            patient_hash=patient_hash,
        )
        session.add(patient)
        session.flush()
    return patient


def record_instance(
    session: Session,
    header: InstanceHeader,
    *,
    file_path: str,
    file_size: int,
    calling_ae_title: str,
    patient_hash: str,
    stable_after: dt.timedelta,
    actor: str,
) -> Study:
    """Add one stored instance to the index and push its study's stable deadline.

    A study that already had its outcome (reported, sent, skipped or failed) goes back to
    receiving, so that the late instance leads to a new report version.
    """
    now = utc_now()
    patient = _get_or_create_patient(session, header, patient_hash)
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == header.study_instance_uid)
    ).first()
    if study is None:
        study = Study(
            study_instance_uid=header.study_instance_uid,
            patient_fk=patient.id,
            patient_name=header.patient_name,
            study_date=header.study_date,
            study_time=header.study_time,
            accession_number=header.accession_number,
            study_description=header.study_description,
            state=StudyState.RECEIVING,
            first_received_at=now,
        )
        session.add(study)
        session.flush()
        record_audit(
            session,
            entity="study",
            entity_id=study.id,
            to_state=StudyState.RECEIVING.value,
            actor=actor,
            reason="first instance received",
            study_instance_uid=study.study_instance_uid,
        )
    elif study.instance_count == 0:
        _adopt_first_instance(session, study, patient, header, actor)
    elif study.state in _REOPENED_STATES:
        record_audit(
            session,
            entity="study",
            entity_id=study.id,
            from_state=study.state.value,
            to_state=StudyState.RECEIVING.value,
            actor=actor,
            reason=f"late instance {header.sop_instance_uid}",
            study_instance_uid=study.study_instance_uid,
        )
        study.state = StudyState.RECEIVING
        study.state_reason = ""
    elif study.state in (StudyState.QUEUED, StudyState.RUNNING):
        # The job in hand reports on what has arrived so far; this instance leads to a
        # new version once the study is stable again.
        record_audit(
            session,
            entity="study",
            entity_id=study.id,
            from_state=study.state.value,
            to_state=StudyState.RECEIVING.value,
            actor=actor,
            reason=f"instance {header.sop_instance_uid} arrived while the report was {study.state.value}",
            study_instance_uid=study.study_instance_uid,
        )
        study.state = StudyState.RECEIVING

    series = session.scalars(
        select(Series).where(Series.series_instance_uid == header.series_instance_uid)
    ).first()
    if series is None:
        series = Series(
            series_instance_uid=header.series_instance_uid,
            study_fk=study.id,
            modality=header.modality,
            body_part_examined=header.body_part_examined,
            series_description=header.series_description,
            series_number=header.series_number,
        )
        session.add(series)
        session.flush()

    session.add(
        Instance(
            sop_instance_uid=header.sop_instance_uid,
            series_fk=series.id,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            instance_number=header.instance_number,
            view_position=header.view_position,
            view_code_value=header.view_code_value,
            view_code_meaning=header.view_code_meaning,
            image_laterality=header.image_laterality,
            image_comments=header.image_comments,
            file_path=file_path,
            file_size=file_size,
            sha256="",
            calling_ae_title=calling_ae_title,
            received_at=now,
        )
    )
    study.instance_count += 1
    study.last_received_at = now
    study.stable_deadline = now + stable_after
    return study


def _adopt_first_instance(session: Session, study: Study, patient: Patient, header: InstanceHeader, actor: str) -> None:
    """Fill a placeholder study row (see `create_retrieval_placeholder`) from its first instance.

    The patient and study attributes come from the instance, never from the C-FIND match
    that made the placeholder, so a prior is matched on what the PACS really sent.
    """
    study.patient = patient
    study.patient_name = header.patient_name
    study.study_date = header.study_date
    study.study_time = header.study_time
    study.accession_number = header.accession_number
    study.study_description = header.study_description
    record_audit(
        session,
        entity="study",
        entity_id=study.id,
        from_state=study.state.value,
        to_state=StudyState.RECEIVING.value,
        actor=actor,
        reason=f"first instance received; prior study retrieved from {study.retrieved_from}",
        study_instance_uid=study.study_instance_uid,
    )
    study.state = StudyState.RECEIVING
    study.state_reason = ""


def create_retrieval_placeholder(
    session: Session, study_instance_uid: str, patient_fk: int, retrieved_from: str, actor: str
) -> Study:
    """Add or reuse the study row of a prior about to be retrieved, marked with its source.

    The row has no instances and no stable deadline, so the stable timer leaves it alone
    until an instance arrives. A row of a study that already has instances is returned
    unchanged.

    Parameters
    ----------
    study_instance_uid
        The prior study to be retrieved.
    patient_fk
        The current study's patient row, replaced by the first instance's patient.
    retrieved_from
        AE title of the query source, stored in `Study.retrieved_from`.
    actor
        The actor named in the audit row.
    """
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).first()
    if study is not None:
        if study.instance_count == 0:
            study.retrieved_from = retrieved_from
            study.state_reason = f"prior study being retrieved from {retrieved_from}"
        return study
    study = Study(
        study_instance_uid=study_instance_uid,
        patient_fk=patient_fk,
        state=StudyState.SKIPPED,
        state_reason=f"prior study being retrieved from {retrieved_from}",
        retrieved_from=retrieved_from,
        stable_deadline=None,
        instance_count=0,
    )
    session.add(study)
    session.flush()
    record_audit(
        session,
        entity="study",
        entity_id=study.id,
        to_state=StudyState.SKIPPED.value,
        actor=actor,
        reason=study.state_reason,
        study_instance_uid=study_instance_uid,
    )
    return study


def record_retrieval_failed(session: Session, study_instance_uid: str, reason: str, actor: str) -> None:
    """Record on a placeholder row that its retrieve failed; a row with instances is left alone.

    The row is kept, not deleted, because a C-MOVE of another job for the same study may still
    deliver its image, which must then find the study marked as retrieved. A later search
    retrieves into the same row.
    """
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).first()
    if study is None or study.instance_count != 0:
        return
    study.state_reason = f"prior retrieve from {study.retrieved_from} failed: {reason}"
    record_audit(
        session,
        entity="study",
        entity_id=study.id,
        from_state=study.state.value,
        to_state=study.state.value,
        actor=actor,
        reason=study.state_reason,
        study_instance_uid=study_instance_uid,
    )
