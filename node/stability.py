"""Study-stable timer: a study is complete when no instance arrived for `study_stable_seconds`.

The deadline of each study is a column of the index, pushed forward by every instance, so a
restart loses none. An APScheduler job checks for passed deadlines; each stable study is
routed and, when it qualifies, turned into a report job in the same transaction. A study
retrieved from a query source as a prior is routed too but never turned into a job. On
PostgreSQL the study row is locked with SKIP LOCKED, so that exactly one process turns a
study into a job when several receivers share the index.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import NodeConfig, RoutingSettings
from node.index.models import Instance, JobState, ReportJob, Series, Study, StudyState, utc_now
from node.index.session import IndexDatabase, record_audit
from node.metrics import NodeMetrics
from node.routing import RoutedImage, RoutingDecision, route_study

log = structlog.get_logger(__name__)

_BATCH_SIZE = 50


def _routed_images(session: Session, study: Study) -> list[RoutedImage]:
    rows = session.execute(
        select(Instance, Series)
        .join(Series, Instance.series_fk == Series.id)
        .where(Series.study_fk == study.id, Instance.removed_at.is_(None))
    ).all()
    return [
        RoutedImage(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            modality=series.modality,
            body_part_examined=series.body_part_examined,
            series_description=series.series_description,
            view_position=instance.view_position,
            view_code_value=instance.view_code_value,
            view_code_meaning=instance.view_code_meaning,
            image_comments=instance.image_comments,
            instance_number=instance.instance_number,
        )
        for instance, series in rows
    ]


def route_retrieved_prior(session: Session, study: Study, settings: RoutingSettings, actor: str) -> RoutingDecision:
    """Route a study retrieved from a query source: store its frontal image, never queue a job.

    The study ends SKIPPED with a reason that names its source. Its frontal image, when
    routing finds one, makes it usable by the prior lookup.
    """
    decision = route_study(_routed_images(session, study), study.study_description, settings)
    previous_state = study.state.value
    study.stable_deadline = None
    study.frontal_sop_instance_uid = decision.frontal_sop_instance_uid
    study.frontal_reason = decision.frontal_reason
    study.state = StudyState.SKIPPED
    usable = "usable as a prior" if decision.is_reported else f"not usable as a prior: {decision.reason}"
    study.state_reason = f"prior study retrieved from {study.retrieved_from}; never reported; {usable}"
    record_audit(
        session,
        entity="study",
        entity_id=study.id,
        from_state=previous_state,
        to_state=study.state.value,
        actor=actor,
        reason=study.state_reason,
        study_instance_uid=study.study_instance_uid,
    )
    log.info(
        "study.prior_routed",
        study_instance_uid=study.study_instance_uid,
        retrieved_from=study.retrieved_from,
        frontal_sop_instance_uid=decision.frontal_sop_instance_uid,
        reason=decision.reason,
    )
    return decision


class StabilityTimer:
    """Turns studies whose stable deadline has passed into report jobs or skipped studies.

    Parameters
    ----------
    config, index
        The node configuration and index.
    metrics
        Where study outcomes are counted.
    on_jobs_queued
        Called after a check committed at least one new report job, so that a worker in the
        same process starts it without waiting for its next poll.
    """

    def __init__(
        self,
        config: NodeConfig,
        index: IndexDatabase,
        metrics: NodeMetrics | None = None,
        on_jobs_queued: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.metrics = metrics or NodeMetrics()
        self.on_jobs_queued = on_jobs_queued
        self._actor = f"stability:{os.getpid()}"
        self._scheduler: BackgroundScheduler | None = None
        # The periodic check and the deadline checks run in scheduler threads; one at a time.
        self._check_lock = threading.Lock()

    def start(self) -> None:
        """Check deadlines now and then every `stability_check_seconds` in a background thread."""
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(
            self.process_stable_studies,
            "interval",
            seconds=self.config.node.stability_check_seconds,
            max_instances=1,
            coalesce=True,
            next_run_time=utc_now(),
            id="study-stable-check",
        )
        self._scheduler.start()

    def notify_instance_stored(self, study_instance_uid: str) -> None:
        """Schedule a check for the moment the study's new deadline passes.

        The receiver calls this after each committed instance. The periodic check still runs,
        and finds the deadlines of other processes' instances and of studies received before
        a restart.
        """
        scheduler = self._scheduler
        if scheduler is None:
            return
        run_date = utc_now() + dt.timedelta(seconds=self.config.node.study_stable_seconds)
        try:
            scheduler.add_job(
                self.process_stable_studies,
                "date",
                run_date=run_date,
                id=f"study-stable-deadline-{study_instance_uid}",
                replace_existing=True,
                misfire_grace_time=None,
            )
        except Exception as exc:  # noqa: BLE001 - the instance is stored; the periodic check finds the deadline
            log.warning("stability.deadline_check_not_scheduled", study_instance_uid=study_instance_uid, exc_info=exc)

    def stop(self) -> None:
        """Stop the scheduler, waiting for a running check to finish."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    def process_stable_studies(self) -> int:
        """Route every study whose deadline has passed; return how many were processed."""
        processed = 0
        queued = 0
        try:
            with self._check_lock:
                while True:
                    batch, batch_queued = self._process_batch()
                    processed += batch
                    queued += batch_queued
                    if batch < _BATCH_SIZE:
                        break
        except Exception as exc:  # noqa: BLE001 - the scheduler must keep running; logged
            log.error("stability.check_failed", exc_info=exc)
        if queued and self.on_jobs_queued is not None:
            self.on_jobs_queued()
        return processed

    def _process_batch(self) -> tuple[int, int]:
        """Route one batch of stable studies in one transaction; return (studies routed, jobs queued)."""
        with self.index.transaction() as session:
            query = (
                select(Study)
                .where(Study.state == StudyState.RECEIVING, Study.stable_deadline <= utc_now())
                .order_by(Study.stable_deadline)
                .limit(_BATCH_SIZE)
            )
            if not self.index.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            studies = session.scalars(query).all()
            queued = sum(self._route(session, study) for study in studies)
        return len(studies), queued

    def _route(self, session: Session, study: Study) -> bool:
        """Route one study; return True when it was queued for a report."""
        if study.retrieved_from is not None:
            route_retrieved_prior(session, study, self.config.routing, self._actor)
            return False
        decision = route_study(_routed_images(session, study), study.study_description, self.config.routing)
        previous_state = study.state.value
        study.stable_deadline = None
        context = {"study_instance_uid": study.study_instance_uid, "instance_count": study.instance_count}
        if not decision.is_reported:
            study.state = StudyState.SKIPPED
            study.state_reason = decision.reason
            record_audit(
                session,
                entity="study",
                entity_id=study.id,
                from_state=previous_state,
                to_state=study.state.value,
                actor=self._actor,
                reason=decision.reason,
                study_instance_uid=study.study_instance_uid,
            )
            log.info("study.skipped", reason=decision.reason, **context)
            self.metrics.study_outcomes.labels(outcome="skipped").inc()
            return False

        study.frontal_sop_instance_uid = decision.frontal_sop_instance_uid
        study.frontal_reason = decision.frontal_reason
        open_job = session.scalars(
            select(ReportJob).where(ReportJob.study_fk == study.id, ReportJob.state == JobState.QUEUED)
        ).first()
        if open_job is None:
            open_job = ReportJob(study_fk=study.id, state=JobState.QUEUED)
            session.add(open_job)
            session.flush()
            record_audit(
                session,
                entity="job",
                entity_id=open_job.id,
                to_state=JobState.QUEUED.value,
                actor=self._actor,
                reason="study stable",
                study_instance_uid=study.study_instance_uid,
            )
        study.state = StudyState.QUEUED
        study.state_reason = ""
        record_audit(
            session,
            entity="study",
            entity_id=study.id,
            from_state=previous_state,
            to_state=study.state.value,
            actor=self._actor,
            reason=f"stable; frontal image {decision.frontal_sop_instance_uid} by {decision.frontal_reason}",
            study_instance_uid=study.study_instance_uid,
        )
        log.info(
            "study.queued",
            job_id=open_job.id,
            frontal_sop_instance_uid=decision.frontal_sop_instance_uid,
            frontal_reason=decision.frontal_reason,
            **context,
        )
        return True
