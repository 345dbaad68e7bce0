"""Coded concepts and the template identifier that the draft SR uses, with the tables that
map header values to them."""

from __future__ import annotations

from highdicom.sr import CodedConcept

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
