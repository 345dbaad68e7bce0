"""Prior retrieval: find the patient's most recent earlier chest study at PACS and fetch its frontal image.

The worker calls `PriorRetriever.search` when the index contains no prior study. Each
`[[query_sources]]` entry is queried for the patient's earlier studies (`node.prior_query`).
The most recent earlier study whose series and images pass the routing rules (a chest study
with a frontal image) is chosen, across all sources. Only that image
is retrieved, with C-MOVE to the node's own AE title or with C-GET. It is indexed like any
received instance, in a study marked as retrieved that never gets a report. A source that
fails or does not respond within its timeouts is logged, and the search goes on without it.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from node.config import NodeConfig, QuerySourceSettings, RetrieveMethod
from node.dimse_status import DimseStatus, QueryRetrieveStatus, query_retrieve_status_name
from node.index.models import Study, StudyState
from node.index.records import create_retrieval_placeholder, find_instance, record_retrieval_failed
from node.index.session import IndexDatabase
from node.ingest import ACCEPTED_TRANSFER_SYNTAXES, InstanceIngest, status_with_comment
from node.prior_query import (
    FrontalImage,
    PriorCandidate,
    PriorSearchRequest,
    find_candidates,
    find_frontal_image,
    new_identifier,
)
from node.priors import study_datetime
from node.query_retrieve import (
    FIND_MODEL,
    GET_MODEL,
    MOVE_MODEL,
    Deadline,
    QueryRetrieveError,
    QuerySourceClient,
    RetrieveResult,
    release,
)
from node.stability import route_retrieved_prior
from node.store import FileStore
from node.tls import peer_context

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _QueryConnection:
    """An open query association with one source and the time left for its queries."""

    client: QuerySourceClient
    assoc: Association
    deadline: Deadline


@dataclass(frozen=True)
class PriorSearchResult:
    """The outcome of a search: the retrieved study, if any, and the sources that failed."""

    retrieved_study_instance_uid: str | None = None
    failed_ae_titles: tuple[str, ...] = ()


class PriorRetriever:
    """Searches the configured query sources for a prior study and retrieves its frontal image.

    Parameters
    ----------
    config
        The node configuration: query sources, routing rules, `max_prior_age_days`.
    index, store
        Where a retrieved image is indexed and stored.
    hash_key
        The key of the patient hashes, for instances stored from a C-GET.
    actor
        The actor named in audit rows, for example the worker id.
    """

    def __init__(self, config: NodeConfig, index: IndexDatabase, store: FileStore, hash_key: bytes, actor: str) -> None:
        self.config = config
        self.index = index
        self.store = store
        self.actor = actor
        self.modalities = sorted({modality.upper() for modality in config.routing.modalities})
        self.ingest = InstanceIngest(config, store, index, hash_key, actor=actor, event_stage="prior_retrieval")
        for source in config.query_sources:
            if source.tls:
                # Built once here so that a missing or invalid file stops the node at start.
                peer_context(source)

    # -- search ------------------------------------------------------------------------------

    def search(self, request: PriorSearchRequest) -> PriorSearchResult:
        """Query every source, retrieve the frontal image of the best prior, and index it.

        A source that fails or times out is logged and does not raise. The result names the
        retrieved study, or None when no source had a usable earlier study, and the AE titles
        of the sources whose query or retrieve failed or timed out.
        """
        current_time = study_datetime(request.study_date, request.study_time)
        if current_time is None or not request.patient_id:
            log.info("prior_retrieval.skipped", reason="the current study has no valid Study Date or no Patient ID")
            return PriorSearchResult()
        earliest = current_time - dt.timedelta(days=self.config.node.max_prior_age_days)

        failed: dict[str, str] = {}
        connections: dict[str, _QueryConnection] = {}
        try:
            candidates = self._query_studies(request, earliest, connections, failed)
            retrieved = self._retrieve_most_recent(candidates, request, connections, failed)
        finally:
            for connection in connections.values():
                release(connection.assoc)
        if retrieved is None:
            log.info("prior_retrieval.no_prior_found", failed_query_sources=sorted(failed))
        return PriorSearchResult(retrieved, tuple(failed.values()))

    def _query_studies(
        self,
        request: PriorSearchRequest,
        earliest: dt.datetime,
        connections: dict[str, _QueryConnection],
        failed: dict[str, str],
    ) -> list[PriorCandidate]:
        """Query every source at STUDY level; keep each association open for the series and image queries."""
        candidates: list[PriorCandidate] = []
        for source in self.config.query_sources:
            client = QuerySourceClient(source, self.config.node.ae_title)
            deadline = Deadline(source.query_timeout_seconds)
            try:
                assoc = client.associate([(FIND_MODEL, None)], deadline)
                connections[source.name] = _QueryConnection(client, assoc, deadline)
                candidates += find_candidates(client, assoc, deadline, request, earliest, self.modalities)
            except QueryRetrieveError as exc:
                self._log_source_failed(source, "query", exc)
                failed[source.name] = source.ae_title
        return candidates

    def _retrieve_most_recent(
        self,
        candidates: list[PriorCandidate],
        request: PriorSearchRequest,
        connections: dict[str, _QueryConnection],
        failed: dict[str, str],
    ) -> str | None:
        """Retrieve the newest candidate with a frontal image; return its study UID or None."""
        for candidate in self._most_recent_first(candidates):
            source = candidate.source
            if source.name in failed:
                continue
            if self._is_indexed(candidate.study_instance_uid):
                log.info(
                    "prior_retrieval.candidate_skipped",
                    candidate_study_instance_uid=candidate.study_instance_uid,
                    reason="the study is already in the index, where the prior lookup did not use it",
                )
                continue
            connection = connections[source.name]
            try:
                frontal = find_frontal_image(
                    connection.client, connection.assoc, connection.deadline, candidate, self.config.routing
                )
            except QueryRetrieveError as exc:
                self._log_source_failed(source, "query", exc)
                failed[source.name] = source.ae_title
                continue
            if frontal is None:
                continue

            for open_connection in connections.values():
                release(open_connection.assoc)
            try:
                self._retrieve(candidate, frontal, request)
            except QueryRetrieveError as exc:
                self._log_source_failed(source, "retrieve", exc)
                failed[source.name] = source.ae_title
                return None
            return candidate.study_instance_uid
        return None

    @staticmethod
    def _most_recent_first(candidates: list[PriorCandidate]) -> list[PriorCandidate]:
        """Sort by Study Date and Time, newest first; a study found at two sources keeps the first."""
        seen: set[str] = set()
        ordered = []
        for candidate in sorted(candidates, key=lambda item: item.study_datetime, reverse=True):
            if candidate.study_instance_uid not in seen:
                seen.add(candidate.study_instance_uid)
                ordered.append(candidate)
        return ordered

    def _is_indexed(self, study_instance_uid: str) -> bool:
        with self.index.transaction() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).first()
            return study is not None and study.instance_count > 0

    def _log_source_failed(self, source: QuerySourceSettings, stage: str, error: QueryRetrieveError) -> None:
        log.warning(
            "prior_retrieval.source_failed",
            query_source=source.name,
            ae_title=source.ae_title,
            stage=stage,
            timed_out=error.timed_out,
            reason=str(error),
        )

    # -- retrieve ----------------------------------------------------------------------------

    def _retrieve(self, candidate: PriorCandidate, frontal: FrontalImage, request: PriorSearchRequest) -> None:
        """Retrieve the frontal image into the index and route its study as a retrieved prior.

        The placeholder row is written first, so the stable timer never finds the study
        unmarked. When the image does not arrive, the row stays and records why.

        Raises
        ------
        QueryRetrieveError
            When the retrieve fails, times out, or the image is not in the index afterwards.
        """
        source = candidate.source
        started = time.monotonic()
        self._write_placeholder(candidate, request)
        try:
            result = self._send_retrieve(source, frontal, candidate.study_instance_uid)
            self._check_retrieve_result(source, result)
            self._route_retrieved_study(candidate, frontal, request, result)
        except QueryRetrieveError as exc:
            with self.index.transaction() as session:
                record_retrieval_failed(session, candidate.study_instance_uid, str(exc), self.actor)
            raise
        log.info(
            "prior_retrieval.prior_retrieved",
            prior_study_instance_uid=candidate.study_instance_uid,
            sop_instance_uid=frontal.sop_instance_uid,
            query_source=source.name,
            retrieve_method=source.retrieve_method.value,
            frontal_reason=frontal.frontal_reason,
            retrieve_seconds=round(time.monotonic() - started, 3),
        )

    def _write_placeholder(self, candidate: PriorCandidate, request: PriorSearchRequest) -> None:
        """Write the prior's study row before the retrieve, or reuse the row of a concurrent job."""

        def write() -> None:
            with self.index.transaction() as session:
                create_retrieval_placeholder(
                    session, candidate.study_instance_uid, request.patient_fk, candidate.source.ae_title, self.actor
                )

        try:
            write()
        except IntegrityError:
            # Another job inserted the row between this job's lookup and insert, so the
            # second attempt finds the row and reuses it.
            # NOTE: no test provokes this race, which needs two jobs inserting the row at once.
            write()

    def _send_retrieve(self, source: QuerySourceSettings, frontal: FrontalImage, study_instance_uid: str) -> RetrieveResult:
        client = QuerySourceClient(source, self.config.node.ae_title)
        deadline = Deadline(source.retrieve_timeout_seconds)
        identifier = new_identifier("IMAGE")
        identifier.StudyInstanceUID = study_instance_uid
        identifier.SeriesInstanceUID = frontal.series_instance_uid
        identifier.SOPInstanceUID = frontal.sop_instance_uid

        if source.retrieve_method is RetrieveMethod.MOVE:
            assoc = client.associate([(MOVE_MODEL, None)], deadline)
            try:
                return client.move(assoc, identifier, self.config.node.ae_title, deadline)
            finally:
                release(assoc)

        # One presentation context per transfer syntax, so that the PACS can send the image
        # as it is stored instead of converting it.
        storage_contexts = [(frontal.sop_class_uid, [syntax]) for syntax in ACCEPTED_TRANSFER_SYNTAXES]
        assoc = client.associate(
            [(GET_MODEL, None), *storage_contexts],
            deadline,
            scp_role_sop_classes=[frontal.sop_class_uid],
            store_handler=lambda event: self._on_get_store(event, source),
        )
        try:
            if not any(context.abstract_syntax == frontal.sop_class_uid and context.as_scp for context in assoc.accepted_contexts):
                raise QueryRetrieveError(
                    f"{client.peer} did not accept the node as Storage SCP for SOP class {frontal.sop_class_uid} "
                    "(SCP/SCU role selection), so C-GET cannot deliver the image"
                )
            return client.get(assoc, identifier, deadline)
        finally:
            release(assoc)

    def _on_get_store(self, event: evt.Event, source: QuerySourceSettings) -> int | Dataset:
        """Store one C-STORE sub-operation of a C-GET through the same code as the receiver.

        Returns the statuses of `InstanceIngest.store_file`, or PROCESSING_FAILURE (0x0110)
        when the received data set cannot be written to the incoming folder.
        """
        request = event.request
        temporary_path = self.store.new_temporary_path(".dcm")
        try:
            try:
                received_path = Path(event.dataset_path)
            except AttributeError:
                temporary_path.write_bytes(event.encoded_dataset())
            else:
                # The receiver (when it runs in this process) lets pynetdicom write data sets
                # to files, which may lie outside the store's incoming folder.
                shutil.copyfile(received_path, temporary_path)
            outcome = self.ingest.store_file(
                temporary_path,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                calling_ae_title=source.ae_title,
                peer_host=source.host,
            )
        except OSError as exc:
            log.error(
                "prior_retrieval.store_failed",
                exc_info=exc,
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                query_source=source.name,
            )
            return status_with_comment(DimseStatus.PROCESSING_FAILURE, f"write failed: {type(exc).__name__}")
        finally:
            temporary_path.unlink(missing_ok=True)
        return outcome.response()

    def _check_retrieve_result(self, source: QuerySourceSettings, result: RetrieveResult) -> None:
        method = "C-MOVE" if source.retrieve_method is RetrieveMethod.MOVE else "C-GET"
        peer = f"{source.ae_title}@{source.host}:{source.port}"
        if result.status == QueryRetrieveStatus.SUCCESS and result.failed == 0:
            return
        if result.status == QueryRetrieveStatus.MOVE_DESTINATION_UNKNOWN:
            raise QueryRetrieveError(
                f"{peer} does not know the move destination {self.config.node.ae_title}: register the node's AE "
                "title, host and port on the PACS (see 'Prior retrieval from PACS' in docs/operations.md)",
                status=result.status,
            )
        hint = ""
        if source.retrieve_method is RetrieveMethod.MOVE:
            hint = (
                f"; check that the PACS has {self.config.node.ae_title} with the node's host and port as a move "
                "destination and can connect to it"
            )
        raise QueryRetrieveError(
            f"{method} from {peer} ended with status 0x{result.status:04X} ({query_retrieve_status_name(result.status)}): "
            f"{result.completed} sub-operations completed, {result.failed} failed{hint}",
            status=result.status,
        )

    def _route_retrieved_study(
        self, candidate: PriorCandidate, frontal: FrontalImage, request: PriorSearchRequest, result: RetrieveResult
    ) -> None:
        """Route the retrieved study at once, so the prior lookup can use it in this job."""
        with self.index.transaction() as session:
            instance = find_instance(session, frontal.sop_instance_uid)
            if instance is None:
                raise QueryRetrieveError(
                    f"the retrieve from {candidate.source.ae_title} ended with status 0x{result.status:04X} and "
                    f"{result.completed} completed sub-operations, but image {frontal.sop_instance_uid} is not in the "
                    "index; check the node's log for a rejected C-STORE"
                )
            query = select(Study).where(Study.id == instance.series.study_fk)
            if not self.index.is_sqlite:
                query = query.with_for_update()
            study = session.scalars(query).one()
            if study.patient_fk != request.patient_fk:
                log.warning(
                    "prior_retrieval.patient_mismatch",
                    prior_study_instance_uid=study.study_instance_uid,
                    patient_hash=request.patient_hash,
                    reason="the retrieved image has another Patient ID or Issuer of Patient ID; it is not used",
                )
            # The stable timer may have routed the study already.
            if study.state == StudyState.RECEIVING:
                route_retrieved_prior(session, study, self.config.routing, self.actor)
