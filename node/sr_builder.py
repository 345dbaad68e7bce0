"""Wrap the Libra draft findings in a DICOM Structured Report, built with highdicom.

Promise: every SR that `build_draft_sr` returns is marked as an unverified, preliminary and
partial AI draft and follows the structure of TID 2000 "Basic Diagnostic Imaging Report". It
carries the current study's patient and study attributes unchanged, lists the current images
as current evidence and the prior image as other pertinent evidence, and uses a Specific
Character Set that can encode all of its text.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

import highdicom
import pydicom
import structlog
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    EnhancedSR,
    ImageContentItem,
    RelationshipTypeValues,
    TextContentItem,
    UIDRefContentItem,
)
from highdicom.enum import PatientSexValues
from highdicom.sr.sop import _SR
from highdicom.sr.utils import find_content_items
from pydicom import config
from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.uid import (
    RE_VALID_UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
)
from pydicom.valuerep import DA, TM, PersonName, validate_value

log = structlog.get_logger(__name__)

# Coded concepts of the content tree, named once. Sources: PS3.16 TID 2000 and its included
# templates (TID 1204, 1002, 1004, 2002, 2001) and the context groups they name.
DIAGNOSTIC_IMAGING_REPORT = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
PROCEDURE_REPORTED = CodedConcept("121058", "DCM", "Procedure reported")
ACQUISITION_DEVICE_TYPE = CodedConcept("122142", "DCM", "Acquisition Device Type")
TARGET_REGION = CodedConcept("123014", "DCM", "Target Region")
LANGUAGE_OF_CONTENT = CodedConcept("121049", "DCM", "Language of Content Item and Descendants")
ENGLISH_UNITED_STATES = CodedConcept("en-US", "RFC5646", "English (United States)")
OBSERVER_TYPE = CodedConcept("121005", "DCM", "Observer Type")
OBSERVER_TYPE_DEVICE = CodedConcept("121007", "DCM", "Device")
DEVICE_OBSERVER_UID = CodedConcept("121012", "DCM", "Device Observer UID")
DEVICE_OBSERVER_NAME = CodedConcept("121013", "DCM", "Device Observer Name")
DEVICE_OBSERVER_MANUFACTURER = CodedConcept("121014", "DCM", "Device Observer Manufacturer")
DEVICE_OBSERVER_MODEL_NAME = CodedConcept("121015", "DCM", "Device Observer Model Name")
CURRENT_PROCEDURE_DESCRIPTIONS = CodedConcept("55111-9", "LN", "Current Procedure Descriptions")
PREVIOUS_FINDINGS = CodedConcept("18834-2", "LN", "Previous Findings")
FINDINGS = CodedConcept("59776-5", "LN", "Findings")
PROCEDURE_DESCRIPTION = CodedConcept("121065", "DCM", "Procedure Description")
FINDING = CodedConcept("121071", "DCM", "Finding")
COMMENT = CodedConcept("121106", "DCM", "Comment")
BASELINE = CodedConcept("121079", "DCM", "Baseline")
SOURCE_IMAGE_FOR_PROCESSING = CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)
PROCESSING_EQUIPMENT = CodedConcept("109102", "DCM", "Processing Equipment")
CHEST = CodedConcept("816094009", "SCT", "Chest")
PLAIN_CHEST_X_RAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
"""Procedure reported when the study has no Procedure Code Sequence."""

ACQUISITION_DEVICE_TYPE_BY_MODALITY = {
    "CR": CodedConcept("CR", "DCM", "Computed Radiography"),
    "DX": CodedConcept("DX", "DCM", "Digital Radiography"),
}
# Anatomic Region Sequence codes that mean the chest: the current SNOMED CT code and the
# inactive one that older modalities still send.
CHEST_REGION_CODE_VALUES = frozenset({"816094009", "43799004"})

BASIC_DIAGNOSTIC_IMAGING_REPORT_TEMPLATE = "2000"
LONG_STRING_MAX_CHARS = 64
"""Maximum length of a Long String (LO) value such as Series Description (PS3.5 6.2)."""

DRAFT_SERIES_LABEL = "Unverified AI draft"
DEMO_SERIES_LABEL = "Meaningless demo AI draft"
COMPLETION_FLAG_DESCRIPTION = "AI draft for radiologist review, not verified"
UTF8_CHARACTER_SET = "ISO_IR 192"
SR_STORAGE_SOP_CLASSES = frozenset(
    {BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage}
)

VIEW_POSITION_NAMES = {
    "PA": "posteroanterior (PA)",
    "AP": "anteroposterior (AP)",
    "LL": "left lateral (LL)",
    "RL": "right lateral (RL)",
    "LATERAL": "lateral",
    "LLD": "left lateral decubitus (LLD)",
    "RLD": "right lateral decubitus (RLD)",
}

# DICOM text values (ST, LT, UT) may contain graphic characters and the control characters
# TAB, LF, FF and CR (PS3.5 6.1.2 and 6.2). This matches every other control character.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_LONG_STRING_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DEFAULT_REPERTOIRE_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
# Type 3 attributes of the Patient Study module (PS3.3 C.7.2.2) whose values have a format
# that a source can violate.
_OPTIONAL_PATIENT_STUDY_KEYWORDS = (
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "LastMenstrualDate",
)
# Type 2 attributes that highdicom reads from the first evidence instance without a default.
_TYPE_2_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# Type 2 attributes that highdicom 0.28 converts (to DA, TM or its PatientSexValues enum), so
# that a source value invalid for them would stop the SR from being built.
_CONVERTED_TYPE_2_KEYWORDS = {
    "PatientBirthDate": DA,
    "PatientSex": PatientSexValues,
    "StudyDate": DA,
    "StudyTime": TM,
}


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


class BasicTextSR(_SR):
    """Basic Text SR document (PS3.3 A.35.1), a class that highdicom 0.28 does not provide.

    Basic Text SR allows no NUM, SCOORD, SCOORD3D or TCOORD content items and no by-reference
    relationships (PS3.3 A.35.1.3.1). The constructor rejects such content and otherwise
    behaves as `highdicom.sr.EnhancedSR`, whose keyword parameters it takes.

    NOTE: this derives from highdicom's private `_SR` base, checked against highdicom 0.28.2.
    """

    def __init__(self, evidence, content, **kwargs) -> None:
        root = content if isinstance(content, pydicom.Dataset) else content[0]
        for value_type in ("NUM", "SCOORD", "SCOORD3D", "TCOORD"):
            if find_content_items(root, value_type=value_type, recursive=True):
                raise ValueError(
                    f"Basic Text SR does not allow {value_type} content items: "
                    "remove them or write an Enhanced or Comprehensive SR."
                )
        if any("ReferencedContentItemIdentifier" in item for item in _walk_datasets(root)):
            raise ValueError(
                "Basic Text SR does not allow by-reference relationships: include the "
                "target content item by value or write a Comprehensive SR."
            )
        super().__init__(
            evidence=evidence, content=content, sop_class_uid=BasicTextSRStorage, **kwargs
        )


_SR_CLASSES: dict[SRDocumentClass, type[_SR]] = {
    SRDocumentClass.ENHANCED: EnhancedSR,
    SRDocumentClass.COMPREHENSIVE: ComprehensiveSR,
    SRDocumentClass.BASIC_TEXT: BasicTextSR,
}


def build_draft_sr(
    current_evidence: Sequence[pydicom.Dataset],
    current_frontal: pydicom.Dataset,
    prior_frontal: pydicom.Dataset | None,
    report: DraftReport,
    device: DeviceIdentity,
    *,
    sr_class: SRDocumentClass | str = SRDocumentClass.ENHANCED,
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    sop_instance_uid: str,
    instance_number: int = 1,
    predecessor: pydicom.Dataset | None = None,
    content_datetime: datetime.datetime | None = None,
) -> pydicom.Dataset:
    """Build the SR document that carries one draft findings text.

    The content tree follows TID 2000: document title, procedure reported, acquisition device
    type and target region, language, the device observer context, and the sections Current
    Procedure Descriptions, Previous Findings (the comparison) and Findings. The Findings
    section starts with a statement that the text is an unverified AI draft. The same tree is
    written for every SR class, because all its value types and relationships are allowed
    in Basic Text SR too.

    Parameters
    ----------
    current_evidence
        Headers of every instance of the current study that the node received; pixel data
        is not needed. They are listed in the Current Requested Procedure Evidence Sequence.
    current_frontal
        The instance of `current_evidence` that the model read. The Patient, General Study
        and Patient Study attributes are copied from it, and so is its Specific Character
        Set unless some text of the SR needs ISO_IR 192 (UTF-8). Pass it as read from
        the file: a value whose bytes do not decode under the declared character set is
        copied byte for byte only while its element is not yet decoded.
    prior_frontal
        Header of the prior study's frontal image that the model read, listed in the
        Pertinent Other Evidence Sequence; None when no prior study was available.
    report
        The generated findings text and the model that wrote it.
    device
        The node installation, recorded as the observer device and contributing equipment.
    sr_class
        SR IOD to write (default Enhanced SR).
    series_instance_uid, series_number
        Series Instance UID and Series Number of the SR series.
    series_description
        Series Description of the SR series. The builder prefixes the AI-draft label unless
        the value already contains it; the result must fit in 64 characters.
    sop_instance_uid, instance_number
        SOP Instance UID and Instance Number of the new SR; a re-report needs a new UID.
    predecessor
        An earlier SR of the same study that this one replaces. It is named in the
        Predecessor Documents Sequence.
    content_datetime
        Content Date and Time; the current local time when None. A timezone-aware value
        is converted to the source's Timezone Offset From UTC when the source has one,
        which the SR then copies. A naive value is written as given.

    Returns
    -------
    pydicom.Dataset
        The SR document (a highdicom SOP class instance) with Explicit VR Little Endian file
        meta information, ready for ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    InvalidUIDError
        When `series_instance_uid`, `sop_instance_uid` or the device UID is not a valid UID.
    CurrentEvidenceError
        When `current_evidence` is empty, spans several studies, or does not contain
        `current_frontal`.
    PriorStudyError
        When `prior_frontal` belongs to the current study or to another patient identity
        (Patient ID plus Issuer of Patient ID), or when `report.used_real_prior` disagrees
        with the presence of `prior_frontal`.
    ReportContentError
        When the findings text is empty or contains control characters, the checkpoint hash
        is not 64 lowercase hex digits, or the DICOM conversion or SR class is unknown. Also
        when a device field is empty, when a Long String value (device fields, model name,
        the labelled Series Description) exceeds 64 characters or contains a backslash, or
        when `series_number` or `instance_number` is not a positive integer.
    PredecessorError
        When `predecessor` is not an SR of the current study or has `sop_instance_uid`.
    """
    # Read before any check decodes an element, because decoding replaces invalid bytes.
    undecodable_values = _undecodable_text_values(current_frontal)
    sr_document_class = _parse_sr_class(sr_class)
    _check_uid(series_instance_uid, "series_instance_uid")
    _check_uid(sop_instance_uid, "sop_instance_uid")
    _check_positive_integer(series_number, "series_number")
    _check_positive_integer(instance_number, "instance_number")
    _check_device(device)
    conversion = _check_report(report)
    current_study_uid = _check_current_evidence(current_evidence, current_frontal)
    _check_prior(prior_frontal, current_frontal, current_evidence, report)
    _check_predecessor(predecessor, current_study_uid, sop_instance_uid)
    full_series_description = _label_series_description(series_description, report)

    # Work on private copies without pixel data: highdicom adds the source's data elements
    # to the SR by reference, and pydicom caches encoded person names on the element value.
    frontal_header = _header_copy(current_frontal)
    for keyword in _TYPE_2_STUDY_KEYWORDS:
        if keyword not in frontal_header:
            setattr(frontal_header, keyword, None)
    _empty_unconvertible_type_2_values(frontal_header)
    other_current_headers = [
        _header_copy(dataset)
        for dataset in current_evidence
        if dataset.SOPInstanceUID != current_frontal.SOPInstanceUID
    ]
    prior_header = _header_copy(prior_frontal) if prior_frontal is not None else None
    evidence = [frontal_header, *other_current_headers]
    if prior_header is not None:
        evidence.append(prior_header)

    procedure_codes = _procedure_codes(frontal_header)
    content = _build_content_tree(
        frontal_header, [frontal_header, *other_current_headers], prior_header, report,
        device, conversion, procedure_codes,
    )
    source_timezone = _source_timezone(frontal_header)
    content_datetime = _content_datetime(content_datetime, source_timezone)

    sr = _SR_CLASSES[sr_document_class](
        evidence=evidence,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.node_name,
        software_versions=device.node_version,
        institution_name=device.institution_name,
        is_complete=False,
        is_verified=False,
        is_final=False,
        performed_procedure_codes=procedure_codes,
        previous_versions=[predecessor] if predecessor is not None else None,
        record_evidence=True,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=_contributing_equipment(device, report, conversion),
        series_description=full_series_description,
        content_date=content_datetime.date(),
        content_time=content_datetime.time(),
        series_date=content_datetime.date(),
        series_time=content_datetime.time(),
        # _select_character_set sets Specific Character Set below. highdicom 0.28 rejects
        # code extension values such as ["", "ISO 2022 IR 87"] that PS3.3 C.12.1.1.2 allows.
        specific_character_set=None,
    )
    sr.CompletionFlagDescription = COMPLETION_FLAG_DESCRIPTION
    _drop_invalid_optional_attributes(sr, frontal_header.SOPInstanceUID)
    if source_timezone is not None:
        # The offset applies to every date and time of the SR, so the creation time that
        # highdicom took from the local clock is restated in the source's zone.
        sr.TimezoneOffsetFromUTC = frontal_header.TimezoneOffsetFromUTC
        created = _content_datetime(None, source_timezone)
        sr.InstanceCreationDate = created.strftime("%Y%m%d")
        sr.InstanceCreationTime = created.strftime("%H%M%S.%f")
    _select_character_set(sr, frontal_header)
    _restore_undecodable_values(sr, frontal_header, undecodable_values)

    log.info(
        "sr_builder.sr_built",
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=current_study_uid,
        sop_class_uid=sr.SOPClassUID,
        specific_character_set=sr.get("SpecificCharacterSet"),
        has_prior=prior_frontal is not None,
        predecessor_sop_instance_uid=(
            predecessor.SOPInstanceUID if predecessor is not None else None
        ),
    )
    return sr


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


def _header_copy(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """Return a deep copy of `dataset` without the pixel data group (7FE0)."""
    header = pydicom.Dataset()
    for element in dataset:
        if element.tag.group != 0x7FE0:
            header.add(copy.deepcopy(element))
    return header


def _empty_unconvertible_type_2_values(frontal_header: pydicom.Dataset) -> None:
    """Empty the Type 2 values that highdicom cannot convert, such as a Patient's Birth Date
    of "1943-11-07" (DA needs "19431107"). Type 2 allows an empty value, and the SR is still
    built; the warning names the attribute but not its value."""
    for keyword, convert in _CONVERTED_TYPE_2_KEYWORDS.items():
        element = frontal_header[keyword]
        if element.is_empty:
            continue
        try:
            convert(str(element.value))
        except ValueError:
            element.value = None
            log.warning(
                "sr_builder.invalid_attribute_emptied",
                keyword=keyword,
                source_sop_instance_uid=frontal_header.SOPInstanceUID,
            )


def _drop_invalid_optional_attributes(sr: pydicom.Dataset, source_sop_instance_uid: str) -> None:
    """Leave out copied Patient Study values that are invalid for their VR, such as a
    Patient's Age of "62" (AS needs "062Y"), because they are optional and dciodvfy rejects
    them. Every other patient and study attribute stays exactly as received."""
    for keyword in _OPTIONAL_PATIENT_STUDY_KEYWORDS:
        if keyword not in sr or sr[keyword].is_empty:
            continue
        element = sr[keyword]
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                validate_value(element.VR, str(value), config.RAISE)
        except ValueError:
            del sr[keyword]
            log.warning(
                "sr_builder.invalid_attribute_dropped",
                keyword=keyword,
                sop_instance_uid=sr.SOPInstanceUID,
                source_sop_instance_uid=source_sop_instance_uid,
            )


def _procedure_codes(frontal_header: pydicom.Dataset) -> list[CodedConcept]:
    codes = []
    for item in frontal_header.get("ProcedureCodeSequence", []):
        try:
            codes.append(CodedConcept.from_dataset(item))
        except (AttributeError, ValueError, TypeError) as exc:
            log.warning(
                "sr_builder.procedure_code_skipped",
                study_instance_uid=frontal_header.StudyInstanceUID,
                error=str(exc),
            )
    return codes or [PLAIN_CHEST_X_RAY]


def _is_chest(frontal_header: pydicom.Dataset) -> bool:
    if str(frontal_header.get("BodyPartExamined", "")).upper() == "CHEST":
        return True
    return any(
        item.get("CodeValue") in CHEST_REGION_CODE_VALUES
        for item in frontal_header.get("AnatomicRegionSequence", [])
    )


def _source_timezone(frontal_header: pydicom.Dataset) -> datetime.tzinfo | None:
    """Return the source's Timezone Offset From UTC, or None when it is absent or invalid."""
    offset = str(frontal_header.get("TimezoneOffsetFromUTC", "") or "").strip()
    if not offset:
        return None
    try:
        return datetime.datetime.strptime(offset, "%z").tzinfo
    except ValueError:
        log.warning(
            "sr_builder.timezone_offset_ignored",
            sop_instance_uid=frontal_header.SOPInstanceUID,
            timezone_offset_from_utc=offset,
        )
        return None


def _content_datetime(
    content_datetime: datetime.datetime | None, source_timezone: datetime.tzinfo | None
) -> datetime.datetime:
    if content_datetime is None:
        content_datetime = datetime.datetime.now().astimezone()
    if content_datetime.tzinfo is not None and source_timezone is not None:
        content_datetime = content_datetime.astimezone(source_timezone)
    return content_datetime


def _build_content_tree(
    frontal_header: pydicom.Dataset,
    current_headers: Sequence[pydicom.Dataset],
    prior_header: pydicom.Dataset | None,
    report: DraftReport,
    device: DeviceIdentity,
    conversion: DicomConversion,
    procedure_codes: Sequence[CodedConcept],
) -> ContainerContentItem:
    has_concept_mod = RelationshipTypeValues.HAS_CONCEPT_MOD
    has_obs_context = RelationshipTypeValues.HAS_OBS_CONTEXT
    items = [
        CodeContentItem(PROCEDURE_REPORTED, code, relationship_type=has_concept_mod)
        for code in procedure_codes
    ]
    device_type = ACQUISITION_DEVICE_TYPE_BY_MODALITY.get(frontal_header.get("Modality"))
    if device_type is not None:
        items.append(
            CodeContentItem(ACQUISITION_DEVICE_TYPE, device_type, relationship_type=has_concept_mod)
        )
    if _is_chest(frontal_header):
        items.append(CodeContentItem(TARGET_REGION, CHEST, relationship_type=has_concept_mod))
    items += [
        CodeContentItem(
            LANGUAGE_OF_CONTENT, ENGLISH_UNITED_STATES, relationship_type=has_concept_mod
        ),
        CodeContentItem(OBSERVER_TYPE, OBSERVER_TYPE_DEVICE, relationship_type=has_obs_context),
        UIDRefContentItem(
            DEVICE_OBSERVER_UID, device.device_uid, relationship_type=has_obs_context
        ),
        TextContentItem(
            DEVICE_OBSERVER_NAME,
            f"{device.node_name} {device.node_version}",
            relationship_type=has_obs_context,
        ),
        TextContentItem(
            DEVICE_OBSERVER_MANUFACTURER, device.manufacturer, relationship_type=has_obs_context
        ),
        TextContentItem(
            DEVICE_OBSERVER_MODEL_NAME,
            f"{report.model_name} (checkpoint SHA-256 {report.checkpoint_sha256})",
            relationship_type=has_obs_context,
        ),
        _section(
            CURRENT_PROCEDURE_DESCRIPTIONS,
            [
                TextContentItem(
                    PROCEDURE_DESCRIPTION,
                    _procedure_description(
                        current_headers, frontal_header, prior_header, conversion
                    ),
                    relationship_type=RelationshipTypeValues.CONTAINS,
                ),
                _image_item(SOURCE_IMAGE_FOR_PROCESSING, frontal_header),
            ],
        ),
        _section(PREVIOUS_FINDINGS, _comparison_items(prior_header, report)),
        _section(
            FINDINGS,
            [
                TextContentItem(
                    COMMENT,
                    _draft_statement(report),
                    relationship_type=RelationshipTypeValues.CONTAINS,
                ),
                TextContentItem(
                    FINDING, report.findings_text, relationship_type=RelationshipTypeValues.CONTAINS
                ),
            ],
        ),
    ]
    root = ContainerContentItem(
        DIAGNOSTIC_IMAGING_REPORT,
        is_content_continuous=False,
        template_id=BASIC_DIAGNOSTIC_IMAGING_REPORT_TEMPLATE,
    )
    root.ContentSequence = ContentSequence(items)
    return root


def _section(heading: CodedConcept, items: list) -> ContainerContentItem:
    section = ContainerContentItem(
        heading, is_content_continuous=False, relationship_type=RelationshipTypeValues.CONTAINS
    )
    section.ContentSequence = ContentSequence(items)
    return section


def _image_item(purpose: CodedConcept, header: pydicom.Dataset) -> ImageContentItem:
    return ImageContentItem(
        purpose,
        referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=header.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def _draft_statement(report: DraftReport) -> str:
    statement = (
        f"AI-generated draft: the findings below were written by the machine-learning model "
        f"{report.model_name}. No radiologist has reviewed or verified them. Do not use them "
        "for diagnosis before a radiologist has verified the report."
    )
    if report.is_demo_checkpoint:
        statement += (
            " This report comes from a demo checkpoint with random weights, so the findings "
            "text is meaningless demo output."
        )
    return statement


def _comparison_items(prior_header: pydicom.Dataset | None, report: DraftReport) -> list:
    contains = RelationshipTypeValues.CONTAINS
    if prior_header is None:
        text = "No prior chest study of this patient was available for comparison."
        if report.failed_prior_query_ae_titles:
            text += (
                f" The search for an earlier study at PACS {', '.join(report.failed_prior_query_ae_titles)} "
                "failed, so an earlier study may exist there."
            )
        text += (
            " The model was given the current image in place of a prior image, so the draft "
            "cannot describe change over time."
        )
        return [TextContentItem(COMMENT, text, relationship_type=contains)]
    accession_number = str(prior_header.get("AccessionNumber", "") or "").strip()
    if accession_number:
        study_name = f"accession number {accession_number}"
    else:
        study_name = f"Study Instance UID {prior_header.StudyInstanceUID}"
    text = (
        f"Compared with the prior chest study of {_study_datetime_text(prior_header)} "
        f"({study_name}). The model read its {_view_name(prior_header)} image."
    )
    if report.prior_retrieved_from:
        text += f" The node retrieved this prior study from PACS {report.prior_retrieved_from}."
    return [
        TextContentItem(COMMENT, text, relationship_type=contains),
        _image_item(BASELINE, prior_header),
    ]


def _procedure_description(
    current_headers: Sequence[pydicom.Dataset],
    frontal_header: pydicom.Dataset,
    prior_header: pydicom.Dataset | None,
    conversion: DicomConversion,
) -> str:
    views = sorted({_view_name(header, "view not recorded") for header in current_headers})
    count = len(current_headers)
    text = (
        f"Chest radiograph study of {_study_datetime_text(frontal_header)} with {count} "
        f"image{'s' if count != 1 else ''}. Views: {', '.join(views)}. The draft was generated "
        f"from the {_view_name(frontal_header)} image of this study"
    )
    if prior_header is not None:
        text += f" and the {_view_name(prior_header)} image of the prior study"
    if conversion is DicomConversion.MIMIC:
        method = "the MIMIC-CXR-JPG conversion that made the model's training images"
    else:
        method = "the DICOM conversion of the released Libra code"
    return f"{text}. The pixel data were converted for the model with {method}."


def _view_name(header: pydicom.Dataset, unrecorded: str = "frontal") -> str:
    """Name the View Position of `header` in words, or return `unrecorded` when it is empty."""
    view_position = str(header.get("ViewPosition", "") or "").strip().upper()
    if not view_position:
        return unrecorded
    return VIEW_POSITION_NAMES.get(view_position, view_position)


def _study_datetime_text(header: pydicom.Dataset) -> str:
    study_date = str(header.get("StudyDate", "") or "")
    if len(study_date) != 8:
        return "unknown date"
    text = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    study_time = str(header.get("StudyTime", "") or "")
    if len(study_time) >= 4:
        text += f" {study_time[:2]}:{study_time[2:4]}"
    return text


def _contributing_equipment(
    device: DeviceIdentity, report: DraftReport, conversion: DicomConversion
) -> list[highdicom.ContributingEquipment]:
    node = highdicom.ContributingEquipment(
        manufacturer=device.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=device.node_name,
        software_versions=device.node_version,
        institution_name=device.institution_name,
        contribution_description="Built this SR document around the model's draft findings.",
    )
    model = highdicom.ContributingEquipment(
        manufacturer=device.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=report.model_name,
        institution_name=device.institution_name,
        contribution_description=(
            f"Wrote the draft findings text with checkpoint SHA-256 {report.checkpoint_sha256} "
            f"from pixel data converted with the '{conversion.value}' method."
        ),
    )
    return [node, model]


def _select_character_set(sr: pydicom.Dataset, frontal_header: pydicom.Dataset) -> None:
    """Copy the source's Specific Character Set, or use UTF-8 if some text needs it.

    A source without Specific Character Set uses the default repertoire (ASCII). pydicom
    decodes and encodes such values as Latin-1, so the check uses ASCII instead.
    """
    source_character_set = frontal_header.get("SpecificCharacterSet")
    codecs = _python_codecs(source_character_set)
    if codecs is not None and all(_fits(text, codecs) for text in _text_values(sr)):
        if source_character_set is not None:
            sr.add(copy.deepcopy(frontal_header["SpecificCharacterSet"]))
        return
    sr.SpecificCharacterSet = UTF8_CHARACTER_SET
    # A PersonName keeps the bytes it was first encoded to and reuses them when it has no
    # encodings of its own, so each name is rebuilt from its text to be encoded as UTF-8.
    for dataset in _walk_datasets(sr):
        for element in dataset:
            if element.VR == "PN" and not element.is_empty:
                if element.VM > 1:
                    element.value = [PersonName(str(name)) for name in element.value]
                else:
                    element.value = PersonName(str(element.value))
    log.info(
        "sr_builder.character_set_changed",
        sop_instance_uid=sr.SOPInstanceUID,
        source_character_set=source_character_set,
        specific_character_set=UTF8_CHARACTER_SET,
    )


def _undecodable_text_values(dataset: pydicom.Dataset) -> dict[BaseTag, bytes]:
    """Return the raw bytes of the top-level text values that do not decode under the data
    set's Specific Character Set.

    pydicom decodes such a value with replacement characters and keeps only the re-encoded
    text, so the bytes are read from elements that are not yet decoded. Elements decoded
    before the call are skipped.
    """
    character_set = dataset.get("SpecificCharacterSet")
    if _python_codecs(character_set) is None:
        return {}
    # The codecs pydicom decodes with, which for the default repertoire is Latin-1.
    codecs = convert_encodings(character_set or "")
    # NOTE: values under ISO 2022 code extensions (several Defined Terms) are not checked,
    # so invalid bytes there are still replaced in the SR.
    if len(codecs) != 1:
        return {}
    undecodable = {}
    for tag in dataset.keys():
        element = dataset.get_item(tag)
        if not isinstance(element, RawDataElement) or not element.value:
            continue
        try:
            value_representation = element.VR or dictionary_VR(tag)
        except KeyError:
            continue
        if value_representation not in _TEXT_VRS:
            continue
        try:
            element.value.decode(codecs[0])
        except UnicodeDecodeError:
            undecodable[tag] = element.value
    return undecodable


def _restore_undecodable_values(
    sr: pydicom.Dataset, frontal_header: pydicom.Dataset, undecodable_values: dict[BaseTag, bytes]
) -> None:
    """Write the source's own bytes for copied values that pydicom could not decode.

    This happens only while the SR keeps the source's Specific Character Set. Under
    ISO_IR 192 the invalid bytes cannot be carried, so the value keeps its replacement
    characters and a warning names the attribute.
    """
    character_set_kept = sr.get("SpecificCharacterSet") == frontal_header.get("SpecificCharacterSet")
    for tag, raw_value in undecodable_values.items():
        if tag not in sr or tag not in frontal_header:
            continue
        element = sr[tag]
        if str(element.value) != str(frontal_header[tag].value):
            # The SR has its own value for this attribute, such as its Series Description.
            continue
        context = {
            "keyword": element.keyword,
            "sop_instance_uid": sr.SOPInstanceUID,
            "source_sop_instance_uid": frontal_header.SOPInstanceUID,
            "source_character_set": frontal_header.get("SpecificCharacterSet"),
        }
        if character_set_kept:
            sr[tag] = pydicom.DataElement(tag, element.VR, raw_value)
            log.warning("sr_builder.undecodable_value_copied", **context)
        else:
            log.warning("sr_builder.undecodable_value_replaced", **context)


def _python_codecs(character_set: str | Sequence[str] | None) -> list[str] | None:
    """Return Python codecs for the Defined Terms, or None if one of them is unknown."""
    if character_set is None:
        terms = [""]
    elif isinstance(character_set, str):
        terms = [character_set]
    else:
        terms = list(character_set) or [""]
    codecs = []
    for term in terms:
        term = term.strip()
        if term in _DEFAULT_REPERTOIRE_TERMS:
            codecs.append("ascii")
        elif term in python_encoding:
            codecs.append(python_encoding[term])
        else:
            return None
    return codecs


def _fits(text: str, codecs: Sequence[str]) -> bool:
    """Return whether `text` encodes under the character sets, switching between them per
    character as ISO 2022 code extension allows when there are several."""
    if any(_encodes(text, codec) for codec in codecs):
        return True
    if len(codecs) == 1:
        return False
    return all(any(_encodes(character, codec) for codec in codecs) for character in text)


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeError:
        return False
    return True


def _text_values(dataset: pydicom.Dataset) -> Iterator[str]:
    for item in _walk_datasets(dataset):
        for element in item:
            if element.VR not in _TEXT_VRS or element.is_empty:
                continue
            values = element.value if element.VM > 1 else [element.value]
            for value in values:
                yield str(value)


def _walk_datasets(dataset: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    yield dataset
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk_datasets(item)
