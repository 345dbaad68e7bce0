"""Prior lookup: the same patient's most recent earlier chest study, and nothing else."""

from __future__ import annotations

import datetime as dt

import pytest
from structlog.testing import capture_logs

from node.index.models import Instance, Patient, Series, Study, StudyState
from node.index.session import IndexDatabase
from node.priors import find_prior_study, study_datetime


@pytest.fixture
def index(tmp_path):
    database = IndexDatabase(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    database.upgrade_schema()
    yield database
    database.dispose()


def _add_study(session, patient, uid, date, time="120000", name="DOE^JANE", frontal=True, removed_at=None):
    study = Study(
        study_instance_uid=uid,
        patient_fk=patient.id,
        patient_name=name,
        study_date=date,
        study_time=time,
        state=StudyState.SENT,
        frontal_sop_instance_uid=f"{uid}.1" if frontal else None,
    )
    session.add(study)
    session.flush()
    if frontal:
        series = Series(series_instance_uid=f"{uid}.9", study_fk=study.id, modality="CR")
        session.add(series)
        session.flush()
        session.add(
            Instance(
                sop_instance_uid=f"{uid}.1",
                series_fk=series.id,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                file_path=f"{uid}.dcm",
                file_size=1,
                sha256="",
                removed_at=removed_at,
            )
        )
        session.flush()
    return study


def _patient(session, patient_id="P1", issuer=""):
    patient = Patient(patient_id=patient_id, issuer_of_patient_id=issuer, patient_hash="h")
    session.add(patient)
    session.flush()
    return patient


def test_prior_most_recent_earlier_chosen(index):
    with index.transaction() as session:
        patient = _patient(session)
        _add_study(session, patient, "1.1", "20240101")
        _add_study(session, patient, "1.2", "20250101")
        _add_study(session, patient, "1.4", "20270101")
        current = _add_study(session, patient, "1.3", "20260101")
        assert find_prior_study(session, current, 3650).study_instance_uid == "1.2"


def test_prior_same_day_ordered_by_time(index):
    with index.transaction() as session:
        patient = _patient(session)
        _add_study(session, patient, "1.1", "20260101", "080000")
        _add_study(session, patient, "1.2", "20260101", "130000")
        current = _add_study(session, patient, "1.3", "20260101", "120000")
        assert find_prior_study(session, current, 3650).study_instance_uid == "1.1"


def test_prior_too_old_not_used(index):
    with index.transaction() as session:
        patient = _patient(session)
        _add_study(session, patient, "1.1", "20200101")
        current = _add_study(session, patient, "1.3", "20260101")
        assert find_prior_study(session, current, 365) is None


def test_prior_non_chest_study_not_used(index):
    with index.transaction() as session:
        patient = _patient(session)
        _add_study(session, patient, "1.1", "20250101", frontal=False)
        current = _add_study(session, patient, "1.3", "20260101")
        assert find_prior_study(session, current, 3650) is None


def test_prior_removed_by_retention_not_used(index):
    with index.transaction() as session:
        patient = _patient(session)
        _add_study(session, patient, "1.1", "20240101")
        _add_study(session, patient, "1.2", "20250101", removed_at=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc))
        current = _add_study(session, patient, "1.3", "20260101")
        assert find_prior_study(session, current, 3650).study_instance_uid == "1.1"


def test_prior_other_issuer_not_used(index):
    with index.transaction() as session:
        other = _patient(session, issuer="HOSPITAL_B")
        _add_study(session, other, "1.1", "20250101")
        patient = _patient(session, issuer="HOSPITAL_A")
        current = _add_study(session, patient, "1.3", "20260101")
        assert find_prior_study(session, current, 3650) is None


def test_prior_name_mismatch_not_used_and_logged(index):
    with index.transaction() as session:
        patient = _patient(session)
        _add_study(session, patient, "1.1", "20250101", name="SMITH^JOHN")
        current = _add_study(session, patient, "1.3", "20260101", name="DOE^JANE")
        with capture_logs() as logs:
            assert find_prior_study(session, current, 3650) is None
    events = [entry for entry in logs if entry["event"] == "priors.patient_name_mismatch"]
    assert len(events) == 1
    assert "SMITH" not in str(events[0])


def test_prior_name_case_and_trailing_components_ignored(index):
    with index.transaction() as session:
        patient = _patient(session)
        _add_study(session, patient, "1.1", "20250101", name="Doe^Jane^^")
        current = _add_study(session, patient, "1.3", "20260101", name="DOE^JANE")
        assert find_prior_study(session, current, 3650).study_instance_uid == "1.1"


@pytest.mark.parametrize(("date", "time", "expected"), [("20260102", "0930", "2026-01-02 09:30:00"), ("2026", "", None), ("20260102", "", "2026-01-02 00:00:00")])
def test_study_datetime_parses_da_tm(date, time, expected):
    parsed = study_datetime(date, time)
    assert (str(parsed) if parsed else None) == expected
