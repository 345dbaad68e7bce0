"""Data sets written without File Meta Information (no preamble, no group 0002).

The receiver stores them as DICOM files whose meta names the negotiated transfer syntax
and the data set's own SOP Class and Instance UIDs; `libra-node send` reads and sends them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from node.index.models import Instance
from node.send_tool import read_dicom_file
from node.synthetic import synthetic_chest_study
from tests.node.conftest import MODALITY_AE_TITLE, NODE_AE_TITLE

ENCODINGS = {"implicit-vr": ImplicitVRLittleEndian, "explicit-vr": ExplicitVRLittleEndian}


def write_bare_dataset(folder: Path, transfer_syntax_uid: str) -> tuple[Path, pydicom.Dataset]:
    """Write a synthetic chest image as a bare data set and return its path and the data set."""
    dataset = synthetic_chest_study(size=128)
    del dataset.file_meta
    path = folder / "bare.dcm"
    dataset.save_as(path, implicit_vr=transfer_syntax_uid == ImplicitVRLittleEndian, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM", "the file must have no preamble"
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(path)
    return path, dataset


def stored_file(node, sop_instance_uid: str) -> tuple[Path, str]:
    """Return the stored path of an instance and the transfer syntax in its index row."""
    with node.index.transaction() as session:
        instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).one()
        return node.store.absolute(instance.file_path), instance.transfer_syntax_uid


def check_stored_with_meta(node, source: pydicom.Dataset, transfer_syntax_uid: str) -> None:
    """Check the stored file's meta and that it reads back as the data set that was sent."""
    path, indexed_transfer_syntax_uid = stored_file(node, str(source.SOPInstanceUID))
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax_uid
    assert stored.file_meta.MediaStorageSOPClassUID == source.SOPClassUID
    assert stored.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert stored.file_meta.ImplementationClassUID
    assert indexed_transfer_syntax_uid == transfer_syntax_uid
    assert stored.PatientID == source.PatientID
    assert stored.PixelData == source.PixelData


@pytest.fixture
def receiving_node(make_node):
    return make_node(run_worker=False)


@pytest.mark.peers
def test_bare_implicit_dataset_stored_with_meta(receiving_node, tmp_path):
    path, source = write_bare_dataset(tmp_path, ImplicitVRLittleEndian)
    # storescu reads a data set without meta as implicit VR little endian (+f), and -xi
    # proposes only that transfer syntax, so the negotiated context is implicit VR too.
    result = subprocess.run(
        ["storescu", "+f", "-xi", "127.0.0.1", str(receiving_node.receiver.port), str(path),
         "-aet", MODALITY_AE_TITLE, "-aec", NODE_AE_TITLE],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    check_stored_with_meta(receiving_node, source, ImplicitVRLittleEndian)


@pytest.mark.parametrize("transfer_syntax_uid", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_send_command_bare_dataset_stored(receiving_node, tmp_path, transfer_syntax_uid):
    path, source = write_bare_dataset(tmp_path, transfer_syntax_uid)
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "send", f"{NODE_AE_TITLE}@127.0.0.1:{receiving_node.receiver.port}",
         str(path), "--calling-ae-title", MODALITY_AE_TITLE],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_stored_with_meta(receiving_node, source, transfer_syntax_uid)


@pytest.mark.parametrize("transfer_syntax_uid", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_read_dicom_file_adds_meta(tmp_path, transfer_syntax_uid):
    path, source = write_bare_dataset(tmp_path, transfer_syntax_uid)
    dataset = read_dicom_file(path)
    assert dataset.file_meta.TransferSyntaxUID == transfer_syntax_uid
    assert dataset.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID


def test_read_dicom_file_rejects_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Not a DICOM file.\n" * 20)
    with pytest.raises(InvalidDicomError):
        read_dicom_file(path)
