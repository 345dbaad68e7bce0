"""Receiver: the node's Verification SCP and Storage SCP (pynetdicom).

Promise: a C-STORE gets Success (0x0000) only after the instance is durably written (fsync,
atomic rename) and indexed in one committed transaction. Every other outcome gets the named
DIMSE status of its cause and a log line with the SOP Instance UID, never patient names or IDs.
Associations are accepted only from configured calling AE titles and query sources (each
optionally bound to a host) and only when the called AE title is the node's own. The checks
and writes of a C-STORE live in `node.ingest`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from node.config import CallerSettings, NodeConfig
from node.dimse_status import DimseStatus, status_name
from node.index.session import IndexDatabase
from node.tls import TLSHandshakeError, complete_server_handshake, server_context

# The storage SOP classes and transfer syntaxes are defined with the C-STORE checks in
# node.ingest and re-exported here, where the presentation contexts are built.
from node.ingest import (  # noqa: F401
    ACCEPTED_STORAGE_SOP_CLASSES,
    ACCEPTED_TRANSFER_SYNTAXES,
    COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
    DIGITAL_XRAY_IMAGE_STORAGE_FOR_PRESENTATION,
    DIGITAL_XRAY_IMAGE_STORAGE_FOR_PROCESSING,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    InstanceIngest,
)
from node.metrics import NodeMetrics
from node.store import FileStore

log = structlog.get_logger(__name__)

# A-ASSOCIATE-RJ (result, source, reason) triples of PS3.8 9.3.4.
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
REJECT_CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)

class LargeReadAssociationSocket(AssociationSocket):
    """An association socket that reads each PDU with as few recv() calls as the kernel allows.

    pynetdicom 3.0's `AssociationSocket.recv` calls `socket.recv` with at most 4096 bytes and
    extends a bytearray after each call. For a 10 MB image that was most of the receiver's
    system CPU time. This subclass reads into one preallocated buffer and returns the same bytes: all
    `nr_bytes` of them, or fewer only when the peer closed the connection. Errors and timeouts
    propagate from `socket.recv_into` as they do from `socket.recv`.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """Read `nr_bytes` bytes, blocking until they arrived or the connection closed."""
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = self.socket.recv_into(view[received:], nr_bytes - received)
            if count == 0:
                del view
                del buffer[received:]
                return buffer
            received += count
        return buffer


def allowed_callers(config: NodeConfig) -> list[CallerSettings]:
    """Return the callers allowed to store: [[callers]] plus each query source from its host.

    An empty list means that any caller may store. Query sources are added only to a
    non-empty list, because a C-MOVE retrieve arrives as a C-STORE from the source's AE title.
    """
    if not config.callers:
        return []
    sources = [CallerSettings(ae_title=source.ae_title, host=source.host) for source in config.query_sources]
    return [*config.callers, *sources]


def _check_caller(calling_ae_title: str, peer_host: str, callers: list[CallerSettings]) -> bool:
    if not callers:
        return True
    for caller in callers:
        if caller.ae_title == calling_ae_title and (not caller.host or caller.host == peer_host):
            return True
    return False


class Receiver:
    """The DICOM listener: association checks and the C-ECHO and C-STORE handlers.

    Parameters
    ----------
    config
        The node configuration (AE title, port, callers, timeouts).
    store, index
        Where instances are written and indexed.
    hash_key
        The key of the patient hashes in log lines.
    on_instance_stored
        Called after each successful C-STORE with the Study Instance UID; the node schedules the
        study's stability check with it.
    metrics
        Where received and rejected instances and associations are counted.

    Notes
    -----
    `config` may be replaced at any time by a reloaded configuration (new callers). Each
    handler reads the attribute once, so an association uses one configuration, and the
    associations in progress are not dropped.
    """

    def __init__(
        self,
        config: NodeConfig,
        store: FileStore,
        index: IndexDatabase,
        hash_key: bytes,
        on_instance_stored: Callable[[str], None] | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.hash_key = hash_key
        self.on_instance_stored = on_instance_stored
        self.metrics = metrics or NodeMetrics()
        self._server = None
        self._previous_tempdir: str | None = None
        self.ingest = InstanceIngest(
            config,
            store,
            index,
            hash_key,
            actor=f"receiver:{os.getpid()}",
            event_stage="receiver",
            on_instance_stored=on_instance_stored,
        )
        settings = config.node
        self._ssl_context = (
            server_context(settings.tls_certificate_file, settings.tls_private_key_file, settings.tls_ca_file)
            if settings.tls
            else None
        )

    # -- association -----------------------------------------------------------------------

    def _build_ae(self) -> AE:
        settings = self.config.node
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.acse_timeout = settings.acse_timeout_seconds
        ae.dimse_timeout = settings.dimse_timeout_seconds
        ae.network_timeout = settings.network_timeout_seconds
        ae.maximum_pdu_size = settings.max_pdu_bytes
        # Called AE and calling AE (with host) are checked in _on_requested, where the
        # rejection can be logged with the peer's address.
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        for sop_class_uid in ACCEPTED_STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class_uid, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Start listening in background threads; returns once the port is bound."""
        # Received data sets are written straight to a temporary file on the store's file
        # system, so an instance is never held whole in memory and the final move is a rename.
        # NOTE: pynetdicom takes both settings process-wide, so all receivers of one process
        # share them; the temporary folder is restored on stop.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.store.incoming_dir)
        settings = self.config.node
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_opened),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        self._server = self._build_ae().start_server(
            (settings.bind_address, settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self._ssl_context,
        )
        log.info(
            "receiver.listening",
            called_ae_title=settings.ae_title,
            bind_address=settings.bind_address,
            port=self.port,
            tls=settings.tls,
            tls_client_certificate_required=settings.tls_ca_file is not None,
        )

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to."""
        return self._server.server_address[1] if self._server else self.config.node.port

    @property
    def is_listening(self) -> bool:
        """Whether the listener socket is open (False before start and after stop)."""
        return self._server is not None and self._server.socket.fileno() >= 0

    def stop(self) -> None:
        """Stop accepting associations and close the listener."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            tempfile.tempdir = self._previous_tempdir
            log.info("receiver.stopped")

    def _on_connection_opened(self, event: evt.Event) -> None:
        """Prepare a new connection before the association thread reads its first PDU.

        On a TLS listener this runs the handshake in the association's own thread. A failed
        handshake closes the connection, so the association ends before it starts.
        """
        association_socket = event.assoc.dul.socket
        if self._ssl_context is not None:
            context = {"peer_host": event.address[0], "peer_port": event.address[1]}
            try:
                session = complete_server_handshake(association_socket.socket, self.config.node.acse_timeout_seconds)
            except TLSHandshakeError as exc:
                log.warning("receiver.tls_handshake_failed", error=str(exc), **context)
                association_socket.close()
                return
            log.info(
                "receiver.tls_established",
                tls_version=session.tls_version,
                cipher=session.cipher,
                peer_certificate_subject=session.peer_certificate_subject,
                **context,
            )
        # pynetdicom triggers this event after the socket is attached and before the
        # association thread reads the first PDU.
        if type(association_socket) is AssociationSocket:
            association_socket.__class__ = LargeReadAssociationSocket

    def _on_requested(self, event: evt.Event) -> None:
        config = self.config
        assoc = event.assoc
        calling_ae_title = assoc.requestor.primitive.calling_ae_title.strip()
        called_ae_title = assoc.requestor.primitive.called_ae_title.strip()
        peer_host = assoc.requestor.address
        context = {
            "calling_ae_title": calling_ae_title,
            "called_ae_title": called_ae_title,
            "peer_host": peer_host,
            "peer_port": assoc.requestor.port,
        }
        if called_ae_title != config.node.ae_title:
            reason = f"called AE title is not the node's own ({config.node.ae_title})"
            rejection = REJECT_CALLED_AE_NOT_RECOGNIZED
            metric_reason = "called_ae_title_not_recognized"
        elif not _check_caller(calling_ae_title, peer_host, allowed_callers(config)):
            reason = (
                f"calling AE title {calling_ae_title!r} from {peer_host} is not allowed; "
                f"add a [[callers]] entry for it"
            )
            rejection = REJECT_CALLING_AE_NOT_RECOGNIZED
            metric_reason = "calling_ae_title_not_recognized"
        else:
            return
        log.warning("receiver.association_rejected", reason=reason, **context)
        self.metrics.associations_rejected.labels(reason=metric_reason).inc()
        assoc.acse.send_reject(*rejection)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        context = {
            "calling_ae_title": assoc.requestor.ae_title.strip(),
            "peer_host": assoc.requestor.address,
            "peer_port": assoc.requestor.port,
        }
        log.info("receiver.association_accepted", **context)
        rejected_sop_class_uids = sorted({str(item.abstract_syntax) for item in assoc.rejected_contexts})
        if rejected_sop_class_uids:
            log.warning(
                "receiver.presentation_contexts_rejected",
                rejected_sop_class_uids=rejected_sop_class_uids,
                reason="SOP class or transfer syntax not stored by the node",
                **context,
            )

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom rejects by itself only when the association limit is exceeded.
        primitive = event.assoc.requestor.primitive
        log.warning(
            "receiver.association_rejected",
            reason=f"more than {self.config.node.max_associations} simultaneous associations",
            calling_ae_title=primitive.calling_ae_title.strip() if primitive else "",
            peer_host=event.assoc.requestor.address,
        )
        self.metrics.associations_rejected.labels(reason="local_limit_exceeded").inc()

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning(
            "receiver.association_aborted",
            calling_ae_title=event.assoc.requestor.ae_title.strip(),
            peer_host=event.assoc.requestor.address,
        )
        _discard_partial_dataset(event.assoc)

    def _on_connection_closed(self, event: evt.Event) -> None:
        _discard_partial_dataset(event.assoc)

    # -- services --------------------------------------------------------------------------

    def _on_c_echo(self, event: evt.Event) -> int:
        """Handle a C-ECHO request.

        Returns SUCCESS (0x0000): the association checks already passed.
        """
        log.info(
            "receiver.echo_answered",
            calling_ae_title=event.assoc.requestor.ae_title.strip(),
            peer_host=event.assoc.requestor.address,
        )
        return DimseStatus.SUCCESS

    def _on_c_store(self, event: evt.Event) -> int | Dataset:
        """Handle a C-STORE request: check, write durably, index, then return the status.

        Statuses returned (PS3.4 B.2.3, PS3.7 C):

        - SUCCESS (0x0000): stored, fsynced and indexed; or an identical copy was stored before.
        - OUT_OF_RESOURCES (0xA700): free disk is below the configured reserve.
        - CANNOT_UNDERSTAND (0xC000): the data set does not parse or is cut short.
        - DATA_SET_DOES_NOT_MATCH_SOP_CLASS (0xA900): a UID is missing or invalid, or the data
          set's SOP Class/Instance UID differs from the request's.
        - SOP_CLASS_NOT_SUPPORTED (0x0122): Secondary Capture whose Modality is not CR or DX.
        - DUPLICATE_SOP_INSTANCE (0x0111): this SOP Instance UID is stored with other content;
          the first copy is kept.
        - PROCESSING_FAILURE (0x0110): an unexpected error while writing or indexing.
        """
        request = event.request
        outcome = self.ingest.store_file(
            Path(event.dataset_path),
            str(request.AffectedSOPClassUID or ""),
            str(request.AffectedSOPInstanceUID or ""),
            calling_ae_title=event.assoc.requestor.ae_title.strip(),
            peer_host=event.assoc.requestor.address,
        )
        if outcome.status == DimseStatus.SUCCESS:
            self.metrics.instances_received.inc()
        else:
            self.metrics.instances_rejected.labels(reason=status_name(outcome.status)).inc()
        return outcome.response()


def _discard_partial_dataset(assoc) -> None:
    """Delete the temporary file of a C-STORE data set that was cut off by an abort or a lost connection.

    pynetdicom keeps the message being received on `assoc.dimse.message`; a complete message
    has already been handed to the C-STORE handler and taken off it.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial_file = getattr(message, "_data_set_file", None)
    if partial_file is None:
        return
    partial_file.close()
    Path(partial_file.name).unlink(missing_ok=True)
    message._data_set_file = None
    log.warning(
        "receiver.partial_dataset_discarded",
        sop_instance_uid=str(getattr(message.command_set, "AffectedSOPInstanceUID", "") or ""),
        calling_ae_title=assoc.requestor.ae_title.strip(),
        peer_host=assoc.requestor.address,
    )
