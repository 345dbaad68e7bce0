"""Query/Retrieve SCU: associations, C-FIND, C-MOVE and C-GET towards one query source.

`check_query_source` checks that a source allows the node's requests, for `libra-node ae
test-query`.

Each request runs under a `Deadline`. The association request, the TCP connection and every
wait for a response are bounded by the time left, so a PACS that does not respond costs at
most that time. Failures raise `QueryRetrieveError`, whose message names the source, the
request and the cause.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from node.config import QuerySourceSettings, RetrieveMethod
from node.dimse_status import DimseStatus, QueryRetrieveStatus, query_retrieve_status_name
from node.ingest import ACCEPTED_STORAGE_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
from node.tls import TLSConfigError, peer_context

PENDING_STATUSES = frozenset({QueryRetrieveStatus.PENDING, QueryRetrieveStatus.PENDING_WITH_WARNING})

FIND_MODEL = StudyRootQueryRetrieveInformationModelFind
MOVE_MODEL = StudyRootQueryRetrieveInformationModelMove
GET_MODEL = StudyRootQueryRetrieveInformationModelGet


class QueryRetrieveError(RuntimeError):
    """A query source rejected or failed a request, or did not respond in time.

    Attributes
    ----------
    status
        The response status when the source sent one, else None.
    timed_out
        Whether the request ran out of its time budget.
    """

    def __init__(self, message: str, status: int | None = None, timed_out: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.timed_out = timed_out


class Deadline:
    """A time budget in seconds on the monotonic clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._expires_at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Return the seconds left, at least 0."""
        return max(self._expires_at - time.monotonic(), 0.0)

    @property
    def expired(self) -> bool:
        """Whether no time is left."""
        return self.remaining() <= 0.0


@dataclass(frozen=True)
class RetrieveResult:
    """The final response of a C-MOVE or C-GET: its status and sub-operation counts."""

    status: int
    completed: int
    failed: int
    warning: int


class QuerySourceClient:
    """Opens associations with one query source and sends Study Root requests on them.

    Parameters
    ----------
    source
        The `[[query_sources]]` entry: AE title, host and port of the PACS.
    calling_ae_title
        The node's own AE title, which the PACS must know.
    """

    def __init__(self, source: QuerySourceSettings, calling_ae_title: str) -> None:
        self.source = source
        self.calling_ae_title = calling_ae_title

    @property
    def peer(self) -> str:
        """The source as AE@HOST:PORT, for messages."""
        return f"{self.source.ae_title}@{self.source.host}:{self.source.port}"

    def associate(
        self,
        contexts: Sequence[tuple[str, Sequence[str] | None]],
        deadline: Deadline,
        scp_role_sop_classes: Sequence[str] = (),
        store_handler: Callable[[evt.Event], object] | None = None,
    ) -> Association:
        """Request an association with the given presentation contexts.

        Parameters
        ----------
        contexts
            (abstract syntax, transfer syntaxes) pairs; None proposes pynetdicom's defaults.
        deadline
            Bounds the TCP connection and the wait for A-ASSOCIATE-AC or A-ASSOCIATE-RJ.
        scp_role_sop_classes
            Storage SOP classes for which the node proposes the SCP role (C-GET).
        store_handler
            The EVT_C_STORE handler for C-STORE sub-operations on this association (C-GET).

        Raises
        ------
        QueryRetrieveError
            When the source rejects the association, refuses the connection or does not respond.
        """
        if deadline.expired:
            raise QueryRetrieveError(f"no time left to associate with {self.peer}", timed_out=True)
        ae = AE(ae_title=self.calling_ae_title)
        for abstract_syntax, transfer_syntaxes in contexts:
            if transfer_syntaxes is None:
                ae.add_requested_context(abstract_syntax)
            else:
                ae.add_requested_context(abstract_syntax, list(transfer_syntaxes))
        timeout_seconds = deadline.remaining()
        ae.acse_timeout = timeout_seconds
        ae.dimse_timeout = timeout_seconds
        ae.network_timeout = timeout_seconds
        ae.connection_timeout = timeout_seconds
        roles = [build_role(sop_class_uid, scp_role=True) for sop_class_uid in scp_role_sop_classes]
        handlers = [(evt.EVT_C_STORE, store_handler)] if store_handler is not None else []
        tls_context = None
        if self.source.tls:
            try:
                tls_context = peer_context(self.source)
            except TLSConfigError as exc:
                raise QueryRetrieveError(f"TLS configuration invalid: {exc}") from exc
        assoc = ae.associate(
            self.source.host,
            self.source.port,
            ae_title=self.source.ae_title,
            ext_neg=roles or None,
            evt_handlers=handlers or None,
            tls_args=(tls_context, self.source.tls_server_hostname or self.source.host) if tls_context else None,
        )
        if assoc.is_established:
            return assoc
        if tls_context is not None and tls_context.handshake_error:
            raise QueryRetrieveError(f"TLS handshake with {self.peer} failed: {tls_context.handshake_error}")
        if assoc.is_rejected:
            raise QueryRetrieveError(
                f"{self.peer} rejected the association from {self.calling_ae_title}; "
                f"register {self.calling_ae_title} as a DICOM modality on the PACS"
            )
        if deadline.expired:
            raise QueryRetrieveError(
                f"association with {self.peer} timed out after {deadline.seconds:g} s", timed_out=True
            )
        raise QueryRetrieveError(
            f"no association with {self.peer}: the connection was refused or aborted; "
            "check that the PACS runs and listens on that host and port"
        )

    def find(self, assoc: Association, identifier: Dataset, deadline: Deadline) -> list[Dataset]:
        """Send a Study Root C-FIND and return the identifiers of all pending responses.

        Raises
        ------
        QueryRetrieveError
            On a failure or cancel status, a lost association or the deadline.
        """
        request_name = f"C-FIND at {identifier.QueryRetrieveLevel} level"
        send = functools.partial(assoc.send_c_find, identifier, FIND_MODEL)
        matches = []
        final_status = None
        for status, response_identifier in self._responses(assoc, send, deadline, request_name):
            if status in PENDING_STATUSES:
                if response_identifier is not None:
                    matches.append(response_identifier)
            else:
                final_status = status
        if final_status is None:
            raise QueryRetrieveError(f"{request_name} to {self.peer} ended without a final response")
        if final_status != QueryRetrieveStatus.SUCCESS:
            raise QueryRetrieveError(
                f"{request_name} to {self.peer} ended with status 0x{final_status:04X} "
                f"({query_retrieve_status_name(final_status)})",
                status=final_status,
            )
        return matches

    def move(self, assoc: Association, identifier: Dataset, move_destination: str, deadline: Deadline) -> RetrieveResult:
        """Send a Study Root C-MOVE to `move_destination` and return its final response."""
        send = functools.partial(assoc.send_c_move, identifier, move_destination, MOVE_MODEL)
        return self._retrieve_result(assoc, send, deadline, "C-MOVE")

    def get(self, assoc: Association, identifier: Dataset, deadline: Deadline) -> RetrieveResult:
        """Send a Study Root C-GET and return its final response.

        The instances arrive as C-STORE sub-operations on the same association, handled by
        the `store_handler` given to `associate`.
        """
        send = functools.partial(assoc.send_c_get, identifier, GET_MODEL)
        return self._retrieve_result(assoc, send, deadline, "C-GET")

    def _retrieve_result(
        self, assoc: Association, send: Callable[[], Iterator], deadline: Deadline, request_name: str
    ) -> RetrieveResult:
        final = None
        for status, status_dataset in self._responses(assoc, send, deadline, request_name, with_status=True):
            if status not in PENDING_STATUSES:
                final = RetrieveResult(
                    status=status,
                    completed=int(status_dataset.get("NumberOfCompletedSuboperations", 0) or 0),
                    failed=int(status_dataset.get("NumberOfFailedSuboperations", 0) or 0),
                    warning=int(status_dataset.get("NumberOfWarningSuboperations", 0) or 0),
                )
        if final is None:
            raise QueryRetrieveError(f"{request_name} to {self.peer} ended without a final response")
        return final

    def _responses(
        self,
        assoc: Association,
        send: Callable[[], Iterator],
        deadline: Deadline,
        request_name: str,
        with_status: bool = False,
    ) -> Iterator[tuple[int, Dataset | None]]:
        """Send a request with `send` and yield (status, identifier) pairs.

        With `with_status`, the pairs are (status, status data set) instead.

        Each wait for a response is bounded by the time left: pynetdicom reads the
        association's DIMSE timeout anew for every message, so it is lowered as time passes.
        """
        assoc.dimse_timeout = max(deadline.remaining(), 0.001)
        try:
            # pynetdicom raises ValueError here when no accepted presentation context fits.
            responses = send()
        except (ValueError, RuntimeError) as exc:
            raise QueryRetrieveError(f"{request_name} to {self.peer} was not sent: {exc}") from exc
        while True:
            try:
                status_dataset, identifier = next(responses)
            except StopIteration:
                return
            except (ValueError, RuntimeError) as exc:
                raise QueryRetrieveError(f"{request_name} to {self.peer} was not sent: {exc}") from exc
            if "Status" not in status_dataset:
                if deadline.expired:
                    raise QueryRetrieveError(
                        f"{request_name} to {self.peer} timed out after {deadline.seconds:g} s", timed_out=True
                    )
                raise QueryRetrieveError(
                    f"{request_name} to {self.peer} got no response: the PACS aborted the association "
                    f"(it may not allow this request from {self.calling_ae_title})"
                )
            status = int(status_dataset.Status)
            yield status, (status_dataset if with_status else identifier)
            if status in PENDING_STATUSES:
                if deadline.expired:
                    assoc.abort()
                    raise QueryRetrieveError(
                        f"{request_name} to {self.peer} timed out after {deadline.seconds:g} s", timed_out=True
                    )
                assoc.dimse_timeout = max(deadline.remaining(), 0.001)


def release(assoc: Association) -> None:
    """Release an association that is still established; an aborted one is left alone."""
    if assoc.is_established:
        assoc.release()


@dataclass(frozen=True)
class SourceCheck:
    """The result of one check of a query source: the request, whether it passed, and why."""

    request: str
    passed: bool
    detail: str


def check_query_source(source: QuerySourceSettings, calling_ae_title: str) -> list[SourceCheck]:
    """Check that a query source responds to C-ECHO and allows the node's C-FIND and retrieve.

    The C-FIND requests a Patient ID that no patient has, and the retrieve requests an image
    UID made up for the check, so no patient data is transferred.

    Parameters
    ----------
    source
        The `[[query_sources]]` entry to check.
    calling_ae_title
        The node's AE title, which the PACS must accept for queries and retrieves.

    Returns
    -------
    list of SourceCheck
        C-ECHO, C-FIND, and C-MOVE or C-GET (the source's retrieve method), in that order.
    """
    client = QuerySourceClient(source, calling_ae_title)
    retrieve_check = _check_move if source.retrieve_method is RetrieveMethod.MOVE else _check_get
    return [_check_echo(client), _check_find(client), retrieve_check(client)]


def _check_echo(client: QuerySourceClient) -> SourceCheck:
    deadline = Deadline(client.source.query_timeout_seconds)
    try:
        assoc = client.associate([(Verification, None)], deadline)
    except QueryRetrieveError as exc:
        return SourceCheck("C-ECHO", False, str(exc))
    try:
        response = assoc.send_c_echo()
    finally:
        release(assoc)
    status = int(response.Status) if response is not None and "Status" in response else None
    if status == QueryRetrieveStatus.SUCCESS:
        return SourceCheck("C-ECHO", True, f"{client.peer} returned Success")
    return SourceCheck("C-ECHO", False, f"{client.peer} returned {_status_text(status)}")


def _check_find(client: QuerySourceClient) -> SourceCheck:
    deadline = Deadline(client.source.query_timeout_seconds)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = f"LIBRA-NODE-CHECK-{secrets.token_hex(4)}"
    identifier.StudyInstanceUID = ""
    try:
        assoc = client.associate([(FIND_MODEL, None)], deadline)
        try:
            matches = client.find(assoc, identifier, deadline)
        finally:
            release(assoc)
    except QueryRetrieveError as exc:
        return SourceCheck(
            "C-FIND",
            False,
            f"{exc}. Allow Study Root C-FIND from AE {client.calling_ae_title} on the PACS "
            "(Orthanc: a DicomModalities entry for it with AllowFind)",
        )
    return SourceCheck(
        "C-FIND", True, f"Study Root C-FIND allowed; {len(matches)} matches for a Patient ID made up for the check"
    )


def _check_move(client: QuerySourceClient) -> SourceCheck:
    deadline = Deadline(client.source.retrieve_timeout_seconds)
    hint = (
        f"Allow Study Root C-MOVE from AE {client.calling_ae_title} on the PACS and register it as a move "
        "destination with the node's host and port (Orthanc: a DicomModalities entry with AllowMove)"
    )
    try:
        assoc = client.associate([(MOVE_MODEL, None)], deadline)
        try:
            if not any(context.abstract_syntax == MOVE_MODEL for context in assoc.accepted_contexts):
                return SourceCheck("C-MOVE", False, f"{client.peer} rejected the Study Root C-MOVE presentation context. {hint}")
            result = client.move(assoc, _made_up_image_identifier(), client.calling_ae_title, deadline)
        finally:
            release(assoc)
    except QueryRetrieveError as exc:
        return SourceCheck("C-MOVE", False, f"{exc}. {hint}")
    if result.status == QueryRetrieveStatus.MOVE_DESTINATION_UNKNOWN:
        return SourceCheck("C-MOVE", False, f"{client.peer} does not know the move destination {client.calling_ae_title}. {hint}")
    # NOTE: a PACS may look up the image before the move destination (Orthanc 1.10 does). A
    # made-up image therefore cannot show whether the PACS can reach the node; a real retrieve can.
    return SourceCheck(
        "C-MOVE",
        True,
        f"C-MOVE allowed; {client.peer} returned {_status_text(result.status)} for an image made up for the check. "
        f"Whether the PACS can open an association to {client.calling_ae_title} shows at the first real retrieve",
    )


def _check_get(client: QuerySourceClient) -> SourceCheck:
    deadline = Deadline(client.source.retrieve_timeout_seconds)
    hint = f"Allow Study Root C-GET from AE {client.calling_ae_title} on the PACS (Orthanc: a DicomModalities entry with AllowGet)"
    storage_contexts = [(sop_class_uid, ACCEPTED_TRANSFER_SYNTAXES) for sop_class_uid in ACCEPTED_STORAGE_SOP_CLASSES]
    try:
        assoc = client.associate(
            [(GET_MODEL, None), *storage_contexts],
            deadline,
            scp_role_sop_classes=ACCEPTED_STORAGE_SOP_CLASSES,
            store_handler=_refuse_check_store,
        )
        try:
            if not any(context.abstract_syntax == GET_MODEL for context in assoc.accepted_contexts):
                return SourceCheck("C-GET", False, f"{client.peer} rejected the Study Root C-GET presentation context. {hint}")
            scp_roles = [context.abstract_syntax for context in assoc.accepted_contexts if context.as_scp]
            if not scp_roles:
                return SourceCheck(
                    "C-GET",
                    False,
                    f"{client.peer} accepted no storage SOP class with the node in the SCP role (SCP/SCU role "
                    "selection), so C-GET cannot deliver images",
                )
            result = client.get(assoc, _made_up_image_identifier(), deadline)
        finally:
            release(assoc)
    except QueryRetrieveError as exc:
        return SourceCheck("C-GET", False, f"{exc}. {hint}")
    return SourceCheck(
        "C-GET",
        True,
        f"C-GET allowed, with the node as Storage SCP for {len(scp_roles)} SOP classes; {client.peer} returned "
        f"{_status_text(result.status)} for an image made up for the check",
    )


def _refuse_check_store(event: evt.Event) -> int:
    """Reject every C-STORE sub-operation of a check, because a check requests no real image."""
    return DimseStatus.NOT_AUTHORIZED


def _made_up_image_identifier() -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = generate_uid()
    identifier.SeriesInstanceUID = generate_uid()
    identifier.SOPInstanceUID = generate_uid()
    return identifier


def _status_text(status: int | None) -> str:
    if status is None:
        return "no status"
    return f"status 0x{status:04X} ({query_retrieve_status_name(status)})"
