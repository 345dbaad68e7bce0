"""`libra-node send`: C-STORE files to a peer, proposing each file's own transfer syntax."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from node.dimse_status import status_category

# PS3.8 9.3.2.2: an association proposes at most 128 presentation contexts.
_MAX_CONTEXTS = 128


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Return the files named, with folders replaced by the files under them (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(candidate for candidate in path.rglob("*") if candidate.is_file()))
        else:
            files.append(path)
    return files


def read_dicom_file(path: Path) -> pydicom.Dataset:
    """Read a DICOM file, or a bare data set written without File Meta Information.

    A bare data set gets File Meta Information: its Transfer Syntax UID is the encoding that
    pydicom detects (implicit or explicit VR, little or big endian), and its Media Storage
    SOP Class and Instance UIDs are the data set's own.

    Raises
    ------
    InvalidDicomError
        When the file is neither a DICOM file nor a data set with SOP Class and Instance UIDs.
    OSError
        When the file cannot be read.
    """
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    try:
        dataset = pydicom.dcmread(path, force=True)
        sop_class_uid = str(dataset.get("SOPClassUID", "") or "")
        sop_instance_uid = str(dataset.get("SOPInstanceUID", "") or "")
        implicit_vr, little_endian = dataset.original_encoding
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise InvalidDicomError(f"neither a DICOM file nor a bare data set: {exc}") from exc
    if not sop_class_uid or not sop_instance_uid:
        raise InvalidDicomError("no DICOM preamble, and no SOP Class UID and SOP Instance UID in a bare data set")
    if implicit_vr:
        transfer_syntax_uid = ImplicitVRLittleEndian
    else:
        transfer_syntax_uid = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = sop_class_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    dataset.file_meta.TransferSyntaxUID = transfer_syntax_uid
    return dataset


def send_datasets(
    ae_title: str,
    host: str,
    port: int,
    datasets: Sequence[pydicom.Dataset],
    calling_ae_title: str = "LIBRA_NODE",
    timeout_seconds: float = 30.0,
) -> list[int | None]:
    """Send data sets over one association and return each C-STORE status (None: not sent).

    Raises
    ------
    ConnectionError
        When the association is not established.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds
    # One presentation context per SOP class and transfer syntax, each offering that one
    # syntax: a context that offered a compressed syntax together with Explicit VR Little
    # Endian could be accepted with the latter, and a compressed data set cannot be converted.
    contexts = {(str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID)) for dataset in datasets}
    for sop_class_uid, transfer_syntax in sorted(contexts)[:_MAX_CONTEXTS]:
        ae.add_requested_context(sop_class_uid, transfer_syntax)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {ae_title}@{host}:{port} (rejected, refused or timed out)")
    statuses: list[int | None] = []
    try:
        for dataset in datasets:
            try:
                response = assoc.send_c_store(dataset)
            except ValueError as exc:
                # The peer accepted no presentation context for this SOP class and transfer syntax.
                print(f"not sent {dataset.SOPInstanceUID}: {exc}", file=sys.stderr)
                statuses.append(None)
                continue
            statuses.append(int(response.Status) if response is not None and "Status" in response else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def send_files(ae_title: str, host: str, port: int, paths: Sequence[Path], calling_ae_title: str = "LIBRA_NODE") -> int:
    """Send DICOM files and folders, printing one progress line per file; return the exit status."""
    files = expand_paths(paths)
    datasets = []
    for path in files:
        try:
            datasets.append(read_dicom_file(path))
        except (InvalidDicomError, OSError) as exc:
            print(f"skipped {path}: not a readable DICOM file ({exc})", file=sys.stderr)
    if not datasets:
        print("no DICOM files to send", file=sys.stderr)
        return 1
    try:
        statuses = send_datasets(ae_title, host, port, datasets, calling_ae_title)
    except ConnectionError as exc:
        print(f"send failed: {exc}", file=sys.stderr)
        return 1
    failures = 0
    for number, (dataset, status) in enumerate(zip(datasets, statuses), start=1):
        shown = "no response" if status is None else f"0x{status:04X}"
        if status is None or status_category(status) == "failure":
            failures += 1
        print(f"[{number}/{len(datasets)}] {dataset.SOPInstanceUID}: status {shown}")
    print(f"sent {len(datasets) - failures} of {len(datasets)} instances to {ae_title}@{host}:{port}")
    return 0 if failures == 0 else 1
