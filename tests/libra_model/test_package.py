"""Tests of the libra_model package exports."""

from __future__ import annotations

import libra_model
from libra_model import preprocessing


def test_package_exports_public_api():
    for name in libra_model.__all__:
        assert getattr(libra_model, name) is not None, name


def test_package_exports_preprocessing_dicom_to_image():
    assert libra_model.dicom_to_image is preprocessing.dicom_to_image


def test_package_image_token_index():
    assert libra_model.IMAGE_TOKEN_INDEX == -200
