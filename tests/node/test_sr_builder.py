"""Tests of the draft SR builder against real radiograph headers, dciodvfy, dcmtk and Orthanc.

The current study is the WG04 RG1 chest PA pair (two instances of one study). Priors are
copies of its frontal header with new Study, Series and SOP Instance UIDs and an earlier
Study Date, as the shared data README describes.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import subprocess
from pathlib import Path

import highdicom
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from node.sr_builder import (
    BASELINE,
    COMMENT,
    CURRENT_PROCEDURE_DESCRIPTIONS,
    DEMO_SERIES_LABEL,
    DEVICE_OBSERVER_MANUFACTURER,
    DEVICE_OBSERVER_MODEL_NAME,
    DEVICE_OBSERVER_NAME,
    DEVICE_OBSERVER_UID,
    DRAFT_SERIES_LABEL,
    FINDING,
    FINDINGS,
    PLAIN_CHEST_X_RAY,
    PREVIOUS_FINDINGS,
    PROCEDURE_REPORTED,
    PROCESSING_EQUIPMENT,
    SOURCE_IMAGE_FOR_PROCESSING,
    BasicTextSR,
    CurrentEvidenceError,
    DeviceIdentity,
    DraftReport,
    InvalidUIDError,
    PredecessorError,
    PriorStudyError,
    ReportContentError,
    SRDocumentClass,
    build_draft_sr,
)
from tests.peers import (
    CHEST_PA_J2K,
    CHEST_PA_JPEG_BASELINE,
    CHEST_PA_JPEGLS,
    dciodvfy_errors,
)

SOP_CLASS_UIDS = {
    SRDocumentClass.ENHANCED: "1.2.840.10008.5.1.4.1.1.88.22",
    SRDocumentClass.COMPREHENSIVE: "1.2.840.10008.5.1.4.1.1.88.33",
    SRDocumentClass.BASIC_TEXT: "1.2.840.10008.5.1.4.1.1.88.11",
}
ALL_CLASSES = list(SRDocumentClass)
CHECKPOINT_SHA256 = "3f" * 32
FINDINGS_TEXT = (
    "Heart size is normal. No focal consolidation, pleural effusion or pneumothorax.\n"
    "Compared with the prior study, no interval change."
)
DEVICE = DeviceIdentity(
    device_uid="2.25.268315170410379934393374271133307290601",
    node_name="libra-node",
    node_version="0.1.0",
    manufacturer="libra-node project",
    institution_name="Test Hospital",
)
PRIOR_STUDY_DATE = "20030115"
PRIOR_ACCESSION_NUMBER = "PRIOR42"
# Patient, General Study and Patient Study attributes compared byte for byte with the source.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)
LATIN_1_ATTRIBUTES = {
    "SpecificCharacterSet": "ISO_IR 100",
    "PatientName": "Müller^Jürgen",
    "IssuerOfPatientID": "Hôpital Saint-Éloi",
    "ReferringPhysicianName": "Weiß^Anna",
    "StudyDescription": "Thorax p.a. Übersicht",
}
UTF_8_ATTRIBUTES = {
    "SpecificCharacterSet": "ISO_IR 192",
    "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "IssuerOfPatientID": "東京病院",
    "ReferringPhysicianName": "Дмитриев^Иван",
    "StudyDescription": "胸部 X線",
}
ISO_2022_JAPANESE_ATTRIBUTES = {
    "SpecificCharacterSet": ["", "ISO 2022 IR 87"],
    "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
}
ASCII_ATTRIBUTES = {
    "SpecificCharacterSet": None,
    "PatientName": "Doe^Jane",
    "IssuerOfPatientID": "TEST HOSPITAL",
}


def read_header(path: Path) -> pydicom.Dataset:
    """Read a shared file's header, without pixel data."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def current_study() -> list[pydicom.Dataset]:
    """Return the two instances of the WG04 RG1 study. The first is the frontal image read."""
    return [read_header(CHEST_PA_J2K), read_header(CHEST_PA_JPEGLS)]


def make_prior(
    current: pydicom.Dataset,
    study_date: str = PRIOR_STUDY_DATE,
    accession_number: str = PRIOR_ACCESSION_NUMBER,
) -> pydicom.Dataset:
    """Copy a header into an earlier study of the same patient, with new UIDs."""
    prior = copy.deepcopy(current)
    prior.StudyInstanceUID = generate_uid()
    prior.SeriesInstanceUID = generate_uid()
    prior.SOPInstanceUID = generate_uid()
    prior.StudyDate = study_date
    prior.AccessionNumber = accession_number
    return prior


def make_report(
    findings_text: str = FINDINGS_TEXT,
    *,
    used_real_prior: bool = True,
    is_demo_checkpoint: bool = False,
    model_name: str = "libra-v1.0-7b",
) -> DraftReport:
    """Return a draft report as the model stage would produce it."""
    return DraftReport(
        findings_text=findings_text,
        model_name=model_name,
        checkpoint_sha256=CHECKPOINT_SHA256,
        is_demo_checkpoint=is_demo_checkpoint,
        dicom_conversion="mimic",
        used_real_prior=used_real_prior,
    )


def build_example_sr(
    sr_class: SRDocumentClass | str = SRDocumentClass.ENHANCED,
    *,
    with_prior: bool = True,
    evidence: list[pydicom.Dataset] | None = None,
    findings_text: str = FINDINGS_TEXT,
    is_demo_checkpoint: bool = False,
    predecessor: pydicom.Dataset | None = None,
    content_datetime: datetime.datetime | None = None,
) -> pydicom.Dataset:
    """Build a draft SR for the current study, with or without a prior."""
    evidence = evidence if evidence is not None else current_study()
    prior = make_prior(evidence[0]) if with_prior else None
    return build_draft_sr(
        evidence,
        evidence[0],
        prior,
        make_report(
            findings_text, used_real_prior=with_prior, is_demo_checkpoint=is_demo_checkpoint
        ),
        DEVICE,
        sr_class=sr_class,
        series_instance_uid=generate_uid(),
        series_number=901,
        series_description="Libra findings",
        sop_instance_uid=generate_uid(),
        predecessor=predecessor,
        content_datetime=content_datetime,
    )


def save_and_read(sr: pydicom.Dataset, tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    """Write the SR as the node does and read it back with pydicom."""
    path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path)


def write_source(tmp_path: Path, attributes: dict) -> Path:
    """Write the frontal header with `attributes` set (None deletes) and return its path."""
    source = read_header(CHEST_PA_J2K)
    source.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword, value in attributes.items():
        if value is None:
            delattr(source, keyword)
        else:
            setattr(source, keyword, value)
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    return path


def section_items(dataset: pydicom.Dataset, heading) -> list[pydicom.Dataset]:
    """Return the content items of the section CONTAINER named `heading`."""
    sections = find_content_items(dataset, name=heading, value_type="CONTAINER")
    assert len(sections) == 1, f"expected one {heading.meaning} section, found {len(sections)}"
    return list(sections[0].ContentSequence)


def concept_value(item: pydicom.Dataset) -> str:
    """Return the Code Value of a content item's concept name."""
    return item.ConceptNameCodeSequence[0].CodeValue


def evidence_uids(dataset: pydicom.Dataset, keyword: str) -> set[str]:
    """Return the SOP Instance UIDs listed in an evidence sequence of the SR."""
    return {
        instance.ReferencedSOPInstanceUID
        for study in dataset.get(keyword, [])
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def raw_value(path: Path, keyword: str) -> bytes | None:
    """Return the undecoded value bytes of an attribute in a file, or None when absent."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag not in dataset:
        return None
    return dataset.get_item(tag).value


# --- Validity with real tools ---------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("sr_class", ALL_CLASSES)
@pytest.mark.parametrize("with_prior", [True, False], ids=["prior", "no_prior"])
def test_sr_builder_dciodvfy_no_errors(tmp_path, sr_class, with_prior):
    path, _ = save_and_read(build_example_sr(sr_class, with_prior=with_prior), tmp_path)
    errors = dciodvfy_errors(path)
    assert errors == [], "dciodvfy reported:\n" + "\n".join(errors)


@pytest.mark.peers
@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_dciodvfy_rereport(tmp_path, sr_class):
    first = build_example_sr(sr_class)
    path, _ = save_and_read(build_example_sr(sr_class, predecessor=first), tmp_path)
    errors = dciodvfy_errors(path)
    assert errors == [], "dciodvfy reported:\n" + "\n".join(errors)


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")
@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_dciodvfy_secondary_capture(tmp_path, sr_class):
    evidence = [read_header(CHEST_PA_JPEG_BASELINE)]
    path, _ = save_and_read(build_example_sr(sr_class, evidence=evidence), tmp_path)
    errors = dciodvfy_errors(path)
    assert errors == [], "dciodvfy reported:\n" + "\n".join(errors)


@pytest.mark.peers
@pytest.mark.parametrize(
    ("attributes", "findings_text"),
    [
        (LATIN_1_ATTRIBUTES, FINDINGS_TEXT),
        (UTF_8_ATTRIBUTES, FINDINGS_TEXT),
        (ISO_2022_JAPANESE_ATTRIBUTES, FINDINGS_TEXT),
        (ASCII_ATTRIBUTES, FINDINGS_TEXT),
        (LATIN_1_ATTRIBUTES, "Befund → unverändert, 肺 frei."),
        (ASCII_ATTRIBUTES, "Herzgröße normal."),
    ],
    ids=[
        "iso_ir_100", "iso_ir_192", "iso_2022_ir_87", "no_character_set",
        "iso_ir_100_to_utf8", "no_character_set_to_utf8",
    ],
)
def test_sr_builder_dciodvfy_character_sets(tmp_path, attributes, findings_text):
    source = read_header(write_source(tmp_path, attributes))
    sr = build_draft_sr(
        [source], source, None, make_report(findings_text, used_real_prior=False), DEVICE,
        series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    path, _ = save_and_read(sr, tmp_path)
    errors = dciodvfy_errors(path)
    assert errors == [], "dciodvfy reported:\n" + "\n".join(errors)


@pytest.mark.peers
@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_dsrdump_accepts_relationships(tmp_path, sr_class):
    """dcmtk's dsrdump checks the value type and relationship constraints of each SR IOD."""
    path, _ = save_and_read(build_example_sr(sr_class), tmp_path)
    result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    problems = [
        line for line in (result.stdout + result.stderr).splitlines()
        if line.startswith(("E:", "F:"))
    ]
    assert problems == [], "dsrdump reported:\n" + "\n".join(problems)


@pytest.mark.peers
@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_orthanc_stores_each_class(tmp_path, orthanc, sr_class):
    path, sent = save_and_read(build_example_sr(sr_class), tmp_path)
    ae = AE(ae_title="LIBRATEST")
    ae.add_requested_context(SOP_CLASS_UIDS[sr_class], ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.ae_title)
    assert association.is_established, "Orthanc rejected the association"
    try:
        status = association.send_c_store(path)
    finally:
        association.release()

    assert status.Status == 0x0000
    stored = orthanc.instances_with_modality("SR")
    assert [tags["SOPInstanceUID"] for tags in stored] == [sent.SOPInstanceUID]
    assert stored[0]["SOPClassUID"] == SOP_CLASS_UIDS[sr_class]
    assert stored[0]["StudyInstanceUID"] == sent.StudyInstanceUID
    assert stored[0]["PatientID"] == sent.PatientID
    assert stored[0]["VerificationFlag"] == "UNVERIFIED"
    assert stored[0]["CompletionFlag"] == "PARTIAL"


# --- Document attributes --------------------------------------------------------------------


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_sop_class_by_parameter(sr_class):
    assert build_example_sr(sr_class).SOPClassUID == SOP_CLASS_UIDS[sr_class]


def test_sr_builder_accepts_class_as_string():
    assert build_example_sr("basic_text").SOPClassUID == SOP_CLASS_UIDS[SRDocumentClass.BASIC_TEXT]


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
@pytest.mark.parametrize(
    ("keyword", "expected"),
    [
        ("CompletionFlag", "PARTIAL"),
        ("VerificationFlag", "UNVERIFIED"),
        ("PreliminaryFlag", "PRELIMINARY"),
        ("Modality", "SR"),
        ("SeriesNumber", 901),
    ],
)
def test_sr_builder_document_attributes(tmp_path, sr_class, keyword, expected):
    _, sr = save_and_read(build_example_sr(sr_class), tmp_path)
    assert sr[keyword].value == expected


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_written_explicit_vr_little_endian(tmp_path, sr_class):
    _, sr = save_and_read(build_example_sr(sr_class), tmp_path)
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_series_description_labels_draft(sr_class):
    sr = build_example_sr(sr_class)
    assert sr.SeriesDescription == f"{DRAFT_SERIES_LABEL}: Libra findings"


def test_sr_builder_series_description_label_not_repeated():
    evidence = current_study()
    sr = build_draft_sr(
        evidence, evidence[0], None, make_report(used_real_prior=False), DEVICE,
        series_instance_uid=generate_uid(), series_number=901,
        series_description=f"{DRAFT_SERIES_LABEL}: Libra findings",
        sop_instance_uid=generate_uid(),
    )
    assert sr.SeriesDescription == f"{DRAFT_SERIES_LABEL}: Libra findings"


def test_sr_builder_demo_series_description():
    sr = build_example_sr(is_demo_checkpoint=True)
    assert sr.SeriesDescription.startswith(DEMO_SERIES_LABEL)


def test_sr_builder_contributing_equipment_names_node():
    equipment = build_example_sr().ContributingEquipmentSequence
    node_items = [item for item in equipment if item.get("ManufacturerModelName") == "libra-node"]
    assert [item.PurposeOfReferenceCodeSequence[0].CodeValue for item in node_items] == [
        PROCESSING_EQUIPMENT.value
    ]


def test_sr_builder_contributing_equipment_names_model():
    equipment = build_example_sr().ContributingEquipmentSequence
    model_items = [
        item for item in equipment if item.get("ManufacturerModelName") == "libra-v1.0-7b"
    ]
    assert [item.PurposeOfReferenceCodeSequence[0].CodeValue for item in model_items] == [
        PROCESSING_EQUIPMENT.value
    ]


def test_sr_builder_content_time_in_source_timezone():
    content_datetime = datetime.datetime(2024, 5, 6, 12, 0, tzinfo=datetime.timezone.utc)
    sr = build_example_sr(content_datetime=content_datetime)
    assert (sr.TimezoneOffsetFromUTC, str(sr.ContentDate), str(sr.ContentTime)) == (
        "-0400", "20240506", "080000"
    )


# --- Patient, study and character sets ------------------------------------------------------


@pytest.mark.parametrize(
    "attributes",
    [{}, LATIN_1_ATTRIBUTES, UTF_8_ATTRIBUTES, ISO_2022_JAPANESE_ATTRIBUTES, ASCII_ATTRIBUTES],
    ids=["source_file", "iso_ir_100", "iso_ir_192", "iso_2022_ir_87", "no_character_set"],
)
def test_sr_builder_copies_patient_study_bytes(tmp_path, attributes):
    source_path = write_source(tmp_path, attributes)
    source = read_header(source_path)
    sr_path, _ = save_and_read(
        build_draft_sr(
            [source], source, None, make_report(used_real_prior=False), DEVICE,
            series_instance_uid=generate_uid(), series_number=901,
            series_description="Libra findings", sop_instance_uid=generate_uid(),
        ),
        tmp_path,
    )
    mismatches = {
        keyword: (raw_value(source_path, keyword), raw_value(sr_path, keyword))
        for keyword in PATIENT_STUDY_KEYWORDS + ("SpecificCharacterSet",)
        if raw_value(source_path, keyword) != raw_value(sr_path, keyword)
    }
    assert mismatches == {}, "source and SR bytes differ (source, SR): " + repr(mismatches)


@pytest.mark.parametrize(
    ("attributes", "findings_text"),
    [
        (LATIN_1_ATTRIBUTES, "Herzgröße normal → keine Änderung, 肺 frei."),
        (ASCII_ATTRIBUTES, "Herzgröße normal."),
    ],
    ids=["iso_ir_100", "no_character_set"],
)
def test_sr_builder_switches_to_utf8(tmp_path, attributes, findings_text):
    source = read_header(write_source(tmp_path, attributes))
    sr = build_draft_sr(
        [source], source, None, make_report(findings_text, used_real_prior=False), DEVICE,
        series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    assert sr.SpecificCharacterSet == "ISO_IR 192"


def test_sr_builder_reencodes_patient_name_as_utf8(tmp_path):
    source = read_header(write_source(tmp_path, LATIN_1_ATTRIBUTES))
    sr = build_draft_sr(
        [source], source, None, make_report("Befund → unverändert.", used_real_prior=False),
        DEVICE, series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    sr_path, _ = save_and_read(sr, tmp_path)
    # "Müller^Jürgen" is 15 bytes in UTF-8, so one space pads it to an even length.
    assert raw_value(sr_path, "PatientName") == "Müller^Jürgen ".encode("utf-8")


def test_sr_builder_reencoded_patient_name_decodes(tmp_path):
    source = read_header(write_source(tmp_path, LATIN_1_ATTRIBUTES))
    sr = build_draft_sr(
        [source], source, None, make_report("Befund → unverändert.", used_real_prior=False),
        DEVICE, series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    _, read_back = save_and_read(sr, tmp_path)
    assert str(read_back.PatientName) == "Müller^Jürgen"


def test_sr_builder_keeps_fitting_charset(tmp_path):
    source = read_header(write_source(tmp_path, LATIN_1_ATTRIBUTES))
    sr = build_draft_sr(
        [source], source, None, make_report("Herzgröße normal.", used_real_prior=False),
        DEVICE, series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    assert sr.SpecificCharacterSet == "ISO_IR 100"


def test_sr_builder_no_charset_stays_absent(tmp_path):
    source = read_header(write_source(tmp_path, ASCII_ATTRIBUTES))
    sr = build_draft_sr(
        [source], source, None, make_report(used_real_prior=False), DEVICE,
        series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    _, read_back = save_and_read(sr, tmp_path)
    assert "SpecificCharacterSet" not in read_back


# --- Evidence -------------------------------------------------------------------------------


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_prior_only_other_evidence(tmp_path, sr_class):
    evidence = current_study()
    prior = make_prior(evidence[0])
    sr = build_draft_sr(
        evidence, evidence[0], prior, make_report(), DEVICE, sr_class=sr_class,
        series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    _, read_back = save_and_read(sr, tmp_path)
    assert evidence_uids(read_back, "PertinentOtherEvidenceSequence") == {prior.SOPInstanceUID}


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_current_only_current_evidence(tmp_path, sr_class):
    evidence = current_study()
    _, read_back = save_and_read(build_example_sr(sr_class, evidence=evidence), tmp_path)
    assert evidence_uids(read_back, "CurrentRequestedProcedureEvidenceSequence") == {
        dataset.SOPInstanceUID for dataset in evidence
    }


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_no_prior_no_other_evidence(tmp_path, sr_class):
    _, read_back = save_and_read(build_example_sr(sr_class, with_prior=False), tmp_path)
    assert "PertinentOtherEvidenceSequence" not in read_back


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_current_image_in_procedure(sr_class):
    evidence = current_study()
    sr = build_example_sr(sr_class, evidence=evidence)
    items = section_items(sr, CURRENT_PROCEDURE_DESCRIPTIONS)
    images = [item for item in items if item.ValueType == "IMAGE"]
    assert [
        (concept_value(item), item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in images
    ] == [(SOURCE_IMAGE_FOR_PROCESSING.value, evidence[0].SOPInstanceUID)]


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_prior_image_is_baseline(sr_class):
    sr = build_example_sr(sr_class)
    items = section_items(sr, PREVIOUS_FINDINGS)
    images = [item for item in items if item.ValueType == "IMAGE"]
    assert [
        (concept_value(item), item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in images
    ] == [(BASELINE.value, next(iter(evidence_uids(sr, "PertinentOtherEvidenceSequence"))))]


# --- Content tree ---------------------------------------------------------------------------


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_draft_statement_precedes_findings(sr_class):
    items = section_items(build_example_sr(sr_class), FINDINGS)
    assert [concept_value(item) for item in items] == [COMMENT.value, FINDING.value]


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_draft_statement_says_unverified(sr_class):
    statement = section_items(build_example_sr(sr_class), FINDINGS)[0].TextValue
    assert "No radiologist has reviewed or verified" in statement


def test_sr_builder_demo_statement_says_meaningless():
    statement = section_items(build_example_sr(is_demo_checkpoint=True), FINDINGS)[0].TextValue
    assert "meaningless demo output" in statement


def test_sr_builder_findings_text_verbatim():
    assert section_items(build_example_sr(), FINDINGS)[1].TextValue == FINDINGS_TEXT


@pytest.mark.parametrize("expected", ["2003-01-15", PRIOR_ACCESSION_NUMBER])
def test_sr_builder_comparison_names_prior_study(expected):
    comparison = section_items(build_example_sr(), PREVIOUS_FINDINGS)[0].TextValue
    assert expected in comparison


def test_sr_builder_comparison_uid_without_accession():
    evidence = current_study()
    prior = make_prior(evidence[0], accession_number="")
    sr = build_draft_sr(
        evidence, evidence[0], prior, make_report(), DEVICE,
        series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    assert prior.StudyInstanceUID in section_items(sr, PREVIOUS_FINDINGS)[0].TextValue


def test_sr_builder_comparison_says_no_prior():
    comparison = section_items(build_example_sr(with_prior=False), PREVIOUS_FINDINGS)[0].TextValue
    assert comparison.startswith("No prior chest study")


def test_sr_builder_comparison_names_retrieving_pacs():
    evidence = current_study()
    report = dataclasses.replace(make_report(), prior_retrieved_from="PACS_QR")
    sr = build_draft_sr(
        evidence, evidence[0], make_prior(evidence[0]), report, DEVICE,
        series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    comparison = section_items(sr, PREVIOUS_FINDINGS)[0].TextValue
    assert comparison.endswith("The node retrieved this prior study from PACS PACS_QR.")


def test_sr_builder_comparison_names_failed_query():
    evidence = current_study()
    report = dataclasses.replace(
        make_report(used_real_prior=False), failed_prior_query_ae_titles=("PACS_A", "PACS_B")
    )
    sr = build_draft_sr(
        evidence, evidence[0], None, report, DEVICE,
        series_instance_uid=generate_uid(), series_number=901,
        series_description="Libra findings", sop_instance_uid=generate_uid(),
    )
    comparison = section_items(sr, PREVIOUS_FINDINGS)[0].TextValue
    assert comparison.startswith("No prior chest study")
    assert "The search for an earlier study at PACS PACS_A, PACS_B failed" in comparison


def test_sr_builder_comparison_without_failure_names_no_pacs():
    comparison = section_items(build_example_sr(with_prior=False), PREVIOUS_FINDINGS)[0].TextValue
    assert "PACS" not in comparison


def test_sr_builder_procedure_default_chest_x_ray():
    procedures = find_content_items(build_example_sr(), name=PROCEDURE_REPORTED)
    assert [item.ConceptCodeSequence[0].CodeValue for item in procedures] == [
        PLAIN_CHEST_X_RAY.value
    ]


def test_sr_builder_procedure_from_study():
    evidence = current_study()
    study_procedure = pydicom.Dataset()
    study_procedure.CodeValue = "36643-5"
    study_procedure.CodingSchemeDesignator = "LN"
    study_procedure.CodeMeaning = "XR Chest 2 Views"
    for dataset in evidence:
        dataset.ProcedureCodeSequence = [study_procedure]
    procedures = find_content_items(
        build_example_sr(evidence=evidence), name=PROCEDURE_REPORTED
    )
    assert [item.ConceptCodeSequence[0].CodeValue for item in procedures] == ["36643-5"]


@pytest.mark.parametrize(
    ("concept", "expected"),
    [
        (DEVICE_OBSERVER_NAME, "libra-node 0.1.0"),
        (DEVICE_OBSERVER_MANUFACTURER, "libra-node project"),
        (
            DEVICE_OBSERVER_MODEL_NAME,
            f"libra-v1.0-7b (checkpoint SHA-256 {CHECKPOINT_SHA256})",
        ),
    ],
    ids=["name", "manufacturer", "model_name"],
)
def test_sr_builder_observer_device_text(concept, expected):
    items = find_content_items(build_example_sr(), name=concept)
    assert [item.TextValue for item in items] == [expected]


def test_sr_builder_observer_device_uid():
    items = find_content_items(build_example_sr(), name=DEVICE_OBSERVER_UID)
    assert [item.UID for item in items] == [DEVICE.device_uid]


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_long_text_round_trips(tmp_path, sr_class):
    sentence = "Kleiner Erguss rechts, Herzgröße grenzwertig; 右肺に浸潤影 → kontrollieren. "
    findings_text = (sentence * (20_000 // len(sentence) + 1))[:20_000]
    _, read_back = save_and_read(
        build_example_sr(sr_class, findings_text=findings_text), tmp_path
    )
    assert section_items(read_back, FINDINGS)[1].TextValue == findings_text


def test_sr_builder_text_value_is_ut(tmp_path):
    _, read_back = save_and_read(build_example_sr(), tmp_path)
    assert section_items(read_back, FINDINGS)[1]["TextValue"].VR == "UT"


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_highdicom_finds_findings(tmp_path, sr_class):
    path, _ = save_and_read(build_example_sr(sr_class), tmp_path)
    if sr_class is SRDocumentClass.BASIC_TEXT:
        # highdicom.sr.srread reads only Enhanced, Comprehensive and Comprehensive 3D SR.
        document = BasicTextSR.from_dataset(pydicom.dcmread(path))
    else:
        document = highdicom.sr.srread(path)
    findings = find_content_items(document, name=FINDING, recursive=True)
    assert [item.TextValue for item in findings] == [FINDINGS_TEXT]


# --- Re-reports -----------------------------------------------------------------------------


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_sr_builder_rereport_names_predecessor(sr_class):
    first = build_example_sr(sr_class)
    second = build_example_sr(sr_class, predecessor=first)
    assert evidence_uids(second, "PredecessorDocumentsSequence") == {first.SOPInstanceUID}


def test_sr_builder_rereport_gets_new_uid():
    first = build_example_sr()
    assert build_example_sr(predecessor=first).SOPInstanceUID != first.SOPInstanceUID


# --- Input validation -----------------------------------------------------------------------


def valid_arguments() -> dict:
    """Return keyword arguments of build_draft_sr that build a valid SR with a prior."""
    evidence = current_study()
    return {
        "current_evidence": evidence,
        "current_frontal": evidence[0],
        "prior_frontal": make_prior(evidence[0]),
        "report": make_report(),
        "device": DEVICE,
        "series_instance_uid": generate_uid(),
        "series_number": 901,
        "series_description": "Libra findings",
        "sop_instance_uid": generate_uid(),
    }


def other_study_predecessor() -> pydicom.Dataset:
    """Return a draft SR moved to another study."""
    predecessor = build_example_sr()
    predecessor.StudyInstanceUID = generate_uid()
    return predecessor


# Each case changes valid arguments in place so that build_draft_sr must raise the error.
INVALID_INPUTS = {
    "empty_findings": (
        ReportContentError, lambda arguments: arguments.update(report=make_report("   \n"))
    ),
    "control_character": (
        ReportContentError,
        lambda arguments: arguments.update(report=make_report("Normal.\x07")),
    ),
    "bad_checkpoint_hash": (
        ReportContentError,
        lambda arguments: arguments.update(
            report=DraftReport(FINDINGS_TEXT, "libra-v1.0-7b", "abc", False, "mimic", True)
        ),
    ),
    "unknown_conversion": (
        ReportContentError,
        lambda arguments: arguments.update(
            report=DraftReport(
                FINDINGS_TEXT, "libra-v1.0-7b", CHECKPOINT_SHA256, False, "png", True
            )
        ),
    ),
    "model_name_with_backslash": (
        ReportContentError,
        lambda arguments: arguments.update(report=make_report(model_name="libra\\v1")),
    ),
    "unknown_sr_class": (ReportContentError, lambda arguments: arguments.update(sr_class="xml")),
    "long_series_description": (
        ReportContentError, lambda arguments: arguments.update(series_description="x" * 60)
    ),
    "series_number_zero": (ReportContentError, lambda arguments: arguments.update(series_number=0)),
    "empty_device_name": (
        ReportContentError,
        lambda arguments: arguments.update(
            device=DeviceIdentity(DEVICE.device_uid, "", "0.1.0", "libra-node project")
        ),
    ),
    "invalid_sop_instance_uid": (
        InvalidUIDError, lambda arguments: arguments.update(sop_instance_uid="1.2.abc")
    ),
    "invalid_device_uid": (
        InvalidUIDError,
        lambda arguments: arguments.update(
            device=DeviceIdentity("not-a-uid", "libra-node", "0.1.0", "libra-node project")
        ),
    ),
    "empty_evidence": (
        CurrentEvidenceError, lambda arguments: arguments.update(current_evidence=[])
    ),
    "frontal_not_in_evidence": (
        CurrentEvidenceError,
        lambda arguments: arguments.update(current_evidence=arguments["current_evidence"][1:]),
    ),
    "evidence_of_two_studies": (
        CurrentEvidenceError,
        lambda arguments: arguments["current_evidence"].append(
            make_prior(arguments["current_evidence"][1])
        ),
    ),
    "prior_of_other_patient": (
        PriorStudyError,
        lambda arguments: setattr(arguments["prior_frontal"], "PatientID", "OTHER-PATIENT-7"),
    ),
    "prior_of_other_issuer": (
        PriorStudyError,
        lambda arguments: setattr(arguments["prior_frontal"], "IssuerOfPatientID", "OTHER"),
    ),
    "prior_in_current_study": (
        PriorStudyError,
        lambda arguments: setattr(
            arguments["prior_frontal"],
            "StudyInstanceUID",
            arguments["current_frontal"].StudyInstanceUID,
        ),
    ),
    "prior_but_report_without": (
        PriorStudyError,
        lambda arguments: arguments.update(report=make_report(used_real_prior=False)),
    ),
    "no_prior_but_report_with": (
        PriorStudyError, lambda arguments: arguments.update(prior_frontal=None)
    ),
    "predecessor_of_other_study": (
        PredecessorError,
        lambda arguments: arguments.update(predecessor=other_study_predecessor()),
    ),
}


@pytest.mark.parametrize("case", INVALID_INPUTS, ids=list(INVALID_INPUTS))
def test_sr_builder_rejects_invalid_input(case):
    error_type, make_invalid = INVALID_INPUTS[case]
    arguments = valid_arguments()
    make_invalid(arguments)
    with pytest.raises(error_type):
        build_draft_sr(**arguments)


def test_sr_builder_rereport_same_uid_rejected():
    first = build_example_sr()
    arguments = valid_arguments()
    arguments.update(sop_instance_uid=first.SOPInstanceUID, predecessor=first)
    with pytest.raises(PredecessorError):
        build_draft_sr(**arguments)


def other_patient_error() -> PriorStudyError:
    """Return the error for a prior of another patient."""
    arguments = valid_arguments()
    arguments["prior_frontal"].PatientID = "OTHER-PATIENT-7"
    with pytest.raises(PriorStudyError) as raised:
        build_draft_sr(**arguments)
    return raised.value


def test_sr_builder_error_names_study_uid():
    assert read_header(CHEST_PA_J2K).StudyInstanceUID in str(other_patient_error())


@pytest.mark.parametrize("value", ["9RG1", "OTHER-PATIENT-7", "CompressedSamples"])
def test_sr_builder_error_omits_patient_identity(value):
    assert value not in str(other_patient_error())
