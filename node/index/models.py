"""Tables of the index: patients, studies, series, instances, report jobs, SRs, outbox, audit.

Patient identity is Patient ID plus Issuer of Patient ID. States are string Enums whose values
are what the database stores.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> dt.datetime:
    """Return the current time as an aware UTC datetime."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """Stores aware datetimes as UTC and returns them aware, on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the index; use an aware UTC datetime")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


def _enum_column(enum_class: type[enum.Enum]) -> Enum:
    return Enum(
        enum_class,
        native_enum=False,
        validate_strings=True,
        length=24,
        values_callable=lambda members: [member.value for member in members],
    )


class StudyState(str, enum.Enum):
    """The pipeline stage of a study."""

    RECEIVING = "receiving"  # instances arriving; the stable deadline is in the future
    QUEUED = "queued"  # stable and routed; a report job waits for a worker
    RUNNING = "running"  # a worker is writing the report
    REPORTED = "reported"  # the SR is written; outbox entries wait to be sent
    SENT = "sent"  # every destination acknowledged the SR
    SKIPPED = "skipped"  # not a study the routing rules report on; see state_reason
    FAILED = "failed"  # the job or a send failed for good; see state_reason


class JobState(str, enum.Enum):
    """State of a report job."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutboxState(str, enum.Enum):
    """State of one SR's delivery to one destination."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_hash: Mapped[str] = mapped_column(String(16))

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_state_deadline", "state", "stable_deadline"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    # The name as received with this study; prior lookup requires equal names.
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[StudyState] = mapped_column(_enum_column(StudyState), default=StudyState.RECEIVING)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    stable_deadline: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Set by routing when the study is a chest radiograph study with a frontal image.
    frontal_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    frontal_reason: Mapped[str] = mapped_column(Text, default="")
    # AE title of the query source this study was retrieved from as a prior, or None for a
    # study the node received. The stable timer never queues a report job for such a study.
    retrieved_from: Mapped[str | None] = mapped_column(String(16))

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    view_position: Mapped[str] = mapped_column(String(16), default="")
    view_code_meaning: Mapped[str] = mapped_column(String(64), default="")
    view_code_value: Mapped[str] = mapped_column(String(16), default="")
    image_laterality: Mapped[str] = mapped_column(String(4), default="")
    image_comments: Mapped[str] = mapped_column(Text, default="")
    file_path: Mapped[str] = mapped_column(String(255))
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    # Set when retention deleted the file; the row stays for the study's history.
    removed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    series: Mapped[Series] = relationship(back_populates="instances")


class ReportJob(Base):
    __tablename__ = "report_jobs"
    __table_args__ = (Index("ix_report_jobs_state", "state", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    state: Mapped[JobState] = mapped_column(_enum_column(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)

    study: Mapped[Study] = relationship()


class StructuredReport(Base):
    """An SR the node wrote; the file lives in the store."""

    __tablename__ = "structured_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("report_jobs.id"), index=True)
    sr_class: Mapped[str] = mapped_column(String(24))
    prior_study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    predecessor_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(String(255))
    model_name: Mapped[str] = mapped_column(String(128))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    # Set when retention deleted the file after every destination received it.
    removed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    study: Mapped[Study] = relationship()
    outbox_entries: Mapped[list[OutboxEntry]] = relationship(back_populates="structured_report")


class OutboxEntry(Base):
    """The delivery of one SR to one destination, with its retry state."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("structured_report_fk", "destination"),
        Index("ix_outbox_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    structured_report_fk: Mapped[int] = mapped_column(ForeignKey("structured_reports.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[OutboxState] = mapped_column(_enum_column(OutboxState), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    structured_report: Mapped[StructuredReport] = relationship(back_populates="outbox_entries")


class AuditEvent(Base):
    """One state change of a study, job or outbox entry."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[int] = mapped_column(Integer)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    from_state: Mapped[str] = mapped_column(String(24), default="")
    to_state: Mapped[str] = mapped_column(String(24))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
