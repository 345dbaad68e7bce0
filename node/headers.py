"""Header reading: the attributes the index needs, taken from a received file without its pixels.

`read_instance_header` parses the whole data set except the values of large elements, and
checks that the pixel data the file declares is really there, so a truncated data set is
distinguished from a complete one without loading the pixels into memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

# Elements longer than this stay on disk while the header is parsed.
_DEFER_SIZE_BYTES = 64 * 1024


class UnreadableDatasetError(ValueError):
    """The data set cannot be parsed, or its declared content is cut short."""


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one received instance that the index stores (no pixel data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    modality: str
    body_part_examined: str
    series_description: str
    series_number: int | None
    instance_number: int | None
    view_position: str
    view_code_value: str
    view_code_meaning: str
    image_laterality: str
    image_comments: str


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _integer(dataset: Dataset, keyword: str) -> int | None:
    value = dataset.get(keyword)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_pixel_data_complete(path: Path, dataset: Dataset) -> None:
    element = dataset.get_item("PixelData", keep_deferred=True) if "PixelData" in dataset else None
    value_tell = getattr(element, "value_tell", None)
    length = getattr(element, "length", None)
    if value_tell is None or length in (None, 0xFFFFFFFF):
        # Encapsulated pixel data is read up to its sequence delimiter while parsing,
        # which raises on a cut-short file; native pixel data is checked here.
        return
    file_size = path.stat().st_size
    if value_tell + length > file_size:
        raise UnreadableDatasetError(
            f"Pixel Data declares {length} bytes at offset {value_tell}, "
            f"but the data set ends at byte {file_size}"
        )


def read_dataset_header(path: Path) -> Dataset:
    """Parse a DICOM file without loading large values, and check it is complete.

    Raises
    ------
    UnreadableDatasetError
        When the file is not DICOM, cannot be parsed, or its pixel data is cut short.
    """
    try:
        dataset = pydicom.dcmread(path, defer_size=_DEFER_SIZE_BYTES)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UnreadableDatasetError(f"the data set cannot be parsed: {exc}") from exc
    # Checked before any element is converted: converting a deferred element reads its value.
    _check_pixel_data_complete(path, dataset)
    return dataset


def header_from_dataset(dataset: Dataset) -> InstanceHeader:
    """Extract the indexed attributes from a parsed data set.

    Missing attributes become empty strings; UIDs are not validated here.

    Raises
    ------
    UnreadableDatasetError
        When an indexed element's value cannot be decoded.
    """
    try:
        return _header_from_dataset(dataset)
    except (ValueError, TypeError, KeyError, IndexError, EOFError, OSError) as exc:
        raise UnreadableDatasetError(f"an element cannot be decoded: {exc}") from exc


def _header_from_dataset(dataset: Dataset) -> InstanceHeader:
    view_code_value = ""
    view_code_meaning = ""
    view_codes = dataset.get("ViewCodeSequence")
    if view_codes:
        view_code_value = _text(view_codes[0], "CodeValue")
        view_code_meaning = _text(view_codes[0], "CodeMeaning")
    meta = getattr(dataset, "file_meta", None)
    return InstanceHeader(
        sop_class_uid=_text(dataset, "SOPClassUID"),
        sop_instance_uid=_text(dataset, "SOPInstanceUID"),
        study_instance_uid=_text(dataset, "StudyInstanceUID"),
        series_instance_uid=_text(dataset, "SeriesInstanceUID"),
        transfer_syntax_uid=_text(meta, "TransferSyntaxUID") if meta is not None else "",
        patient_id=_text(dataset, "PatientID"),
        issuer_of_patient_id=_text(dataset, "IssuerOfPatientID"),
        patient_name=_text(dataset, "PatientName"),
        study_date=_text(dataset, "StudyDate"),
        study_time=_text(dataset, "StudyTime"),
        accession_number=_text(dataset, "AccessionNumber"),
        study_description=_text(dataset, "StudyDescription"),
        modality=_text(dataset, "Modality").upper(),
        body_part_examined=_text(dataset, "BodyPartExamined").upper(),
        series_description=_text(dataset, "SeriesDescription"),
        series_number=_integer(dataset, "SeriesNumber"),
        instance_number=_integer(dataset, "InstanceNumber"),
        view_position=_text(dataset, "ViewPosition").upper(),
        view_code_value=view_code_value,
        view_code_meaning=view_code_meaning,
        image_laterality=_text(dataset, "ImageLaterality").upper(),
        image_comments=_text(dataset, "ImageComments"),
    )
