"""Build the TID 2000 content tree of the draft SR from the image headers and the draft report.

The tree contains the document title, the procedure and observation context and the sections
Current Procedure Descriptions, Previous Findings and Findings. Its log events keep the
`sr_builder.` prefix of the SR building stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
import structlog
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    RelationshipTypeValues,
    TextContentItem,
    UIDRefContentItem,
)

from node.sr_codes import (
    ACQUISITION_DEVICE_TYPE,
    ACQUISITION_DEVICE_TYPE_BY_MODALITY,
    BASELINE,
    BASIC_DIAGNOSTIC_IMAGING_REPORT_TEMPLATE,
    CHEST,
    CHEST_REGION_CODE_VALUES,
    COMMENT,
    CURRENT_PROCEDURE_DESCRIPTIONS,
    DEVICE_OBSERVER_MANUFACTURER,
    DEVICE_OBSERVER_MODEL_NAME,
    DEVICE_OBSERVER_NAME,
    DEVICE_OBSERVER_UID,
    DIAGNOSTIC_IMAGING_REPORT,
    ENGLISH_UNITED_STATES,
    FINDING,
    FINDINGS,
    LANGUAGE_OF_CONTENT,
    OBSERVER_TYPE,
    OBSERVER_TYPE_DEVICE,
    PLAIN_CHEST_X_RAY,
    PREVIOUS_FINDINGS,
    PROCEDURE_DESCRIPTION,
    PROCEDURE_REPORTED,
    SOURCE_IMAGE_FOR_PROCESSING,
    TARGET_REGION,
)
from node.sr_inputs import DeviceIdentity, DicomConversion, DraftReport

log = structlog.get_logger(__name__)

VIEW_POSITION_NAMES = {
    "PA": "posteroanterior (PA)",
    "AP": "anteroposterior (AP)",
    "LL": "left lateral (LL)",
    "RL": "right lateral (RL)",
    "LATERAL": "lateral",
    "LLD": "left lateral decubitus (LLD)",
    "RLD": "right lateral decubitus (RLD)",
}


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
