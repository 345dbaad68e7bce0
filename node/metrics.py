"""Prometheus metrics of one node process, rendered in the Prometheus text format at `/metrics`.

Counters and histograms are updated by the receiver, worker and sender as work happens, so they
start from zero when the process starts. Study, job and outbox counts are read from the index at
each scrape, so they are the same in every process that shares the index.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node.index.models import JobState, OutboxEntry, OutboxState, ReportJob, Study, StudyState
from node.index.session import IndexDatabase

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; a report job on a CPU takes minutes, a C-STORE of an SR well under a second.
_JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_SEND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_MODEL_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class IndexCountsCollector(Collector):
    """Reads the number of studies, report jobs and outbox entries per state at each scrape."""

    def __init__(self, index: IndexDatabase) -> None:
        self.index = index

    def collect(self) -> Iterator[GaugeMetricFamily]:
        studies = GaugeMetricFamily("libra_node_studies", "Studies in the index by state.", labels=["state"])
        jobs = GaugeMetricFamily("libra_node_report_jobs", "Report jobs by state (queue depth: queued).", labels=["state"])
        outbox = GaugeMetricFamily(
            "libra_node_outbox_entries", "SR deliveries by state (queue depth: pending).", labels=["state"]
        )
        try:
            with self.index.transaction() as session:
                study_counts = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
                job_counts = dict(session.execute(select(ReportJob.state, func.count()).group_by(ReportJob.state)).all())
                outbox_counts = dict(
                    session.execute(select(OutboxEntry.state, func.count()).group_by(OutboxEntry.state)).all()
                )
        except Exception as exc:  # noqa: BLE001 - the process metrics are still served; logged
            log.warning("metrics.index_query_failed", exc_info=exc)
            return
        for family, states, counts in (
            (studies, StudyState, study_counts),
            (jobs, JobState, job_counts),
            (outbox, OutboxState, outbox_counts),
        ):
            for state in states:
                family.add_metric([state.value], counts.get(state, 0))
            yield family


class NodeMetrics:
    """The metrics of one node process, in a registry of their own.

    Each `NodeService` has its own registry, so several nodes in one process (as in the tests)
    never mix their numbers.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances_received = Counter(
            "libra_node_instances_received",
            "Instances stored and indexed (C-STORE answered with Success).",
            registry=self.registry,
        )
        self.instances_rejected = Counter(
            "libra_node_instances_rejected",
            "C-STORE requests answered with a failure status, by status name.",
            ["reason"],
            registry=self.registry,
        )
        self.associations_rejected = Counter(
            "libra_node_associations_rejected",
            "Association requests rejected, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.study_outcomes = Counter(
            "libra_node_study_outcomes",
            "Studies that reached an outcome in this process: sent, skipped or failed.",
            ["outcome"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "libra_node_report_job_seconds",
            "Time from claiming a report job to its end, by outcome (done, retry, failed).",
            ["outcome"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.model_seconds = Histogram(
            "libra_node_model_seconds",
            "Time the Libra model took for one report (vision tower, prefill and decoding).",
            buckets=_MODEL_BUCKETS,
            registry=self.registry,
        )
        self.send_seconds = Histogram(
            "libra_node_send_seconds",
            "Time of one C-STORE attempt of an SR, association included, by destination and outcome.",
            ["destination", "outcome"],
            buckets=_SEND_BUCKETS,
            registry=self.registry,
        )

    def add_index_counts(self, index: IndexDatabase) -> None:
        """Report study, job and outbox counts from `index` at each scrape."""
        self.registry.register(IndexCountsCollector(index))

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)

