"""Ingest: check one received DICOM file, write it durably into the store and index it.

Promise: `InstanceIngest.store_file` returns SUCCESS (0x0000) only after the instance is
durably written (fsync, atomic rename) and indexed in one committed transaction. Every other
outcome carries the named DIMSE status of its cause. The receiver's C-STORE handler and the
C-GET retrieval of prior studies both store through this class.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy.exc import IntegrityError

from node.config import NodeConfig
from node.dimse_status import DimseStatus, status_name
from node.headers import InstanceHeader, UnreadableDatasetError, header_from_dataset, read_dataset_header
from node.index.records import find_instance, record_instance
from node.index.session import IndexDatabase
from node.log_config import bind_patient_identifiers, patient_hash, patient_identifiers_redacted
from node.store import FileStore, InvalidUIDError, check_uid, sha256_file

log = structlog.get_logger(__name__)

# Storage SOP classes of the images a chest radiograph study contains.
COMPUTED_RADIOGRAPHY_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DIGITAL_XRAY_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DIGITAL_XRAY_IMAGE_STORAGE_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7.2"
MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7.3"

ACCEPTED_STORAGE_SOP_CLASSES = (
    COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
    DIGITAL_XRAY_IMAGE_STORAGE_FOR_PRESENTATION,
    DIGITAL_XRAY_IMAGE_STORAGE_FOR_PROCESSING,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE,
    MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE,
)
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(ACCEPTED_STORAGE_SOP_CLASSES[3:])
# Secondary Capture is accepted only for these modalities, as exported by CR/DX systems.
SECONDARY_CAPTURE_MODALITIES = frozenset({"CR", "DX"})

ACCEPTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

ERROR_COMMENT_MAX_LENGTH = 64


@dataclass(frozen=True)
class StoreOutcome:
    """The status of one C-STORE and the reason logged with it."""

    status: DimseStatus
    reason: str = ""

    def response(self) -> int | Dataset:
        """Return the C-STORE response status: SUCCESS alone, or the status with an Error Comment."""
        if self.status == DimseStatus.SUCCESS:
            return DimseStatus.SUCCESS
        return status_with_comment(self.status, self.reason)


class StoreRejected(Exception):
    """An expected C-STORE failure, carrying its DIMSE status."""

    def __init__(self, status: DimseStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class InstanceIngest:
    """Checks, durably writes and indexes received DICOM files.

    Parameters
    ----------
    config
        The node configuration (free disk reserve, study stable time).
    store, index
        Where instances are written and indexed.
    hash_key
        The key of the patient hashes in log lines.
    actor
        The actor named in audit rows, for example "receiver:1234".
    event_stage
        The first part of the log event names, for example "receiver" for
        ``receiver.instance_stored``.
    on_instance_stored
        Called after each stored instance with its Study Instance UID.
    """

    def __init__(
        self,
        config: NodeConfig,
        store: FileStore,
        index: IndexDatabase,
        hash_key: bytes,
        actor: str,
        event_stage: str,
        on_instance_stored: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.hash_key = hash_key
        self.actor = actor
        self.event_stage = event_stage
        self.on_instance_stored = on_instance_stored

    def store_file(
        self,
        temporary_path: Path,
        request_sop_class_uid: str,
        request_sop_instance_uid: str,
        calling_ae_title: str,
        peer_host: str,
    ) -> StoreOutcome:
        """Check, write and index one received file; every failure becomes a status, not an exception.

        Parameters
        ----------
        temporary_path
            The received data set in the DICOM file format, in the store's incoming folder
            (the final move is a rename, so it must be on the store's file system).
        request_sop_class_uid, request_sop_instance_uid
            Affected SOP Class UID and Affected SOP Instance UID of the C-STORE request.
        calling_ae_title, peer_host
            The peer that sent the file, recorded with the instance and in log lines.

        Returns
        -------
        StoreOutcome
            SUCCESS, or the failure status and its reason; failures are logged.
        """
        log_context = {
            "sop_instance_uid": request_sop_instance_uid,
            "sop_class_uid": request_sop_class_uid,
            "calling_ae_title": calling_ae_title,
            "peer_host": peer_host,
        }
        with patient_identifiers_redacted():
            try:
                outcome = self._store(temporary_path, request_sop_class_uid, request_sop_instance_uid, calling_ae_title)
            except StoreRejected as rejection:
                outcome = StoreOutcome(rejection.status, rejection.reason)
            except Exception as exc:  # noqa: BLE001 - every failure must reach the peer as a status
                log.error(f"{self.event_stage}.store_failed", exc_info=exc, **log_context)
                outcome = StoreOutcome(DimseStatus.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")

            if outcome.status not in (DimseStatus.SUCCESS, DimseStatus.PROCESSING_FAILURE):
                log.warning(
                    f"{self.event_stage}.instance_rejected",
                    reason=outcome.reason,
                    status=f"0x{outcome.status:04X}",
                    status_name=status_name(outcome.status),
                    **log_context,
                )
        return outcome

    def _store(
        self, temporary_path: Path, request_sop_class_uid: str, request_sop_instance_uid: str, calling_ae_title: str
    ) -> StoreOutcome:
        if not self.store.has_free_space():
            raise StoreRejected(
                DimseStatus.OUT_OF_RESOURCES,
                f"free disk below the reserve of {self.config.node.free_disk_reserve_mb} MB",
            )

        try:
            dataset = read_dataset_header(temporary_path)
            # Bound before any element is decoded, so that no warning quotes a value unredacted.
            bind_patient_identifiers(dataset)
            header = header_from_dataset(dataset)
        except UnreadableDatasetError as exc:
            raise StoreRejected(DimseStatus.CANNOT_UNDERSTAND, str(exc)) from exc
        self._check_identity(header, request_sop_class_uid, request_sop_instance_uid)

        try:
            relative_path = self.store.relative_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
        except InvalidUIDError as exc:
            raise StoreRejected(DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc

        # The file is committed before the index is queried for the SOP Instance UID, so the
        # common case costs one index transaction. A copy at the same path fails the exclusive
        # link below, and a copy indexed under other UIDs fails the unique index.
        file_size = temporary_path.stat().st_size
        try:
            final_path = self.store.commit_file(temporary_path, relative_path)
        except FileExistsError:
            # The instance is stored already, or another association stored it a moment ago.
            return self._store_duplicate(temporary_path, relative_path, header)

        hashed_patient = patient_hash(self.hash_key, header.patient_id, header.issuer_of_patient_id)
        try:
            with self.index.transaction() as session:
                record_instance(
                    session,
                    header,
                    file_path=str(relative_path),
                    file_size=file_size,
                    calling_ae_title=calling_ae_title,
                    patient_hash=hashed_patient,
                    stable_after=dt.timedelta(seconds=self.config.node.study_stable_seconds),
                    actor=self.actor,
                )
        except IntegrityError:
            # The SOP Instance UID is indexed already: under other Study or Series Instance
            # UIDs, so this copy landed at a new path, or by a concurrent association.
            try:
                return self._store_indexed_elsewhere(final_path, relative_path, header)
            finally:
                self.store.remove(relative_path)
        except BaseException:
            final_path.unlink(missing_ok=True)
            raise

        log.info(
            f"{self.event_stage}.instance_stored",
            sop_instance_uid=header.sop_instance_uid,
            series_instance_uid=header.series_instance_uid,
            study_instance_uid=header.study_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            calling_ae_title=calling_ae_title,
            patient_hash=hashed_patient,
            file_size=file_size,
        )
        if self.on_instance_stored is not None:
            self.on_instance_stored(header.study_instance_uid)
        return StoreOutcome(DimseStatus.SUCCESS)

    def _check_identity(self, header: InstanceHeader, request_sop_class_uid: str, request_sop_instance_uid: str) -> None:
        for keyword, value in (
            ("SOPClassUID", header.sop_class_uid),
            ("SOPInstanceUID", header.sop_instance_uid),
            ("StudyInstanceUID", header.study_instance_uid),
            ("SeriesInstanceUID", header.series_instance_uid),
        ):
            if not value:
                raise StoreRejected(DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is missing")
            try:
                check_uid(keyword, value)
            except InvalidUIDError as exc:
                raise StoreRejected(DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
        if header.sop_class_uid != request_sop_class_uid:
            raise StoreRejected(
                DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPClassUID {header.sop_class_uid} differs from the request's {request_sop_class_uid}",
            )
        if header.sop_instance_uid != request_sop_instance_uid:
            raise StoreRejected(
                DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPInstanceUID {header.sop_instance_uid} differs from the request's {request_sop_instance_uid}",
            )
        if header.sop_class_uid in SECONDARY_CAPTURE_SOP_CLASSES and header.modality not in SECONDARY_CAPTURE_MODALITIES:
            raise StoreRejected(
                DimseStatus.SOP_CLASS_NOT_SUPPORTED,
                f"Secondary Capture is stored only with Modality CR or DX, not {header.modality or 'empty'}",
            )

    def _store_indexed_elsewhere(self, new_path: Path, relative_path: Path, header: InstanceHeader) -> StoreOutcome:
        with self.index.transaction() as session:
            existing = find_instance(session, header.sop_instance_uid)
            existing_path = Path(existing.file_path) if existing is not None else None
        if existing_path is None or existing_path == relative_path:
            raise StoreRejected(DimseStatus.PROCESSING_FAILURE, "the same instance was being stored concurrently; retry")
        return self._store_duplicate(new_path, existing_path, header)

    def _store_duplicate(self, temporary_path: Path, existing_relative_path: Path, header: InstanceHeader) -> StoreOutcome:
        existing_path = self.store.absolute(existing_relative_path)
        same_content = existing_path.exists() and sha256_file(existing_path) == sha256_file(temporary_path)
        if same_content:
            log.info(f"{self.event_stage}.duplicate_ignored", sop_instance_uid=header.sop_instance_uid)
            return StoreOutcome(DimseStatus.SUCCESS)
        raise StoreRejected(
            DimseStatus.DUPLICATE_SOP_INSTANCE,
            "an instance with this SOP Instance UID and different content is stored; the first copy is kept",
        )


def status_with_comment(status: DimseStatus, reason: str) -> Dataset:
    """Return a C-STORE response status with an Error Comment (LO, at most 64 characters)."""
    response = Dataset()
    response.Status = int(status)
    response.ErrorComment = reason[:ERROR_COMMENT_MAX_LENGTH]
    return response
