"""Tests of the `python -m libra_model.generate` command line."""

from __future__ import annotations

import pydicom
import pytest
import structlog

from libra_model.generate import is_dicom_file, main, read_image
from libra_model.report_generator import ReportGenerator
from tests.libra_model.sample_images import make_radiograph
from tests.libra_model.test_report_generator import make_dicom_radiograph

pytestmark = pytest.mark.usefixtures("block_network")


@pytest.fixture
def png_path(tmp_path):
    path = tmp_path / "current.png"
    make_radiograph(1).save(path)
    return path


@pytest.fixture
def dicom_path_without_extension(tmp_path):
    # No .dcm suffix: the file type must come from the DICM magic, not from the name.
    path = tmp_path / "prior.img"
    make_dicom_radiograph(2).save_as(path, enforce_file_format=True)
    return path


def test_dicom_detected_by_magic(dicom_path_without_extension):
    assert is_dicom_file(dicom_path_without_extension)


def test_png_is_not_dicom(png_path):
    assert not is_dicom_file(png_path)


def test_png_named_dcm_is_not_dicom(png_path, tmp_path):
    renamed = png_path.rename(tmp_path / "current.dcm")
    assert not is_dicom_file(renamed)


def test_read_image_returns_dataset_for_dicom(dicom_path_without_extension):
    assert isinstance(read_image(dicom_path_without_extension), pydicom.Dataset)


def test_read_image_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image(tmp_path / "absent.png")


@pytest.fixture
def restore_structlog():
    """Restore the structlog configuration that the command line replaces."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("restore_structlog")
def test_cli_prints_only_findings(tiny_checkpoint, png_path, dicom_path_without_extension, capsys):
    exit_status = main(
        [
            "--model",
            str(tiny_checkpoint),
            "--max-new-tokens",
            "4",
            "--conversion",
            "released",
            str(png_path),
            str(dicom_path_without_extension),
        ]
    )
    captured = capsys.readouterr()
    expected = ReportGenerator.from_pretrained(tiny_checkpoint, dicom_conversion="released").generate(
        read_image(png_path), read_image(dicom_path_without_extension), max_new_tokens=4
    )
    assert exit_status == 0
    assert "Demo checkpoint with random weights" in captured.err
    assert captured.out == expected.findings_text + "\n"
