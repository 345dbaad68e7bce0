"""Worker: claims report jobs, runs Libra on the current and prior frontal images, writes the SR.

Each job is a database row claimed under a lease, which a heartbeat extends while the model
runs. When a worker crashes, its lease expires and another claim picks the job up again. The SR
files, their index rows, one outbox entry per destination and the job's completion are
committed in one transaction, so a crash never leaves a half-reported study. A job that
fails `max_attempts` times is marked failed with its error and stays visible. When the index
contains no prior study and query sources are configured, the job first searches them
(`node.prior_retrieval`). A failing source costs at most its timeouts, and the job goes on
without a prior.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import structlog
from pydicom.uid import generate_uid
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

import node
from node.config import NodeConfig, SRClass
from node.index.models import (
    Instance,
    JobState,
    OutboxEntry,
    OutboxState,
    ReportJob,
    Series,
    StructuredReport,
    StudyState,
    utc_now,
)
from node.index.leases import is_dead_local_owner, lease_owner_name
from node.index.session import IndexDatabase, record_audit
from node.log_config import bind_patient_identifiers, patient_identifiers_redacted, redact_patient_identifiers
from node.metrics import NodeMetrics
from node.log_config import load_or_create_hash_key
from node.prior_query import PriorSearchRequest
from node.prior_retrieval import PriorRetriever
from node.priors import find_prior_study
from node.sr_builder import DeviceIdentity, DraftReport, SRDocumentClass, build_draft_sr
from node.store import FileStore

if TYPE_CHECKING:
    from libra_model.report_generator import GeneratedReport, ReportRequest

log = structlog.get_logger(__name__)

DEMO_CHECKPOINT_FOLDER = "models/libra-tiny-demo"
EMPTY_FINDINGS_TEXT = "[The model returned no findings text.]"

# DICOM text values (PS3.5 6.1.3) allow no control characters other than TAB, LF, FF and CR.
_ALLOWED_CONTROL_CHARACTERS = {"\t", "\n", "\f", "\r"}


def clean_findings_text(text: str) -> tuple[str, int]:
    """Remove the control characters that DICOM text values forbid; return the text and how many.

    A model can emit any character through byte-fallback tokens, so its output is cleaned
    before it reaches the SR. Text that is empty afterwards is replaced by a statement.
    """
    kept = [
        character
        for character in text
        if character in _ALLOWED_CONTROL_CHARACTERS
        or not (ord(character) < 0x20 or 0x7F <= ord(character) <= 0x9F)
    ]
    cleaned = "".join(kept).strip()
    return cleaned or EMPTY_FINDINGS_TEXT, len(text) - len(kept)


@dataclass(frozen=True)
class ReportInputs:
    """The files a job reads, resolved from the index before the model runs."""

    job_id: int
    study_instance_uid: str
    current_frontal_path: Path
    current_evidence_paths: tuple[Path, ...]
    prior_study_instance_uid: str | None
    prior_frontal_path: Path | None
    predecessor_paths: dict[str, Path]
    prior_retrieved_from: str | None = None
    failed_prior_query_ae_titles: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedJob:
    """A claimed job with its frontal images read, ready for the model."""

    inputs: ReportInputs
    current_frontal: pydicom.Dataset
    prior_frontal: pydicom.Dataset | None
    request: ReportRequest


def load_or_create_device_uid(data_dir: Path) -> str:
    """Return this installation's device UID (the SR observer), created on first use."""
    path = data_dir / "device_uid"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    uid = generate_uid()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process of this installation created it a moment ago.
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as uid_file:
        uid_file.write(uid + "\n")
    return uid


def resolve_model_path(config: NodeConfig) -> Path:
    """Return the Libra checkpoint folder: the configured one, or the demo checkpoint (built if missing)."""
    if config.model.path:
        return Path(config.model.path)
    from libra_model.tiny import build_tiny_checkpoint

    folder = config.node.data_dir / DEMO_CHECKPOINT_FOLDER
    log.warning(
        "worker.demo_checkpoint_used",
        path=str(folder),
        reason="[model] path is empty, so the drafts come from random weights and are meaningless; "
        "set it to a released Libra checkpoint folder",
    )
    if not (folder / "config.json").exists():
        log.info("worker.demo_checkpoint_building", path=str(folder))
        build_tiny_checkpoint(folder)
    return folder


class Worker:
    """A thread that runs report jobs, in batches of those ready together, with a model loaded once.

    Parameters
    ----------
    config, index, store
        The node configuration, index and file store.
    worker_id
        The lease owner name written to claimed rows; host and process id by default.
    metrics
        Where job and model times and failed studies are recorded.
    hash_key
        The key of patient hashes, for priors retrieved with C-GET; read from `data_dir`
        when None.
    """

    def __init__(
        self,
        config: NodeConfig,
        index: IndexDatabase,
        store: FileStore,
        worker_id: str | None = None,
        on_outbox_added: Callable[[], None] | None = None,
        metrics: NodeMetrics | None = None,
        hash_key: bytes | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or NodeMetrics()
        self.index = index
        self.store = store
        self.worker_id = worker_id or lease_owner_name("worker")
        self.prior_retriever = None
        if config.query_sources:
            hash_key = hash_key if hash_key is not None else load_or_create_hash_key(config.node.data_dir)
            self.prior_retriever = PriorRetriever(config, index, store, hash_key, actor=self.worker_id)
        self.generator = None
        self.device = DeviceIdentity(
            device_uid=load_or_create_device_uid(config.node.data_dir),
            node_name="libra-node",
            node_version=node.__version__,
            manufacturer=config.report.manufacturer,
            institution_name=config.report.institution_name or None,
        )
        self.on_outbox_added = on_outbox_added
        self._batch_started: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.model_loaded = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def load_model(self) -> None:
        """Load the report generator once; later jobs reuse it."""
        if self.generator is not None:
            return
        import transformers

        from libra_model import ReportGenerator

        # Progress bars would interleave with the JSON log lines on standard error.
        transformers.utils.logging.disable_progress_bar()
        model_path = resolve_model_path(self.config)
        started = time.monotonic()
        self.generator = ReportGenerator.from_pretrained(
            model_path,
            vision_tower_dir=self.config.model.vision_tower_path or None,
            device=self.config.model.device,
            dtype=self.config.model.dtype,
            dicom_conversion=self.config.model.dicom_conversion,
            feature_cache_size=self.config.model.feature_cache_size,
            feature_cache_dir=self._feature_cache_dir(),
        )
        self.model_loaded.set()
        log.info("worker.model_loaded", model_path=str(model_path), load_seconds=round(time.monotonic() - started, 3))

    def _feature_cache_dir(self) -> Path | None:
        folder = self.config.model.feature_cache_dir
        if not folder:
            return None
        path = Path(folder)
        return path if path.is_absolute() else self.config.node.data_dir / path

    def start(self) -> None:
        """Load the model and start claiming jobs in a background thread."""
        self.release_dead_claims()
        self._thread = threading.Thread(target=self._run, name="libra-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 60.0) -> None:
        """Ask the thread to stop after the job in hand, and wait for it.

        A job still running after `timeout_seconds` is released (back to queued), so that
        no row stays claimed by a process that is exiting.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
            if self._thread.is_alive():
                self.release_claims()

    def wake(self) -> None:
        """Look for queued jobs now instead of at the next poll."""
        self._wake.set()

    def release_claims(self) -> int:
        """Return every job this worker holds to the queue; return how many were released."""
        return self._release(lambda owner: owner == self.worker_id, "worker stopping; job released")

    def release_dead_claims(self) -> int:
        """Return the jobs of crashed workers on this host to the queue without waiting for their leases."""
        return self._release(lambda owner: is_dead_local_owner(owner, "worker"), "lease owner is no longer running")

    def _release(self, owner_matches, reason: str) -> int:
        with self.index.transaction() as session:
            running = session.scalars(select(ReportJob).where(ReportJob.state == JobState.RUNNING)).all()
            jobs = [job for job in running if owner_matches(job.lease_owner)]
            for job in jobs:
                job.state = JobState.QUEUED
                job.lease_expires_at = None
                if job.study.state == StudyState.RUNNING:
                    job.study.state = StudyState.QUEUED
                    record_audit(
                        session,
                        entity="study",
                        entity_id=job.study.id,
                        from_state=StudyState.RUNNING.value,
                        to_state=StudyState.QUEUED.value,
                        actor=self.worker_id,
                        reason=f"worker stopping; job {job.id} released",
                        study_instance_uid=job.study.study_instance_uid,
                    )
                record_audit(
                    session,
                    entity="job",
                    entity_id=job.id,
                    from_state=JobState.RUNNING.value,
                    to_state=JobState.QUEUED.value,
                    actor=self.worker_id,
                    reason=f"{reason} ({job.lease_owner})",
                    study_instance_uid=job.study.study_instance_uid,
                )
                log.warning("worker.job_released", job_id=job.id, study_instance_uid=job.study.study_instance_uid, reason=reason)
                job.lease_owner = ""
            return len(jobs)

    def _run(self) -> None:
        try:
            self.load_model()
        except Exception as exc:  # noqa: BLE001 - logged; the node keeps receiving
            log.error("worker.model_load_failed", exc_info=exc)
            return
        while not self._stop.is_set():
            try:
                handled = self.run_once()
            except Exception as exc:  # noqa: BLE001 - the loop must survive database hiccups
                log.error("worker.loop_failed", exc_info=exc)
                handled = False
            if not handled:
                self._wake.wait(self.config.worker.poll_seconds)
                self._wake.clear()

    # -- one job -----------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim the jobs that are ready, up to one batch, and run them; return False when none was ready.

        A batch contains at most `worker.max_batch_size` jobs, and fewer when the generator
        estimates that the device has room for fewer.
        """
        limit = 1
        if self.generator is not None:
            limit = self.generator.batch_capacity(self.config.worker.max_batch_size, self.config.model.max_new_tokens)
        job_ids = self._claim_jobs(limit)
        if not job_ids:
            return False
        heartbeat_stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job_ids, heartbeat_stop), daemon=True)
        heartbeat.start()
        self._batch_started = time.monotonic()
        try:
            # The identifiers of every job in the batch are replaced in this thread's log lines.
            with patient_identifiers_redacted():
                self._run_jobs(job_ids)
        finally:
            heartbeat_stop.set()
            heartbeat.join()
        return True

    @contextlib.contextmanager
    def _job_log_context(self, job_id: int) -> Iterator[None]:
        """Bind the job id to log lines; `_resolve_inputs` adds the study's UID."""
        structlog.contextvars.bind_contextvars(job_id=job_id)
        try:
            yield
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "study_instance_uid")

    def _run_jobs(self, job_ids: list[int]) -> None:
        """Read each job's images, generate the reports as one batch, then write and commit each SR.

        A failure in one job's inputs or SR fails that job only. A failed batch is retried one
        job at a time, so that one bad job does not fail the others.
        """
        prepared: list[PreparedJob] = []
        for job_id in job_ids:
            with self._job_log_context(job_id):
                try:
                    prepared.append(self._prepare_job(job_id))
                except Exception as exc:  # noqa: BLE001 - recorded on the job row and logged
                    self._fail_job(job_id, exc)
        if not prepared:
            return

        max_new_tokens = self.config.model.max_new_tokens
        reports: list[GeneratedReport | None]
        try:
            reports = list(self.generator.generate_batch([job.request for job in prepared], max_new_tokens=max_new_tokens))
        except Exception as exc:  # noqa: BLE001 - retried per job below, where each failure is recorded
            if len(prepared) == 1:
                with self._job_log_context(prepared[0].inputs.job_id):
                    self._fail_job(prepared[0].inputs.job_id, exc)
                return
            log.warning("worker.batch_failed", job_ids=[job.inputs.job_id for job in prepared], exc_info=exc)
            reports = []
            for job in prepared:
                with self._job_log_context(job.inputs.job_id):
                    try:
                        reports.append(self.generator.generate_batch([job.request], max_new_tokens=max_new_tokens)[0])
                    except Exception as single_exc:  # noqa: BLE001 - recorded on the job row and logged
                        self._fail_job(job.inputs.job_id, single_exc)
                        reports.append(None)

        for job, generated in zip(prepared, reports):
            if generated is None:
                continue
            with self._job_log_context(job.inputs.job_id):
                structlog.contextvars.bind_contextvars(study_instance_uid=job.inputs.study_instance_uid)
                try:
                    self._finish_job(job, generated)
                except Exception as exc:  # noqa: BLE001 - recorded on the job row and logged
                    self._fail_job(job.inputs.job_id, exc)

    def _claim_jobs(self, limit: int) -> list[int]:
        """Claim up to `limit` ready jobs, oldest first, in one transaction; return their ids."""
        now = utc_now()
        with self.index.transaction() as session:
            query = (
                select(ReportJob)
                .where(
                    or_(
                        ReportJob.state == JobState.QUEUED,
                        (ReportJob.state == JobState.RUNNING) & (ReportJob.lease_expires_at < now),
                    )
                )
                .order_by(ReportJob.created_at, ReportJob.id)
                .limit(limit)
            )
            if not self.index.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            jobs = session.scalars(query).all()
            for job in jobs:
                self._claim(session, job, now)
            return [job.id for job in jobs]

    def _claim(self, session: Session, job: ReportJob, now: dt.datetime) -> None:
        previous_state = job.state.value
        reclaimed = job.state == JobState.RUNNING
        job.state = JobState.RUNNING
        job.lease_owner = self.worker_id
        job.lease_expires_at = now + dt.timedelta(seconds=self.config.worker.lease_seconds)
        job.attempts += 1
        job.updated_at = now
        study = job.study
        if study.state == StudyState.QUEUED:
            study.state = StudyState.RUNNING
            record_audit(
                session,
                entity="study",
                entity_id=study.id,
                from_state=StudyState.QUEUED.value,
                to_state=StudyState.RUNNING.value,
                actor=self.worker_id,
                reason=f"job {job.id} claimed",
                study_instance_uid=study.study_instance_uid,
            )
        reason = "lease expired; reclaimed" if reclaimed else "claimed"
        record_audit(
            session,
            entity="job",
            entity_id=job.id,
            from_state=previous_state,
            to_state=job.state.value,
            actor=self.worker_id,
            reason=f"{reason}; attempt {job.attempts}",
            study_instance_uid=study.study_instance_uid,
        )
        log.info(
            "worker.job_claimed",
            job_id=job.id,
            study_instance_uid=study.study_instance_uid,
            attempt=job.attempts,
            reclaimed=reclaimed,
        )

    def _heartbeat(self, job_ids: list[int], stop: threading.Event) -> None:
        interval = self.config.worker.lease_seconds / 3
        while not stop.wait(interval):
            try:
                with self.index.transaction() as session:
                    session.execute(
                        update(ReportJob)
                        .where(ReportJob.id.in_(job_ids), ReportJob.lease_owner == self.worker_id)
                        .values(lease_expires_at=utc_now() + dt.timedelta(seconds=self.config.worker.lease_seconds))
                    )
            except Exception as exc:  # noqa: BLE001 - the next beat retries; logged
                log.warning("worker.heartbeat_failed", exc_info=exc)

    def _resolve_inputs(self, job_id: int) -> ReportInputs:
        """Read the job's images from the index; without a prior there, search the query sources.

        The search runs outside any index transaction: a C-MOVE delivers the prior through
        the receiver, which must be able to write to the index meanwhile. The job's lease
        heartbeat keeps running while the search waits for the PACS.
        """
        inputs, search_request = self._read_inputs(job_id)
        if inputs.prior_frontal_path is not None or self.prior_retriever is None or search_request is None:
            return inputs
        # The query sends the patient's identifiers, so they are bound for redaction first.
        bind_patient_identifiers(pydicom.dcmread(inputs.current_frontal_path, stop_before_pixels=True))
        result = self.prior_retriever.search(search_request)
        if result.retrieved_study_instance_uid is not None:
            inputs, _ = self._read_inputs(job_id)
        return dataclasses.replace(inputs, failed_prior_query_ae_titles=result.failed_ae_titles)

    def _read_inputs(self, job_id: int) -> tuple[ReportInputs, PriorSearchRequest | None]:
        with self.index.transaction() as session:
            job = session.get(ReportJob, job_id)
            study = job.study
            structlog.contextvars.bind_contextvars(study_instance_uid=study.study_instance_uid)
            paths = session.execute(
                select(Instance.sop_instance_uid, Instance.file_path)
                .join(Series, Instance.series_fk == Series.id)
                .where(Series.study_fk == study.id, Instance.removed_at.is_(None))
                .order_by(Instance.id)
            ).all()
            current_by_uid = {uid: self.store.absolute(path) for uid, path in paths}
            if study.frontal_sop_instance_uid not in current_by_uid:
                raise LookupError(f"frontal image {study.frontal_sop_instance_uid} is not in the index")

            prior = find_prior_study(session, study, self.config.node.max_prior_age_days)
            prior_path = None
            search_request = None
            if prior is None and study.patient.patient_id:
                search_request = PriorSearchRequest(
                    study_instance_uid=study.study_instance_uid,
                    patient_fk=study.patient_fk,
                    patient_id=study.patient.patient_id,
                    issuer_of_patient_id=study.patient.issuer_of_patient_id,
                    patient_hash=study.patient.patient_hash,
                    study_date=study.study_date,
                    study_time=study.study_time,
                )
            if prior is not None:
                prior_instance = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == prior.frontal_sop_instance_uid)
                ).first()
                if prior_instance is not None and prior_instance.removed_at is None:
                    prior_path = self.store.absolute(prior_instance.file_path)

            predecessors = {}
            # NOTE: an SR that retention removed is not named as a predecessor, because its
            # file is gone. A re-report after retention therefore has no Predecessor Documents Sequence.
            for report in session.scalars(
                select(StructuredReport)
                .where(StructuredReport.study_fk == study.id, StructuredReport.removed_at.is_(None))
                .order_by(StructuredReport.created_at, StructuredReport.id)
            ):
                predecessors[report.sr_class] = self.store.absolute(report.file_path)
            return ReportInputs(
                job_id=job_id,
                study_instance_uid=study.study_instance_uid,
                current_frontal_path=current_by_uid[study.frontal_sop_instance_uid],
                current_evidence_paths=tuple(current_by_uid.values()),
                prior_study_instance_uid=prior.study_instance_uid if prior_path else None,
                prior_frontal_path=prior_path,
                predecessor_paths=predecessors,
                prior_retrieved_from=prior.retrieved_from if prior_path else None,
            ), search_request

    def _prepare_job(self, job_id: int) -> PreparedJob:
        """Resolve a job's files from the index and read its frontal images."""
        from libra_model.report_generator import ReportRequest

        inputs = self._resolve_inputs(job_id)
        current_frontal = pydicom.dcmread(inputs.current_frontal_path)
        prior_frontal = pydicom.dcmread(inputs.prior_frontal_path) if inputs.prior_frontal_path else None
        bind_patient_identifiers(current_frontal)
        if prior_frontal is not None:
            bind_patient_identifiers(prior_frontal)
        request = ReportRequest(
            current_frontal,
            prior_frontal,
            current_key=str(current_frontal.SOPInstanceUID),
            prior_key=str(prior_frontal.SOPInstanceUID) if prior_frontal is not None else None,
        )
        return PreparedJob(inputs, current_frontal, prior_frontal, request)

    def _finish_job(self, job: PreparedJob, generated: GeneratedReport) -> None:
        """Log the generated report, write its SRs and commit them with the job's completion."""
        inputs, current_frontal, prior_frontal = job.inputs, job.current_frontal, job.prior_frontal
        log.info(
            "worker.report_generated",
            prior_study_instance_uid=inputs.prior_study_instance_uid,
            used_real_prior=generated.used_real_prior,
            prompt_tokens=generated.prompt_tokens,
            generated_tokens=generated.generated_tokens,
            batch_size=generated.batch_size,
            vision_seconds=round(generated.vision_seconds, 4),
            prefill_seconds=round(generated.prefill_seconds, 4),
            decode_seconds=round(generated.decode_seconds, 4),
            model_seconds=round(generated.total_seconds, 4),
        )
        findings_text, removed_characters = clean_findings_text(generated.findings_text)
        if removed_characters:
            log.warning("worker.control_characters_removed", removed_characters=removed_characters)
        self.metrics.model_seconds.observe(generated.total_seconds)
        report = DraftReport(
            findings_text=findings_text,
            model_name=generated.model_name,
            checkpoint_sha256=generated.checkpoint_sha256,
            is_demo_checkpoint=generated.is_demo_checkpoint,
            dicom_conversion=generated.dicom_conversion,
            used_real_prior=generated.used_real_prior,
            prior_retrieved_from=inputs.prior_retrieved_from,
            failed_prior_query_ae_titles=() if inputs.prior_frontal_path else inputs.failed_prior_query_ae_titles,
        )
        current_evidence = [
            current_frontal if path == inputs.current_frontal_path else pydicom.dcmread(path, stop_before_pixels=True)
            for path in inputs.current_evidence_paths
        ]
        # One snapshot of the destinations for the whole job, because a configuration reload
        # may replace self.config between writing the SRs and adding their outbox entries.
        destinations = tuple(self.config.destinations)
        written = self._write_srs(inputs, current_evidence, prior_frontal, report, destinations)
        try:
            self._complete_job(inputs, written, report, destinations)
        except BaseException:
            for _, relative_path, _ in written:
                self.store.remove(relative_path)
            raise
        self._observe_job_seconds("done")

    def _observe_job_seconds(self, outcome: str) -> None:
        """Record a job's time since its batch was claimed, by outcome (done, retry, failed)."""
        if self._batch_started is not None:
            self.metrics.job_seconds.labels(outcome=outcome).observe(time.monotonic() - self._batch_started)

    def _write_srs(self, inputs, current_evidence, prior_frontal, report, destinations):
        """Write one SR file per SR class that the destinations need; return (class, path, dataset)."""
        classes = sorted({destination.sr_class for destination in destinations} or {SRClass.ENHANCED})
        series_instance_uid = generate_uid()
        written = []
        for instance_number, sr_class in enumerate(classes, start=1):
            predecessor_path = inputs.predecessor_paths.get(sr_class.value)
            predecessor = pydicom.dcmread(predecessor_path, stop_before_pixels=True) if predecessor_path else None
            # A fresh header for each SR, because the builder copies a value's bytes only from an
            # element that nothing has decoded yet (decoding replaces bytes that are invalid in
            # the declared character set).
            frontal_header = pydicom.dcmread(inputs.current_frontal_path, stop_before_pixels=True)
            dataset = build_draft_sr(
                current_evidence,
                frontal_header,
                prior_frontal,
                report,
                self.device,
                sr_class=SRDocumentClass(sr_class.value),
                series_instance_uid=series_instance_uid,
                series_number=self.config.report.series_number,
                series_description=self.config.report.series_description,
                sop_instance_uid=generate_uid(),
                instance_number=instance_number,
                predecessor=predecessor,
            )
            temporary_path = self.store.new_temporary_path(".dcm")
            dataset.save_as(temporary_path, enforce_file_format=True)
            relative_path = self.store.relative_path(
                inputs.study_instance_uid, series_instance_uid, str(dataset.SOPInstanceUID)
            )
            self.store.commit_file(temporary_path, relative_path)
            written.append((sr_class, relative_path, dataset))
        return written

    def _complete_job(self, inputs: ReportInputs, written, report: DraftReport, destinations) -> None:
        now = utc_now()
        with self.index.transaction() as session:
            job = session.get(ReportJob, inputs.job_id)
            if job.state != JobState.RUNNING or job.lease_owner != self.worker_id:
                raise RuntimeError(f"job {inputs.job_id} lease was lost to {job.lease_owner}; result discarded")
            study = job.study
            sr_rows = {}
            for sr_class, relative_path, dataset in written:
                predecessor_uid = None
                if "PredecessorDocumentsSequence" in dataset:
                    predecessor_uid = str(
                        dataset.PredecessorDocumentsSequence[0]
                        .ReferencedSeriesSequence[0]
                        .ReferencedSOPSequence[0]
                        .ReferencedSOPInstanceUID
                    )
                row = StructuredReport(
                    sop_instance_uid=str(dataset.SOPInstanceUID),
                    series_instance_uid=str(dataset.SeriesInstanceUID),
                    sop_class_uid=str(dataset.SOPClassUID),
                    sr_class=sr_class.value,
                    study_fk=study.id,
                    job_fk=job.id,
                    prior_study_instance_uid=inputs.prior_study_instance_uid,
                    predecessor_sop_instance_uid=predecessor_uid,
                    file_path=str(relative_path),
                    model_name=report.model_name,
                    checkpoint_sha256=report.checkpoint_sha256,
                    created_at=now,
                )
                session.add(row)
                sr_rows[sr_class] = row
            session.flush()
            for destination in destinations:
                entry = OutboxEntry(
                    structured_report_fk=sr_rows[destination.sr_class].id,
                    destination=destination.name,
                    state=OutboxState.PENDING,
                    next_attempt_at=now,
                )
                session.add(entry)
                session.flush()
                record_audit(
                    session,
                    entity="outbox",
                    entity_id=entry.id,
                    to_state=OutboxState.PENDING.value,
                    actor=self.worker_id,
                    reason=f"SR {sr_rows[destination.sr_class].sop_instance_uid} for {destination.name}",
                    study_instance_uid=study.study_instance_uid,
                )
            job.state = JobState.DONE
            job.lease_owner = ""
            job.lease_expires_at = None
            job.updated_at = now
            record_audit(
                session,
                entity="job",
                entity_id=job.id,
                from_state=JobState.RUNNING.value,
                to_state=JobState.DONE.value,
                actor=self.worker_id,
                study_instance_uid=study.study_instance_uid,
            )
            if study.state == StudyState.RUNNING:
                study.state = StudyState.REPORTED
                study.state_reason = "" if destinations else "no destinations configured"
                record_audit(
                    session,
                    entity="study",
                    entity_id=study.id,
                    from_state=StudyState.RUNNING.value,
                    to_state=StudyState.REPORTED.value,
                    actor=self.worker_id,
                    reason=f"SR written: {', '.join(row.sop_instance_uid for row in sr_rows.values())}",
                    study_instance_uid=study.study_instance_uid,
                )
        for row in sr_rows.values():
            log.info(
                "worker.sr_written",
                sr_sop_instance_uid=row.sop_instance_uid,
                sr_class=row.sr_class,
                prior_study_instance_uid=row.prior_study_instance_uid,
                predecessor_sop_instance_uid=row.predecessor_sop_instance_uid,
            )
        if not destinations:
            log.warning("worker.no_destinations", reason="SR kept in the store; add a [[destinations]] entry")
        elif self.on_outbox_added is not None:
            self.on_outbox_added()

    def _fail_job(self, job_id: int, error: Exception) -> bool:
        """Record a failed attempt; return True when the job failed for good."""
        # Library errors can quote a patient's values; the job row and study reason must not.
        message = redact_patient_identifiers(f"{type(error).__name__}: {error}")
        with self.index.transaction() as session:
            job = session.get(ReportJob, job_id)
            study = job.study
            if job.lease_owner != self.worker_id:
                log.warning("worker.job_lost", error=message)
                return False
            final = job.attempts >= self.config.worker.max_attempts
            job.state = JobState.FAILED if final else JobState.QUEUED
            job.error = message
            job.lease_owner = ""
            job.lease_expires_at = None
            job.updated_at = utc_now()
            record_audit(
                session,
                entity="job",
                entity_id=job.id,
                from_state=JobState.RUNNING.value,
                to_state=job.state.value,
                actor=self.worker_id,
                reason=message,
                study_instance_uid=study.study_instance_uid,
            )
            if final and study.state == StudyState.RUNNING:
                study.state = StudyState.FAILED
                study.state_reason = f"report job failed after {job.attempts} attempts: {message}"
                record_audit(
                    session,
                    entity="study",
                    entity_id=study.id,
                    from_state=StudyState.RUNNING.value,
                    to_state=StudyState.FAILED.value,
                    actor=self.worker_id,
                    reason=study.state_reason,
                    study_instance_uid=study.study_instance_uid,
                )
                self.metrics.study_outcomes.labels(outcome="failed").inc()
            elif not final and study.state == StudyState.RUNNING:
                study.state = StudyState.QUEUED
                record_audit(
                    session,
                    entity="study",
                    entity_id=study.id,
                    from_state=StudyState.RUNNING.value,
                    to_state=StudyState.QUEUED.value,
                    actor=self.worker_id,
                    reason=f"attempt {job.attempts} failed; job {job.id} queued again",
                    study_instance_uid=study.study_instance_uid,
                )
        if final:
            log.error("study.failed", exc_info=error, attempts=job.attempts, reason=message)
        else:
            log.warning("worker.job_retry_scheduled", exc_info=error, attempt=job.attempts)
        self._observe_job_seconds("failed" if final else "retry")
        return final

