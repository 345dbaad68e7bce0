"""Tests of the SR tree printer on SR documents written by the builder and read back."""

from __future__ import annotations

import pydicom
import pytest

from node.sr_show import format_sr_tree, main
from tests.node.test_sr_builder import (
    ALL_CLASSES,
    CHEST_PA_J2K,
    FINDINGS_TEXT,
    PRIOR_ACCESSION_NUMBER,
    build_example_sr,
    save_and_read,
)


@pytest.fixture
def sr_text(tmp_path) -> str:
    """The printed tree of an Enhanced SR with a prior, read back from its file."""
    _, read_back = save_and_read(build_example_sr(), tmp_path)
    return format_sr_tree(read_back)


@pytest.mark.parametrize("line", FINDINGS_TEXT.splitlines())
def test_format_sr_tree_findings_lines(sr_text, line):
    assert f"| {line}" in sr_text


@pytest.mark.parametrize(
    "expected",
    [
        "Completion Flag: PARTIAL",
        "Verification Flag: UNVERIFIED",
        "Preliminary Flag: PRELIMINARY",
    ],
)
def test_format_sr_tree_flags(sr_text, expected):
    assert expected in sr_text


def test_format_sr_tree_comparison_statement(sr_text):
    # The prior is a copy of the current study, so it keeps the Study Time 18:50:59.
    expected = (
        "Compared with the prior chest study of 2003-01-15 18:50 "
        f"(accession number {PRIOR_ACCESSION_NUMBER})"
    )
    assert expected in sr_text


def test_format_sr_tree_no_prior_statement(tmp_path):
    _, read_back = save_and_read(build_example_sr(with_prior=False), tmp_path)
    assert "No prior chest study of this patient was available" in format_sr_tree(read_back)


def test_format_sr_tree_patient_name(sr_text):
    patient_name = str(pydicom.dcmread(CHEST_PA_J2K, stop_before_pixels=True).PatientName)
    assert f"Patient Name: {patient_name}" in sr_text


@pytest.mark.parametrize("sr_class", ALL_CLASSES)
def test_format_sr_tree_sop_class_name(tmp_path, sr_class):
    _, read_back = save_and_read(build_example_sr(sr_class), tmp_path)
    assert format_sr_tree(read_back).startswith(f"SR document: {read_back.SOPClassUID.name}")


def test_format_sr_tree_root_container(sr_text):
    expected = 'CONTAINER "Diagnostic Imaging Report" (18748-4, LN) [SEPARATE, DCMR TID 2000]'
    assert expected in sr_text


def test_format_sr_tree_indents_sections(sr_text):
    assert '\n  CONTAINS CONTAINER "Findings" (59776-5, LN) [SEPARATE]\n' in sr_text


def test_format_sr_tree_rejects_image():
    image = pydicom.dcmread(CHEST_PA_J2K, stop_before_pixels=True)
    with pytest.raises(ValueError, match="is not an SR document"):
        format_sr_tree(image)


def test_sr_show_main_prints_tree(tmp_path, capsys):
    path, _ = save_and_read(build_example_sr(), tmp_path)
    assert main([str(path)]) == 0
    assert "Verification Flag: UNVERIFIED" in capsys.readouterr().out


def test_sr_show_main_image_fails(capsys):
    assert main([str(CHEST_PA_J2K)]) == 1
    assert "is not an SR document" in capsys.readouterr().err


def test_sr_show_main_missing_file_fails(tmp_path, capsys):
    assert main([str(tmp_path / "missing.dcm")]) == 1
    assert "Cannot show" in capsys.readouterr().err
