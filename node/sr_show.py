"""Print a DICOM SR document as readable text for administrators (`libra-node sr show FILE`).

The output contains patient names and IDs, because an admin reads it to check a file. Do not
write it to logs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

INDENT = "  "
TEXT_BLOCK_PREFIX = "| "

_DOCUMENT_ATTRIBUTES = (
    ("SOP Instance UID", "SOPInstanceUID"),
    ("Completion Flag", "CompletionFlag"),
    ("Completion Flag Description", "CompletionFlagDescription"),
    ("Verification Flag", "VerificationFlag"),
    ("Preliminary Flag", "PreliminaryFlag"),
    ("Specific Character Set", "SpecificCharacterSet"),
    ("Patient Name", "PatientName"),
    ("Patient ID", "PatientID"),
    ("Issuer of Patient ID", "IssuerOfPatientID"),
    ("Patient Birth Date", "PatientBirthDate"),
    ("Patient Sex", "PatientSex"),
    ("Study Instance UID", "StudyInstanceUID"),
    ("Accession Number", "AccessionNumber"),
    ("Study Date", "StudyDate"),
    ("Study Time", "StudyTime"),
    ("Study Description", "StudyDescription"),
    ("Series Instance UID", "SeriesInstanceUID"),
    ("Series Number", "SeriesNumber"),
    ("Series Description", "SeriesDescription"),
    ("Instance Number", "InstanceNumber"),
    ("Content Date", "ContentDate"),
    ("Content Time", "ContentTime"),
    ("Manufacturer", "Manufacturer"),
)

_EVIDENCE_SEQUENCES = (
    ("Predecessor Documents", "PredecessorDocumentsSequence"),
    ("Current Requested Procedure Evidence", "CurrentRequestedProcedureEvidenceSequence"),
    ("Pertinent Other Evidence", "PertinentOtherEvidenceSequence"),
)


def format_sr_tree(dataset: pydicom.Dataset) -> str:
    """Format an SR document's attributes, evidence and content tree as indented text.

    Each content item becomes one line: relationship type, value type, concept name meaning
    and value. Multi-line TEXT values follow on lines that start with ``"| "``.

    Parameters
    ----------
    dataset
        An SR document of any SR SOP class, as read by `pydicom.dcmread`.

    Returns
    -------
    str
        The text, ending without a newline.

    Raises
    ------
    ValueError
        When `dataset` has no root CONTAINER content item, so it is not an SR document.
    """
    if dataset.get("ValueType") != "CONTAINER" or "ContentSequence" not in dataset:
        raise ValueError(
            f"Instance {dataset.get('SOPInstanceUID', '(no SOP Instance UID)')} is not an SR "
            "document, because it has no root CONTAINER content item: pass an SR file."
        )
    sop_class_uid = UID(str(dataset.get("SOPClassUID", "")))
    lines = [f"SR document: {sop_class_uid.name} ({sop_class_uid})"]
    for label, keyword in _DOCUMENT_ATTRIBUTES:
        if keyword in dataset:
            lines.append(f"{INDENT}{label}: {_attribute_text(dataset, keyword)}")
    for label, keyword in _EVIDENCE_SEQUENCES:
        lines += _evidence_lines(label, dataset.get(keyword))
    lines.append("")
    lines.append("Content tree:")
    lines += _content_item_lines(dataset, depth=0)
    return "\n".join(lines)


def _attribute_text(dataset: pydicom.Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(part) for part in value)
    return str(value)


def _evidence_lines(label: str, sequence: Sequence[pydicom.Dataset] | None) -> list[str]:
    if not sequence:
        return [f"{INDENT}{label}: none"]
    lines = [f"{INDENT}{label}:"]
    for study in sequence:
        lines.append(f"{INDENT * 2}study {study.get('StudyInstanceUID', '(no UID)')}")
        for series in study.get("ReferencedSeriesSequence", []):
            lines.append(f"{INDENT * 3}series {series.get('SeriesInstanceUID', '(no UID)')}")
            for instance in series.get("ReferencedSOPSequence", []):
                lines.append(f"{INDENT * 4}{_reference_text(instance)}")
    return lines


def _reference_text(reference: pydicom.Dataset) -> str:
    sop_class_uid = UID(str(reference.get("ReferencedSOPClassUID", "")))
    text = f"{sop_class_uid.name} {reference.get('ReferencedSOPInstanceUID', '(no UID)')}"
    frames = reference.get("ReferencedFrameNumber")
    if frames:
        text += f" frames {frames}"
    return text


def _content_item_lines(item: pydicom.Dataset, depth: int) -> list[str]:
    indent = INDENT * depth
    relationship = item.get("RelationshipType")
    value_type = item.get("ValueType", "(no value type)")
    if "ReferencedContentItemIdentifier" in item:
        target = ".".join(str(number) for number in item.ReferencedContentItemIdentifier)
        return [f"{indent}{relationship} by reference to content item {target}"]

    head = f"{indent}{relationship + ' ' if relationship else ''}{value_type} {_concept_name(item)}"
    if value_type == "TEXT":
        text = str(item.get("TextValue", ""))
        if "\n" in text or "\r" in text:
            lines = [f"{head}:"]
            lines += [
                f"{indent}{INDENT}{TEXT_BLOCK_PREFIX}{line}" for line in text.splitlines()
            ]
        else:
            lines = [f'{head} = "{text}"']
    else:
        lines = [f"{head}{_value_text(item, value_type)}"]
    for child in item.get("ContentSequence", []):
        lines += _content_item_lines(child, depth + 1)
    return lines


def _concept_name(item: pydicom.Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return "(no concept name)"
    return _code_text(names[0])


def _code_text(code: pydicom.Dataset) -> str:
    code_value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return f'"{code.get("CodeMeaning", "")}" ({code_value}, {code.get("CodingSchemeDesignator")})'


def _value_text(item: pydicom.Dataset, value_type: str) -> str:
    """Return the value part of a content item's line, starting with its separator."""
    if value_type == "CONTAINER":
        text = f" [{item.get('ContinuityOfContent', 'no continuity')}"
        for template in item.get("ContentTemplateSequence", []):
            text += f", {template.get('MappingResource')} TID {template.get('TemplateIdentifier')}"
        return text + "]"
    if value_type == "CODE":
        codes = item.get("ConceptCodeSequence")
        return f" = {_code_text(codes[0])}" if codes else " = (no code)"
    if value_type == "UIDREF":
        return f" = {item.get('UID', '')}"
    if value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        references = item.get("ReferencedSOPSequence")
        return f" = {_reference_text(references[0])}" if references else " = (no reference)"
    if value_type == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return " = (no value)"
        units = measured[0].get("MeasurementUnitsCodeSequence")
        unit_text = f" {units[0].get('CodeValue')}" if units else ""
        return f" = {measured[0].get('NumericValue')}{unit_text}"
    if value_type in ("DATE", "TIME", "DATETIME", "PNAME"):
        keyword = {"DATE": "Date", "TIME": "Time", "DATETIME": "DateTime", "PNAME": "PersonName"}
        return f" = {item.get(keyword[value_type], '')}"
    if value_type in ("SCOORD", "SCOORD3D"):
        points = item.get("GraphicData", [])
        dimensions = 3 if value_type == "SCOORD3D" else 2
        return f" = {item.get('GraphicType')} with {len(points) // dimensions} points"
    if value_type == "TCOORD":
        return f" = {item.get('TemporalRangeType')}"
    return " (value not shown)"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the SR file named on the command line; return 0, or 1 when it cannot be read.

    Parameters
    ----------
    argv
        Arguments after the subcommand, for example ``["report.dcm"]``; `sys.argv` when None.
    """
    parser = argparse.ArgumentParser(
        prog="libra-node sr show",
        description="Print an SR document's flags, patient and study attributes, evidence "
        "and content tree. The output contains patient names.",
    )
    parser.add_argument("path", type=Path, help="DICOM SR file to print")
    args = parser.parse_args(argv)
    try:
        dataset = pydicom.dcmread(args.path, stop_before_pixels=True)
        text = format_sr_tree(dataset)
    except (OSError, InvalidDicomError, ValueError) as exc:
        print(f"Cannot show {args.path}: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
