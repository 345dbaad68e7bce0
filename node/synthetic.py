"""Synthetic chest radiographs for the demo and tests, labelled synthetic in their headers.

The image is a drawn phantom (body outline, two lung fields, mediastinum, ribs), not a
patient; Patient Name, Image Comments and the descriptions all say so.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.ingest import COMPUTED_RADIOGRAPHY_IMAGE_STORAGE

SYNTHETIC_LABEL = "SYNTHETIC IMAGE - NOT A PATIENT"


def draw_chest_phantom(size: int = 512, seed: int = 0, opacity: float = 0.0) -> np.ndarray:
    """Return a 12-bit chest-like phantom of shape (size, size), MONOCHROME2 (air dark).

    `opacity` (0 to 1) adds a rounded opacity in the right lower lung, so a follow-up
    study can differ from its prior.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.full((size, size), 300.0)
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.55) ** 2 < 1
    image[body] = 2600
    for center_x in (0.32, 0.68):
        lung = ((x - center_x) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
        image[lung] = 900
    mediastinum = (np.abs(x - 0.5) < 0.07) & (y > 0.2)
    image[mediastinum] = 3000
    heart = ((x - 0.55) / 0.14) ** 2 + ((y - 0.66) / 0.12) ** 2 < 1
    image[heart] = 2800
    for rib in range(8):
        rib_y = 0.28 + rib * 0.06
        ribs = (np.abs(y - rib_y - 0.05 * np.abs(x - 0.5)) < 0.008) & body & ~mediastinum
        image[ribs] += 500
    if opacity > 0:
        lesion = ((x - 0.33) / 0.06) ** 2 + ((y - 0.62) / 0.05) ** 2 < 1
        image[lesion] += 1200 * opacity
    image += rng.normal(0, 40, image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


def synthetic_chest_study(
    patient_id: str = "SYNTHETIC-0001",
    patient_name: str = "SYNTHETIC^DEMO",
    study_date: dt.date = dt.date(2026, 1, 15),
    view_position: str = "PA",
    opacity: float = 0.0,
    seed: int = 0,
    size: int = 512,
) -> Dataset:
    """Return one CR image of a new synthetic chest study, with file meta, ready to send or save."""
    dataset = Dataset()
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.SOPClassUID = COMPUTED_RADIOGRAPHY_IMAGE_STORAGE
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.PatientName = patient_name
    dataset.PatientID = patient_id
    dataset.IssuerOfPatientID = "LIBRA-DEMO"
    dataset.PatientBirthDate = "19700101"
    dataset.PatientSex = "O"
    dataset.StudyDate = study_date.strftime("%Y%m%d")
    dataset.StudyTime = "093000"
    dataset.SeriesDate = dataset.StudyDate
    dataset.ContentDate = dataset.StudyDate
    dataset.ContentTime = dataset.StudyTime
    dataset.AccessionNumber = f"SYN{study_date.strftime('%Y%m%d')}"
    dataset.StudyID = "1"
    dataset.ReferringPhysicianName = ""
    dataset.StudyDescription = "SYNTHETIC CHEST XRAY"
    dataset.SeriesDescription = f"SYNTHETIC CHEST {view_position}"
    dataset.ImageComments = SYNTHETIC_LABEL
    dataset.InstitutionName = "libra-node demo (synthetic data)"
    dataset.Manufacturer = "libra-node synthetic phantom"
    dataset.Modality = "CR"
    dataset.BodyPartExamined = "CHEST"
    dataset.ViewPosition = view_position
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = 1
    dataset.ImageType = ["DERIVED", "SECONDARY"]
    dataset.BurnedInAnnotation = "NO"

    pixels = draw_chest_phantom(size, seed=seed, opacity=opacity)
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 12
    dataset.HighBit = 11
    dataset.PixelRepresentation = 0
    dataset.PixelSpacing = [0.7, 0.7]
    dataset.WindowCenter = 2048
    dataset.WindowWidth = 4096
    dataset.PixelData = pixels.tobytes()

    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset
