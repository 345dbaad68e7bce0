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
from collections.abc import Sequence

import highdicom
import pydicom
import structlog
from highdicom.enum import PatientSexValues
from highdicom.sr import ComprehensiveSR, EnhancedSR
from highdicom.sr.sop import _SR
from pydicom import config
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM, validate_value

from node.sr_basic_text import BasicTextSR
from node.sr_charset import (
    _restore_undecodable_values,
    _select_character_set,
    _undecodable_text_values,
)
from node.sr_codes import (
    BASELINE,
    COMMENT,
    CURRENT_PROCEDURE_DESCRIPTIONS,
    DEVICE_OBSERVER_MANUFACTURER,
    DEVICE_OBSERVER_MODEL_NAME,
    DEVICE_OBSERVER_NAME,
    DEVICE_OBSERVER_UID,
    FINDING,
    FINDINGS,
    PLAIN_CHEST_X_RAY,
    PREVIOUS_FINDINGS,
    PROCEDURE_REPORTED,
    PROCESSING_EQUIPMENT,
    SOURCE_IMAGE_FOR_PROCESSING,
)
from node.sr_content import _build_content_tree, _procedure_codes
from node.sr_inputs import (
    DEMO_SERIES_LABEL,
    DRAFT_SERIES_LABEL,
    CurrentEvidenceError,
    DeviceIdentity,
    DicomConversion,
    DraftReport,
    InvalidUIDError,
    PredecessorError,
    PriorStudyError,
    ReportContentError,
    SRDocumentClass,
    SRInputError,
    _check_current_evidence,
    _check_device,
    _check_positive_integer,
    _check_predecessor,
    _check_prior,
    _check_report,
    _check_uid,
    _label_series_description,
    _parse_sr_class,
)

__all__ = [
    "BASELINE",
    "COMMENT",
    "CURRENT_PROCEDURE_DESCRIPTIONS",
    "DEMO_SERIES_LABEL",
    "DEVICE_OBSERVER_MANUFACTURER",
    "DEVICE_OBSERVER_MODEL_NAME",
    "DEVICE_OBSERVER_NAME",
    "DEVICE_OBSERVER_UID",
    "DRAFT_SERIES_LABEL",
    "FINDING",
    "FINDINGS",
    "PLAIN_CHEST_X_RAY",
    "PREVIOUS_FINDINGS",
    "PROCEDURE_REPORTED",
    "PROCESSING_EQUIPMENT",
    "SOURCE_IMAGE_FOR_PROCESSING",
    "BasicTextSR",
    "CurrentEvidenceError",
    "DeviceIdentity",
    "DicomConversion",
    "DraftReport",
    "InvalidUIDError",
    "PredecessorError",
    "PriorStudyError",
    "ReportContentError",
    "SRDocumentClass",
    "SRInputError",
    "build_draft_sr",
]

log = structlog.get_logger(__name__)

COMPLETION_FLAG_DESCRIPTION = "AI draft for radiologist review, not verified"
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
