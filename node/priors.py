"""Prior lookup: the same patient's most recent earlier chest study in the index.

The prior is strictly earlier than the current study by Study Date and Study Time, at most
`max_prior_age_days` older, of the same Patient ID and Issuer of Patient ID, and routed as a
chest study with a frontal image. A candidate whose Patient Name differs is never used, and
the clash is logged with the patient hash only.
"""

from __future__ import annotations

import datetime as dt

import structlog
from pydicom.valuerep import PersonName
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.index.models import Instance, Patient, Study

log = structlog.get_logger(__name__)


def study_datetime(study_date: str, study_time: str) -> dt.datetime | None:
    """Parse DA and TM values into a naive datetime, or None when the date is missing or invalid."""
    try:
        date = dt.datetime.strptime(study_date.strip(), "%Y%m%d")
    except ValueError:
        return None
    digits = study_time.strip().split(".")[0]
    digits = (digits + "000000")[:6] if digits.isdigit() else "000000"
    hours, minutes, seconds = int(digits[0:2]), int(digits[2:4]), int(digits[4:6])
    if hours > 23 or minutes > 59 or seconds > 60:
        hours = minutes = seconds = 0
    return date.replace(hour=hours, minute=minutes, second=min(seconds, 59))


def _comparable_name(name: str) -> str:
    """Return a normalised form of a Patient Name: components upper-cased, empty trailing ones dropped."""
    person = PersonName(name)
    components = [part.strip().upper() for part in str(person.alphabetic or name).split("^")]
    while components and not components[-1]:
        components.pop()
    return "^".join(components)


def find_prior_study(session: Session, study: Study, max_prior_age_days: int) -> Study | None:
    """Return the prior study of `study`, or None when the patient has none in the index."""
    current_time = study_datetime(study.study_date, study.study_time)
    patient: Patient = study.patient
    if current_time is None or not patient.patient_id:
        return None
    earliest = current_time - dt.timedelta(days=max_prior_age_days)
    # A study whose frontal image retention has removed cannot serve as a prior any more.
    candidates = session.scalars(
        select(Study)
        .join(Instance, Instance.sop_instance_uid == Study.frontal_sop_instance_uid)
        .where(
            Study.patient_fk == patient.id,
            Study.id != study.id,
            Instance.removed_at.is_(None),
        )
    ).all()
    current_name = _comparable_name(study.patient_name)
    best: tuple[dt.datetime, Study] | None = None
    for candidate in candidates:
        candidate_time = study_datetime(candidate.study_date, candidate.study_time)
        if candidate_time is None or not (earliest <= candidate_time < current_time):
            continue
        if _comparable_name(candidate.patient_name) != current_name:
            log.warning(
                "priors.patient_name_mismatch",
                study_instance_uid=study.study_instance_uid,
                candidate_study_instance_uid=candidate.study_instance_uid,
                patient_hash=patient.patient_hash,
            )
            continue
        if best is None or candidate_time > best[0]:
            best = (candidate_time, candidate)
    return best[1] if best else None
