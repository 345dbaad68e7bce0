"""The main job end to end: real chest radiographs in over DICOM, draft SRs out at Orthanc."""

from __future__ import annotations

import copy
import subprocess
import sys

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.index.models import Study, StudyState
from tests.node.conftest import dcmsend, orthanc_destination, wait_until
from tests.peers import (
    CANINE_LATERAL_DX,
    CHEST_CT,
    CHEST_PA_J2K,
    CHEST_PA_JPEG_BASELINE,
    CHEST_PA_JPEGLS,
    HIP_CR_RLE,
    REPO_ROOT,
    dciodvfy_errors,
)

SR_TIMEOUT_SECONDS = 120

# Patient and General Study module attributes that the SR must carry unchanged.
COPIED_ATTRIBUTES = [
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
]


def _sr_datasets(orthanc, count: int) -> list[pydicom.Dataset]:
    found = orthanc.wait_for_instances("SR", count, SR_TIMEOUT_SECONDS)
    return [pydicom.dcmread(__import__("io").BytesIO(orthanc.get_bytes(f"/instances/{entry['_id']}/file"))) for entry in found]


def _evidence_uids(sr: pydicom.Dataset, keyword: str) -> set[tuple[str, str]]:
    uids = set()
    for study_item in sr.get(keyword, []):
        for series_item in study_item.ReferencedSeriesSequence:
            for sop_item in series_item.ReferencedSOPSequence:
                uids.add((str(study_item.StudyInstanceUID), str(sop_item.ReferencedSOPInstanceUID)))
    return uids


def _text_items(sr: pydicom.Dataset) -> list[str]:
    texts = []

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT":
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return texts


def _make_prior(source: pydicom.Dataset, study_date: str) -> pydicom.Dataset:
    prior = copy.deepcopy(source)
    prior.StudyInstanceUID = generate_uid()
    prior.SeriesInstanceUID = generate_uid()
    prior.SOPInstanceUID = generate_uid()
    prior.file_meta.MediaStorageSOPInstanceUID = prior.SOPInstanceUID
    prior.StudyDate = study_date
    prior.AccessionNumber = "PRIOR1"
    return prior


def test_chest_files_reach_orthanc_as_draft_sr(make_node, orthanc, tmp_path):
    node = make_node(destinations=[orthanc_destination(orthanc)])
    result = dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE, CHEST_PA_J2K, CHEST_PA_JPEGLS)
    assert result.returncode == 0, result.stderr

    srs = {str(sr.StudyInstanceUID): sr for sr in _sr_datasets(orthanc, 2)}
    sources = {
        str(source.StudyInstanceUID): source
        for source in (pydicom.dcmread(CHEST_PA_JPEG_BASELINE), pydicom.dcmread(CHEST_PA_J2K))
    }
    assert set(srs) == set(sources)
    for study_instance_uid, sr in srs.items():
        source = sources[study_instance_uid]
        for keyword in COPIED_ATTRIBUTES:
            if keyword in source:
                assert sr[keyword].value == source[keyword].value, keyword
        assert sr.CompletionFlag == "PARTIAL"
        assert sr.VerificationFlag == "UNVERIFIED"
        assert sr.PreliminaryFlag == "PRELIMINARY"
        assert "PertinentOtherEvidenceSequence" not in sr
        path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(path)
        assert dciodvfy_errors(path) == []

    two_image_study = srs[str(sources[str(pydicom.dcmread(CHEST_PA_J2K).StudyInstanceUID)].StudyInstanceUID)]
    expected_evidence = {
        (str(two_image_study.StudyInstanceUID), str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        for path in (CHEST_PA_J2K, CHEST_PA_JPEGLS)
    }
    assert _evidence_uids(two_image_study, "CurrentRequestedProcedureEvidenceSequence") == expected_evidence


def test_prior_named_in_current_sr(make_node, orthanc, tmp_path):
    node = make_node(destinations=[orthanc_destination(orthanc)])
    current = pydicom.dcmread(CHEST_PA_JPEG_BASELINE)
    current.StudyDate = "20200315"
    prior = _make_prior(current, "20190210")
    prior_path, current_path = tmp_path / "prior.dcm", tmp_path / "current.dcm"
    prior.save_as(prior_path)
    current.save_as(current_path)

    assert dcmsend(node.receiver.port, prior_path).returncode == 0
    _sr_datasets(orthanc, 1)
    assert dcmsend(node.receiver.port, current_path).returncode == 0
    srs = {str(sr.StudyInstanceUID): sr for sr in _sr_datasets(orthanc, 2)}

    current_sr = srs[str(current.StudyInstanceUID)]
    assert _evidence_uids(current_sr, "PertinentOtherEvidenceSequence") == {
        (str(prior.StudyInstanceUID), str(prior.SOPInstanceUID))
    }
    assert (str(prior.StudyInstanceUID), str(prior.SOPInstanceUID)) not in _evidence_uids(
        current_sr, "CurrentRequestedProcedureEvidenceSequence"
    )
    current_texts = " ".join(_text_items(current_sr))
    assert "PRIOR1" in current_texts or str(prior.StudyInstanceUID) in current_texts

    prior_sr = srs[str(prior.StudyInstanceUID)]
    assert "PertinentOtherEvidenceSequence" not in prior_sr
    assert "no prior" in " ".join(_text_items(prior_sr)).lower()


def test_non_chest_files_skipped_with_reason(make_node, orthanc):
    node = make_node(destinations=[orthanc_destination(orthanc)])
    result = dcmsend(node.receiver.port, HIP_CR_RLE, CANINE_LATERAL_DX, CHEST_CT)
    assert "No presentation context" in result.stderr

    def skipped_studies():
        with node.index.transaction() as session:
            studies = session.scalars(select(Study)).all()
            if len(studies) == 2 and all(study.state == StudyState.SKIPPED for study in studies):
                return {study.study_instance_uid: study.state_reason for study in studies}
            return None

    reasons = wait_until(skipped_studies, 30, "the hip and canine studies are skipped")
    hip_uid = str(pydicom.dcmread(HIP_CR_RLE, stop_before_pixels=True).StudyInstanceUID)
    canine_uid = str(pydicom.dcmread(CANINE_LATERAL_DX, stop_before_pixels=True).StudyInstanceUID)
    assert reasons[hip_uid] == "not a chest study: Body Part Examined HIP"
    assert reasons[canine_uid] == "no frontal (PA or AP) chest image found in the study"
    assert orthanc.instances_with_modality("SR") == []


def test_restart_before_stable_sends_one_sr(make_node, orthanc, tmp_path):
    data_dir = tmp_path / "restarted-node"
    first = make_node(data_dir=data_dir, destinations=[orthanc_destination(orthanc)], node={"study_stable_seconds": 4})
    assert dcmsend(first.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    first.stop()
    assert orthanc.instances_with_modality("SR") == []

    make_node(data_dir=data_dir, destinations=[orthanc_destination(orthanc)], node={"study_stable_seconds": 4})
    _sr_datasets(orthanc, 1)
    with pytest.raises(TimeoutError):
        orthanc.wait_for_instances("SR", 2, timeout_seconds=6)


def test_demo_command_exits_zero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--workdir", str(tmp_path / "demo"), "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SR received by the PACS" in result.stdout


def test_late_instance_gives_re_report_naming_first_sr(make_node, orthanc, tmp_path):
    node = make_node(destinations=[orthanc_destination(orthanc)])
    assert dcmsend(node.receiver.port, CHEST_PA_J2K).returncode == 0
    first_sr = _sr_datasets(orthanc, 1)[0]

    assert dcmsend(node.receiver.port, CHEST_PA_JPEGLS).returncode == 0
    srs = {str(sr.SOPInstanceUID): sr for sr in _sr_datasets(orthanc, 2)}
    second_sr = next(sr for uid, sr in srs.items() if uid != str(first_sr.SOPInstanceUID))
    predecessor = second_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert second_sr.StudyInstanceUID == first_sr.StudyInstanceUID
    assert len(_evidence_uids(second_sr, "CurrentRequestedProcedureEvidenceSequence")) == 2
    path = tmp_path / "re-report.dcm"
    second_sr.save_as(path)
    assert dciodvfy_errors(path) == []
