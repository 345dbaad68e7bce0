"""Inputs of `build_draft_sr`: the draft report, the device identity, the SR class, the errors
raised for invalid inputs and the checks that raise them.

`node.sr_builder` re-exports the public names. The checks run before anything is built, so an
invalid input never yields an SR.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import pydicom
from pydicom.uid import (
    RE_VALID_UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)

LONG_STRING_MAX_CHARS = 64
"""Maximum length of a Long String (LO) value such as Series Description (PS3.5 6.2)."""

DRAFT_SERIES_LABEL = "Unverified AI draft"
DEMO_SERIES_LABEL = "Meaningless demo AI draft"
SR_STORAGE_SOP_CLASSES = frozenset(
    {BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage}
)

# DICOM text values (ST, LT, UT) may contain graphic characters and the control characters
# TAB, LF, FF and CR (PS3.5 6.1.2 and 6.2). This matches every other control character.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_LONG_STRING_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SRDocumentClass(str, Enum):
    """SR IOD that the draft report is written as (PS3.3 A.35)."""

    ENHANCED = "enhanced"
    """Enhanced SR Storage, 1.2.840.10008.5.1.4.1.1.88.22 (the default)."""

    COMPREHENSIVE = "comprehensive"
    """Comprehensive SR Storage, 1.2.840.10008.5.1.4.1.1.88.33."""

    BASIC_TEXT = "basic_text"
    """Basic Text SR Storage, 1.2.840.10008.5.1.4.1.1.88.11."""


class DicomConversion(str, Enum):
    """Method that turned the DICOM pixel data into the model's input image."""

    MIMIC = "mimic"
    """The MIMIC-CXR-JPG conversion of the model's training data."""

    RELEASED = "released"
    """The DICOM path of the released Libra code."""


@dataclass(frozen=True)
class DraftReport:
    """Findings text written by the model stage, with what is needed to label it.

    Attributes
    ----------
    findings_text
        The generated findings section, written into the SR verbatim.
    model_name
        Name of the model, for example "libra-v1.0-7b" or "libra-tiny-demo".
    checkpoint_sha256
        SHA-256 of the checkpoint files as 64 lowercase hexadecimal digits.
    is_demo_checkpoint
        Whether the tiny random demo checkpoint wrote the text, which is then meaningless.
    dicom_conversion
        How the pixel data were converted for the model: a `DicomConversion` value.
    used_real_prior
        Whether the model read a prior study's image rather than the current image twice.
    prior_retrieved_from
        AE title of the PACS the prior study was retrieved from, or None when the node
        received the prior itself. The Comparison section names it.
    failed_prior_query_ae_titles
        AE titles of the PACS where the query or retrieve of a prior failed or timed out. When
        no prior is given, the Comparison section states that an earlier study may exist there.
    """

    findings_text: str
    model_name: str
    checkpoint_sha256: str
    is_demo_checkpoint: bool
    dicom_conversion: str
    used_real_prior: bool
    prior_retrieved_from: str | None = None
    failed_prior_query_ae_titles: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceIdentity:
    """The node installation as the observer device of the SR (TID 1004).

    Attributes
    ----------
    device_uid
        Device Observer UID: a stable UID of this node installation.
    node_name, node_version
        Name and version of the node software, for example "libra-node" and "0.1.0".
    manufacturer
        Manufacturer written in the General Equipment module and the observer context.
    institution_name
        Institution Name of the General Equipment module, or None to leave it out.
    """

    device_uid: str
    node_name: str
    node_version: str
    manufacturer: str
    institution_name: str | None = None


class SRInputError(ValueError):
    """An input of `build_draft_sr` is invalid. The message names the UID and the fix."""


class InvalidUIDError(SRInputError):
    """A UID argument is not a valid DICOM UID."""


class CurrentEvidenceError(SRInputError):
    """The current evidence is empty, spans several studies or lacks the frontal image."""


class PriorStudyError(SRInputError):
    """The prior image is not a different study of the same patient, or the report disagrees."""


class ReportContentError(SRInputError):
    """The draft report, the device identity or the series attributes cannot be encoded."""


class PredecessorError(SRInputError):
    """The earlier SR named for a re-report is not an SR of the current study."""


def _parse_sr_class(sr_class: SRDocumentClass | str) -> SRDocumentClass:
    try:
        return SRDocumentClass(sr_class)
    except ValueError as exc:
        allowed = ", ".join(member.value for member in SRDocumentClass)
        raise ReportContentError(
            f"SR class {sr_class!r} is not supported: use one of {allowed}."
        ) from exc


def _check_uid(value: str, name: str) -> None:
    if not isinstance(value, str) or len(value) > 64 or not RE_VALID_UID.match(value):
        raise InvalidUIDError(
            f"{name} {value!r} is not a valid DICOM UID: pass digits and dots, "
            "at most 64 characters, for example from pydicom.uid.generate_uid()."
        )


def _check_positive_integer(value: int, name: str) -> None:
    # IS values are signed 32-bit integers (PS3.5 6.2), and series and instances count from 1.
    if not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise ReportContentError(
            f"{name} {value!r} is not a positive integer: pass a number from 1 to {2**31 - 1}."
        )


def _check_device(device: DeviceIdentity) -> None:
    _check_uid(device.device_uid, "device.device_uid")
    for field_name in ("node_name", "node_version", "manufacturer"):
        if not str(getattr(device, field_name)).strip():
            raise ReportContentError(
                f"device.{field_name} is empty: set it in the node configuration, because "
                "the SR names the node as its observer device."
            )
        _check_long_string(getattr(device, field_name), f"device.{field_name}")
    if device.institution_name is not None:
        _check_long_string(device.institution_name, "device.institution_name")


def _check_long_string(value: str, name: str) -> None:
    """Raise ReportContentError unless `value` is a valid LO value (PS3.5 6.2)."""
    if len(value) > LONG_STRING_MAX_CHARS or _LONG_STRING_FORBIDDEN.search(value):
        raise ReportContentError(
            f"{name} {value!r} is not a valid Long String (LO) value: use at most "
            f"{LONG_STRING_MAX_CHARS} characters and no backslash or control characters."
        )


def _check_report(report: DraftReport) -> DicomConversion:
    if not report.findings_text.strip():
        raise ReportContentError(
            f"The findings text from model {report.model_name!r} is empty: "
            "rerun the model stage rather than sending an empty draft."
        )
    control = _CONTROL_CHARACTER.search(report.findings_text)
    if control is not None:
        raise ReportContentError(
            f"The findings text contains control character U+{ord(control.group()):04X} at "
            f"offset {control.start()}, which DICOM text values do not allow: "
            "remove control characters other than TAB, LF, FF and CR from the model output."
        )
    if not report.model_name.strip():
        raise ReportContentError("report.model_name is empty: pass the model's name.")
    _check_long_string(report.model_name, "report.model_name")
    if not _SHA256_HEX.fullmatch(report.checkpoint_sha256):
        raise ReportContentError(
            f"Checkpoint hash {report.checkpoint_sha256!r} is not a SHA-256 hex digest: "
            "pass 64 lowercase hexadecimal digits."
        )
    try:
        return DicomConversion(report.dicom_conversion)
    except ValueError as exc:
        allowed = ", ".join(member.value for member in DicomConversion)
        raise ReportContentError(
            f"DICOM conversion {report.dicom_conversion!r} is unknown: use one of {allowed}."
        ) from exc


def _check_current_evidence(
    current_evidence: Sequence[pydicom.Dataset], current_frontal: pydicom.Dataset
) -> str:
    if len(current_evidence) == 0:
        raise CurrentEvidenceError(
            "current_evidence is empty: pass the headers of the current study's instances."
        )
    study_uids = sorted({str(dataset.StudyInstanceUID) for dataset in current_evidence})
    if len(study_uids) > 1:
        raise CurrentEvidenceError(
            f"current_evidence spans {len(study_uids)} studies ({', '.join(study_uids)}): "
            "pass the instances of one study only."
        )
    sop_instance_uids = {dataset.SOPInstanceUID for dataset in current_evidence}
    if current_frontal.SOPInstanceUID not in sop_instance_uids:
        raise CurrentEvidenceError(
            f"current_frontal {current_frontal.SOPInstanceUID} is not in current_evidence "
            f"of study {study_uids[0]}: pass the frontal image as one of the evidence "
            "instances."
        )
    return study_uids[0]


def _check_prior(
    prior_frontal: pydicom.Dataset | None,
    current_frontal: pydicom.Dataset,
    current_evidence: Sequence[pydicom.Dataset],
    report: DraftReport,
) -> None:
    if prior_frontal is None:
        if report.used_real_prior:
            raise PriorStudyError(
                f"report.used_real_prior is True for study {current_frontal.StudyInstanceUID}, "
                "but prior_frontal is None: pass the prior's header."
            )
        return
    if not report.used_real_prior:
        raise PriorStudyError(
            f"prior_frontal {prior_frontal.SOPInstanceUID} is given, but "
            "report.used_real_prior is False: pass prior_frontal=None."
        )
    if prior_frontal.StudyInstanceUID == current_frontal.StudyInstanceUID:
        raise PriorStudyError(
            f"prior_frontal {prior_frontal.SOPInstanceUID} belongs to the current study "
            f"{current_frontal.StudyInstanceUID}: pass an image of an earlier study."
        )
    if prior_frontal.SOPInstanceUID in {dataset.SOPInstanceUID for dataset in current_evidence}:
        raise PriorStudyError(
            f"prior_frontal {prior_frontal.SOPInstanceUID} is also in current_evidence: "
            "an image is either current or prior evidence, never both."
        )
    if _patient_identity(prior_frontal) != _patient_identity(current_frontal):
        raise PriorStudyError(
            f"Prior study {prior_frontal.StudyInstanceUID} has another Patient ID or Issuer "
            f"of Patient ID than current study {current_frontal.StudyInstanceUID}: pass a "
            "prior of the same patient, or None."
        )


def _patient_identity(dataset: pydicom.Dataset) -> tuple[str, str]:
    patient_id = str(dataset.get("PatientID", "") or "")
    return patient_id, str(dataset.get("IssuerOfPatientID", "") or "")


def _check_predecessor(
    predecessor: pydicom.Dataset | None, current_study_uid: str, sop_instance_uid: str
) -> None:
    if predecessor is None:
        return
    if predecessor.get("SOPClassUID") not in SR_STORAGE_SOP_CLASSES:
        raise PredecessorError(
            f"predecessor {predecessor.get('SOPInstanceUID')} has SOP Class "
            f"{predecessor.get('SOPClassUID')}, not a text SR: pass the earlier draft SR."
        )
    if predecessor.StudyInstanceUID != current_study_uid:
        raise PredecessorError(
            f"predecessor {predecessor.SOPInstanceUID} belongs to study "
            f"{predecessor.StudyInstanceUID}, not to {current_study_uid}: pass an earlier SR "
            "of the same study."
        )
    if predecessor.SOPInstanceUID == sop_instance_uid:
        raise PredecessorError(
            f"sop_instance_uid {sop_instance_uid} equals the predecessor's: a re-report needs "
            "a new SOP Instance UID."
        )


def _label_series_description(series_description: str, report: DraftReport) -> str:
    label = DEMO_SERIES_LABEL if report.is_demo_checkpoint else DRAFT_SERIES_LABEL
    description = series_description.strip()
    if label.lower() in description.lower():
        labelled = description
    elif description:
        labelled = f"{label}: {description}"
    else:
        labelled = label
    if len(labelled) > LONG_STRING_MAX_CHARS:
        room = LONG_STRING_MAX_CHARS - len(label) - 2
        raise ReportContentError(
            f"Series Description {labelled!r} has {len(labelled)} characters, more than the "
            f"{LONG_STRING_MAX_CHARS} that LO allows: shorten series_description to "
            f"{room} characters."
        )
    _check_long_string(labelled, "series_description")
    return labelled
