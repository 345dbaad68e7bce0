"""Retention: removes old received images and delivered SRs from the store on a schedule.

Promise: a file is removed only after its work is done. The images of a study are removed when
the study is sent (its latest SR reached every destination) or skipped (the routing rules do not
report on it) and its last instance arrived more than `max_age_days` ago. An SR file is removed
when every destination acknowledged it and it was written more than `max_age_days` ago. Images of
studies still receiving, queued, running, reported (SR not yet delivered) or failed are kept.

Index rows stay, with `removed_at` set, so the listings and the audit trail keep the study's
history. Each study whose files were removed gets an audit row.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from node.config import NodeConfig
from node.index.models import Instance, OutboxEntry, OutboxState, Series, StructuredReport, Study, StudyState, utc_now
from node.index.session import IndexDatabase, record_audit
from node.store import FileStore

log = structlog.get_logger(__name__)

_REMOVABLE_STUDY_STATES = (StudyState.SENT, StudyState.SKIPPED)
_IN_PROGRESS_STUDY_STATES = (StudyState.RECEIVING, StudyState.QUEUED, StudyState.RUNNING)
_BATCH_SIZE = 500


@dataclass(frozen=True)
class RetentionResult:
    """The number of studies and files that one retention run removed."""

    studies: int
    instances: int
    structured_reports: int


class Retention:
    """Removes files older than `[retention] max_age_days` on an APScheduler interval."""

    def __init__(self, config: NodeConfig, index: IndexDatabase, store: FileStore) -> None:
        self.config = config
        self.index = index
        self.store = store
        self._actor = f"retention:{os.getpid()}"
        self._scheduler: BackgroundScheduler | None = None

    @property
    def enabled(self) -> bool:
        """Whether a maximum age is configured (0 keeps every file)."""
        return self.config.retention.max_age_days > 0

    def start(self) -> None:
        """Run now and then every `check_interval_seconds` in a background thread, when enabled."""
        if not self.enabled:
            log.info("retention.disabled", reason="[retention] max_age_days is 0; files are kept")
            return
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(
            self._run_logged,
            "interval",
            seconds=self.config.retention.check_interval_seconds,
            max_instances=1,
            coalesce=True,
            next_run_time=utc_now(),
            id="retention",
        )
        self._scheduler.start()
        log.info(
            "retention.started",
            max_age_days=self.config.retention.max_age_days,
            check_interval_seconds=self.config.retention.check_interval_seconds,
        )

    def stop(self) -> None:
        """Stop the scheduler, waiting for a running check to finish."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    def _run_logged(self) -> None:
        try:
            self.run_once()
        except Exception as exc:  # noqa: BLE001 - the scheduler must keep running; logged
            log.error("retention.run_failed", exc_info=exc)

    def run_once(self, now: dt.datetime | None = None) -> RetentionResult:
        """Remove every file past the maximum age at `now` (the current time by default)."""
        now = now or utc_now()
        cutoff = now - dt.timedelta(days=self.config.retention.max_age_days)
        studies: set[str] = set()
        instances = structured_reports = 0
        while True:
            removed = self._remove_batch(cutoff, now)
            studies.update(removed.keys())
            instances += sum(counts[0] for counts in removed.values())
            structured_reports += sum(counts[1] for counts in removed.values())
            if not removed:
                break
        result = RetentionResult(len(studies), instances, structured_reports)
        log.info(
            "retention.run_finished",
            studies=result.studies,
            instances=result.instances,
            structured_reports=result.structured_reports,
            cutoff=cutoff.isoformat(),
        )
        return result

    def _remove_batch(self, cutoff: dt.datetime, now: dt.datetime) -> dict[str, tuple[int, int]]:
        """Mark one batch of files as removed, commit, then delete them; return counts per study."""
        files: list[str] = []
        removed: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        with self.index.transaction() as session:
            instance_query = (
                select(Instance, Study)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .where(
                    Instance.removed_at.is_(None),
                    Instance.received_at < cutoff,
                    Study.state.in_(_REMOVABLE_STUDY_STATES),
                    Study.last_received_at < cutoff,
                )
                .limit(_BATCH_SIZE)
            )
            report_query = (
                select(StructuredReport, Study)
                .join(Study, StructuredReport.study_fk == Study.id)
                .where(
                    StructuredReport.removed_at.is_(None),
                    StructuredReport.created_at < cutoff,
                    # A study in progress may need the SR as the predecessor of its next version.
                    Study.state.not_in(_IN_PROGRESS_STUDY_STATES),
                    # Delivered everywhere: at least one outbox entry, and none that is not sent.
                    StructuredReport.outbox_entries.any(),
                    ~StructuredReport.outbox_entries.any(OutboxEntry.state != OutboxState.SENT),
                )
                .limit(_BATCH_SIZE)
            )
            if not self.index.is_sqlite:
                instance_query = instance_query.with_for_update(of=Study, skip_locked=True)
                report_query = report_query.with_for_update(of=Study, skip_locked=True)
            studies: dict[str, Study] = {}
            for instance, study in session.execute(instance_query).all():
                instance.removed_at = now
                files.append(instance.file_path)
                removed[study.study_instance_uid][0] += 1
                studies[study.study_instance_uid] = study
            for report, study in session.execute(report_query).all():
                report.removed_at = now
                files.append(report.file_path)
                removed[study.study_instance_uid][1] += 1
                studies[study.study_instance_uid] = study
            for study_instance_uid, (instance_count, report_count) in removed.items():
                study = studies[study_instance_uid]
                record_audit(
                    session,
                    entity="study",
                    entity_id=study.id,
                    from_state=study.state.value,
                    to_state=study.state.value,
                    actor=self._actor,
                    reason=(
                        f"retention: removed {instance_count} image file(s) and {report_count} SR file(s) "
                        f"older than {self.config.retention.max_age_days:g} days"
                    ),
                    study_instance_uid=study_instance_uid,
                )
        # NOTE: the files are deleted after the commit, so a crash between the two leaves files
        # that the index marks as removed. No later run looks for them again.
        for relative_path in files:
            self._delete(relative_path)
        for study_instance_uid, (instance_count, report_count) in removed.items():
            log.info(
                "retention.files_removed",
                study_instance_uid=study_instance_uid,
                instances=instance_count,
                structured_reports=report_count,
            )
        return {uid: (counts[0], counts[1]) for uid, counts in removed.items()}

    def _delete(self, relative_path: str) -> None:
        path = self.store.absolute(relative_path)
        try:
            path.unlink()
        except FileNotFoundError:
            log.warning("retention.file_missing", file_path=relative_path)
            return
        except OSError as exc:
            log.error("retention.delete_failed", file_path=relative_path, exc_info=exc)
            return
        self._remove_empty_folders(path.parent)

    def _remove_empty_folders(self, folder: Path) -> None:
        """Remove the series and study folders once they are empty."""
        for candidate in (folder, folder.parent):
            if candidate == self.store.root or self.store.root not in candidate.parents:
                return
            try:
                candidate.rmdir()
            except OSError:
                return
