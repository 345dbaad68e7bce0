"""Chest-sized synthetic CR instances for the benchmarks, each with its own UIDs.

The pixel data is the node's drawn phantom (`node.synthetic`), not a patient, and every header
says so. Two instances (PA and lateral) make one study, and each study has its own patient.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from node.synthetic import draw_chest_phantom, synthetic_chest_study

INSTANCES_PER_STUDY = 2


def phantom_pixels(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Return a 12-bit phantom of shape (rows, columns), cut from a square drawing."""
    side = max(rows, columns)
    square = draw_chest_phantom(side, seed=seed)
    top = (side - rows) // 2
    left = (side - columns) // 2
    return np.ascontiguousarray(square[top : top + rows, left : left + columns])


def write_instances(folder: Path, count: int, rows: int, columns: int, first_patient: int = 1) -> list[Path]:
    """Write `count` uncompressed 16-bit CR instances of rows x columns pixels into `folder`.

    Parameters
    ----------
    folder
        Target folder, created when missing.
    count
        Number of instances; consecutive pairs share a study (PA, then lateral).
    rows, columns
        Image size in pixels; 2500 x 2000 gives about 10 MB per file.
    first_patient
        Number of the first synthetic patient, so that two calls can write disjoint patients.

    Returns
    -------
    list of pathlib.Path
        The files written, in sending order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = synthetic_chest_study(size=8)
    pixels = phantom_pixels(rows, columns)
    template.Rows, template.Columns = pixels.shape
    template.PixelData = pixels.tobytes()
    paths = []
    study = None
    for number in range(count):
        if number % INSTANCES_PER_STUDY == 0:
            patient_number = first_patient + number // INSTANCES_PER_STUDY
            study = {
                "PatientID": f"SYNTHETIC-{patient_number:05d}",
                "PatientName": f"SYNTHETIC^BENCH{patient_number:05d}",
                "StudyInstanceUID": generate_uid(),
                "SeriesInstanceUID": generate_uid(),
                "AccessionNumber": f"SYNB{patient_number:05d}",
                "StudyDate": (dt.date(2026, 1, 1) + dt.timedelta(days=patient_number % 300)).strftime("%Y%m%d"),
            }
        # One data set is rewritten for every file: only the attributes set here differ.
        dataset = template
        for keyword, value in study.items():
            setattr(dataset, keyword, value)
        view_position = "PA" if number % INSTANCES_PER_STUDY == 0 else "LL"
        dataset.ViewPosition = view_position
        dataset.SeriesDescription = f"SYNTHETIC CHEST {view_position}"
        dataset.InstanceNumber = number % INSTANCES_PER_STUDY + 1
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        path = folder / f"{number:05d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
