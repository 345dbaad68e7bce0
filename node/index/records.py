"""Index writes made by the receiver: one instance with its patient, study and series rows."""

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
