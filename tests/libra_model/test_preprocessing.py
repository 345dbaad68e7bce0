"""Tests for DICOM rendering and vision-tower preprocessing, on the shared radiographs and synthetic data."""

from __future__ import annotations

import copy
import enum
import functools
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import structlog
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from transformers import AutoImageProcessor

from libra_model.preprocessing import (
    DicomConversion,
    _equalize_histogram,
    background_color,
    dicom_to_image,
    expand_to_square,
    preprocess_image,
)
from tests.peers import (
    CANINE_LATERAL_DX,
    CHEST_FILES,
    CHEST_PA_J2K,
    CHEST_PA_JPEG_BASELINE,
    CHEST_PA_JPEGLS,
    NON_CHEST_FILES,
)

MODES = ["mimic", "released"]
ALL_FILES = [path.name for path in CHEST_FILES + NON_CHEST_FILES]
CHEST_NAMES = [path.name for path in CHEST_FILES]
MONOCHROME1_CHEST_NAMES = [CHEST_PA_J2K.name, CHEST_PA_JPEGLS.name]

# The channels get different means and stds so that a mix-up shows, and the crop is smaller than the resize.
PROCESSOR_CONFIG = {
    "crop_size": {"height": 64, "width": 64},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5307, 0.45, 0.62],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.2583, 0.3, 0.21],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 72},
}


class _InterpolationMode(enum.Enum):
    """Stand-in for torchvision's InterpolationMode, which a fast processor may carry."""

    BICUBIC = "bicubic"


@functools.cache
def _read_shared(path: Path) -> Dataset:
    # Cached across tests: copy.deepcopy it before changing any attribute.
    return pydicom.dcmread(path)


def _shared(cxr_dir: Path, file_name: str) -> Dataset:
    return _read_shared(cxr_dir / file_name)


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[..., 0]


def _synthetic(
    pixels: np.ndarray, photometric_interpretation: str = "MONOCHROME2", bits_stored: int = 16
) -> Dataset:
    """Build a DX data set in Explicit VR Little Endian from an array of stored values."""
    dataset = Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    dataset.Modality = "DX"
    dataset.set_pixel_data(pixels, photometric_interpretation, bits_stored)
    return dataset


def _lut_item(first_mapped: int, bits: int, data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first_mapped, bits]
    item.LUTData = data
    return item


def _pattern(height: int = 16, width: int = 16, levels: int = 4) -> np.ndarray:
    """Return a uint16 image of stored values 0..levels-1 in diagonal stripes."""
    rows, columns = np.indices((height, width))
    return ((rows + columns) % levels).astype(np.uint16)


def _test_picture(width: int = 90, height: int = 60) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_processor(tmp_path_factory):
    """The RAD-DINO processor class, loaded from a local preprocessor_config.json."""
    folder = tmp_path_factory.mktemp("tower")
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_CONFIG))
    return AutoImageProcessor.from_pretrained(folder)


# --- dicom_to_image on the shared radiographs -------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("file_name", ALL_FILES)
def test_dicom_to_image_decodes_shared_file(cxr_dir, file_name, mode):
    """Every shared file decodes (JPEG baseline, JPEG 2000, JPEG-LS, RLE, native) to equal RGB channels."""
    dataset = _shared(cxr_dir, file_name)

    image = dicom_to_image(dataset, mode)

    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert image.size == (dataset.Columns, dataset.Rows)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("file_name", CHEST_NAMES)
def test_dicom_to_image_chest_mediastinum_brighter_than_lungs(cxr_dir, file_name, mode):
    """On a PA chest the mediastinum and spine are bright and the lungs dark, MONOCHROME1 or not."""
    gray = _gray(dicom_to_image(_shared(cxr_dir, file_name), mode)).astype(np.float64)
    height, width = gray.shape
    rows = slice(int(height * 0.3), int(height * 0.6))

    mediastinum = gray[rows, int(width * 0.45) : int(width * 0.55)].mean()
    right_lung = gray[rows, int(width * 0.2) : int(width * 0.3)].mean()
    left_lung = gray[rows, int(width * 0.7) : int(width * 0.8)].mean()

    assert mediastinum > right_lung + 30, f"mediastinum {mediastinum:.0f}, right lung {right_lung:.0f}"
    assert mediastinum > left_lung + 30, f"mediastinum {mediastinum:.0f}, left lung {left_lung:.0f}"


@pytest.mark.parametrize("file_name", MONOCHROME1_CHEST_NAMES)
def test_dicom_to_image_released_mono1_complements_mono2(cxr_dir, file_name):
    """Read as MONOCHROME2, the same values give the complement, up to one level of truncation."""
    dataset = _shared(cxr_dir, file_name)
    as_monochrome2 = copy.deepcopy(dataset)
    as_monochrome2.PhotometricInterpretation = "MONOCHROME2"

    inverted = _gray(dicom_to_image(dataset, "released")).astype(np.int32)
    plain = _gray(dicom_to_image(as_monochrome2, "released")).astype(np.int32)

    assert set(np.unique(inverted + plain)) <= {254, 255}


@pytest.mark.parametrize("mode", MODES)
def test_dicom_to_image_inverse_with_mono1_inverts_once(cxr_dir, mode):
    """A DX image with MONOCHROME1 and PresentationLUTShape INVERSE is inverted once, not twice."""
    dataset = _shared(cxr_dir, CANINE_LATERAL_DX.name)
    without_shape = copy.deepcopy(dataset)
    del without_shape.PresentationLUTShape

    assert np.array_equal(_gray(dicom_to_image(dataset, mode)), _gray(dicom_to_image(without_shape, mode)))


def test_dicom_to_image_mimic_honours_inverse_on_mono2(cxr_dir):
    """In mimic mode INVERSE alone inverts, and the mismatch with MONOCHROME2 is logged."""
    dataset = _shared(cxr_dir, CANINE_LATERAL_DX.name)
    inverse_only = copy.deepcopy(dataset)
    inverse_only.PhotometricInterpretation = "MONOCHROME2"

    with structlog.testing.capture_logs() as logs:
        rendered = _gray(dicom_to_image(inverse_only, "mimic"))

    assert np.array_equal(rendered, _gray(dicom_to_image(dataset, "mimic")))
    assert {
        "event": "preprocessing.presentation_lut_shape_mismatch",
        "log_level": "warning",
        "sop_instance_uid": dataset.SOPInstanceUID,
        "photometric_interpretation": "MONOCHROME2",
        "presentation_lut_shape": "INVERSE",
    } in logs


def test_dicom_to_image_released_ignores_inverse_on_mono2(cxr_dir):
    """The released conversion reads only PhotometricInterpretation, as the released code does."""
    inverse_only = copy.deepcopy(_shared(cxr_dir, CANINE_LATERAL_DX.name))
    inverse_only.PhotometricInterpretation = "MONOCHROME2"
    identity = copy.deepcopy(inverse_only)
    del identity.PresentationLUTShape

    released = _gray(dicom_to_image(inverse_only, "released"))

    assert np.array_equal(released, _gray(dicom_to_image(identity, "released")))


@pytest.mark.parametrize("file_name", [CHEST_PA_JPEG_BASELINE.name, CHEST_PA_J2K.name])
def test_dicom_to_image_mimic_matches_manual_steps(cxr_dir, file_name):
    """Mimic mode equals min-max to uint8, inversion, equalisation and a Pillow JPEG at quality 95."""
    dataset = _shared(cxr_dir, file_name)
    stored = pixel_array(dataset, index=0).astype(np.float64)
    shifted = stored - stored.min()
    gray = (shifted / shifted.max() * 255).astype(np.uint8)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        gray = 255 - gray
    buffer = io.BytesIO()
    Image.fromarray(_equalize_histogram(gray)).save(buffer, format="JPEG", quality=95)
    expected = np.asarray(Image.open(buffer).convert("L"))

    assert np.array_equal(_gray(dicom_to_image(dataset, "mimic")), expected)


# --- dicom_to_image on synthetic data sets ----------------------------------------------


def test_dicom_to_image_released_applies_voi_lut_sequence():
    """The VOI LUT Sequence wins over Window Center/Width, then min-max scaling truncates."""
    dataset = _synthetic(np.array([[0, 1], [2, 3]], dtype=np.uint16), bits_stored=12)
    dataset.VOILUTSequence = [_lut_item(0, 16, [0, 1000, 3000, 65535])]
    dataset.WindowCenter = 1
    dataset.WindowWidth = 2

    gray = _gray(dicom_to_image(dataset, "released"))

    # floor(255 * [0, 1000, 3000, 65535] / 65535)
    assert gray.tolist() == [[0, 3], [11, 255]]


def test_dicom_to_image_mimic_ignores_voi_lut_sequence():
    """MIMIC-CXR-JPG was made without the stored VOI, so a VOI LUT Sequence changes nothing."""
    plain = _synthetic(_pattern())
    with_lut = copy.deepcopy(plain)
    with_lut.VOILUTSequence = [_lut_item(0, 16, [0, 60000, 61000, 65535])]

    assert np.array_equal(_gray(dicom_to_image(with_lut, "mimic")), _gray(dicom_to_image(plain, "mimic")))


def test_dicom_to_image_released_windows_stored_values():
    """The released path windows the stored values: the rescale is not applied before the window."""
    dataset = _synthetic(np.array([[0, 600, 1000, 1200, 1500, 2000]], dtype=np.uint16), bits_stored=12)
    dataset.RescaleSlope = 2
    dataset.RescaleIntercept = -1000
    dataset.WindowCenter = 1000
    dataset.WindowWidth = 1001

    gray = _gray(dicom_to_image(dataset, "released"))

    # LINEAR window on stored values: ((x - 999.5) / 1000 + 0.5), clipped, then times 255.
    # On rescaled values 600 would be below the window (0) and 1200 would give 229.
    assert gray.tolist() == [[0, 25, 127, 178, 255, 255]]


def test_dicom_to_image_mimic_rescale_invariant():
    """A positive-slope rescale cancels in min-max scaling, and the window is not applied."""
    stored = np.array([[0, 600, 1000, 1200, 1500, 2000]] * 4, dtype=np.uint16)
    plain = _synthetic(stored, bits_stored=12)
    rescaled = copy.deepcopy(plain)
    rescaled.RescaleSlope = 2
    rescaled.RescaleIntercept = -1000
    rescaled.WindowCenter = 1000
    rescaled.WindowWidth = 1001

    assert np.array_equal(_gray(dicom_to_image(rescaled, "mimic")), _gray(dicom_to_image(plain, "mimic")))


def test_dicom_to_image_mimic_applies_modality_lut_sequence():
    """A Modality LUT Sequence is applied before scaling, here one that reorders the values."""
    lut = [0, 4000, 1000, 2000]
    with_lut = _synthetic(_pattern(), bits_stored=2)
    with_lut.ModalityLUTSequence = [_lut_item(0, 16, lut)]
    mapped = _synthetic(np.array(lut, dtype=np.uint16)[_pattern()])
    without_lut = _synthetic(_pattern(), bits_stored=2)

    rendered = _gray(dicom_to_image(with_lut, "mimic"))

    assert np.array_equal(rendered, _gray(dicom_to_image(mapped, "mimic")))
    assert not np.array_equal(rendered, _gray(dicom_to_image(without_lut, "mimic")))


def test_dicom_to_image_released_signed_16bit():
    """Signed stored values (PixelRepresentation 1) are min-max scaled from their negative minimum."""
    stored = np.array([[-2000, -1000, 0, 1000, 2000]], dtype=np.int16)
    dataset = _synthetic(stored)

    gray = _gray(dicom_to_image(dataset, "released"))

    assert dataset.PixelRepresentation == 1
    assert gray.tolist() == [[0, 63, 127, 191, 255]]


def test_dicom_to_image_mimic_signed_matches_shifted_unsigned():
    """Signed stored values render like the same values shifted to unsigned."""
    signed = (_pattern(levels=16).astype(np.int16) - 8) * 1000
    shifted = (signed.astype(np.int32) + 8000).astype(np.uint16)

    rendered = _gray(dicom_to_image(_synthetic(signed), "mimic"))

    assert np.array_equal(rendered, _gray(dicom_to_image(_synthetic(shifted), "mimic")))


def test_dicom_to_image_released_mono1_inverts_before_scaling():
    """MONOCHROME1 is inverted as max - value and then min-max scaled with truncation."""
    dataset = _synthetic(np.array([[100, 200, 400, 1100]], dtype=np.uint16), "MONOCHROME1", bits_stored=12)

    gray = _gray(dicom_to_image(dataset, "released"))

    # floor(255 * (1100 - x) / 1000)
    assert gray.tolist() == [[255, 229, 178, 0]]


def test_dicom_to_image_mimic_mono1_matches_inverted_mono2():
    """MONOCHROME1 renders like MONOCHROME2 data holding max + min - value (exact for a 255-wide range)."""
    stored = (_pattern(levels=8) * 36 + 100).astype(np.uint16)
    stored[0, 0] = 355
    complement = (stored.max() + stored.min() - stored).astype(np.uint16)

    monochrome1 = _gray(dicom_to_image(_synthetic(stored, "MONOCHROME1"), "mimic"))

    assert np.array_equal(monochrome1, _gray(dicom_to_image(_synthetic(complement), "mimic")))


@pytest.mark.parametrize("photometric_interpretation", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("mode", MODES)
def test_dicom_to_image_constant_image_all_zero(mode, photometric_interpretation):
    """A constant image has no range to scale: it becomes black, without a division by zero."""
    dataset = _synthetic(np.full((8, 8), 700, dtype=np.uint16), photometric_interpretation)

    with np.errstate(all="raise"):
        gray = _gray(dicom_to_image(dataset, mode))

    assert gray.max() == 0


@pytest.mark.parametrize("mode", MODES)
def test_dicom_to_image_multiframe_uses_first_frame(mode):
    """Only frame 1 of a multi-frame image is rendered, and a warning names the instance."""
    frames = np.stack([_pattern(levels=5), _pattern(levels=3) * 7]).astype(np.uint16)
    multiframe = _synthetic(frames)
    first_frame = _synthetic(frames[0])

    with structlog.testing.capture_logs() as logs:
        rendered = _gray(dicom_to_image(multiframe, mode))

    assert np.array_equal(rendered, _gray(dicom_to_image(first_frame, mode)))
    assert {
        "event": "preprocessing.first_frame_used",
        "log_level": "warning",
        "sop_instance_uid": multiframe.SOPInstanceUID,
        "number_of_frames": 2,
    } in logs


def test_dicom_to_image_missing_pixel_data():
    """The error names the SOP Instance UID and no patient attribute."""
    dataset = _synthetic(_pattern())
    dataset.PatientName = "Synthetic^Person"
    dataset.PatientID = "SYN-0001"
    del dataset.PixelData

    with pytest.raises(ValueError, match="no Pixel Data") as raised:
        dicom_to_image(dataset)

    message = str(raised.value)
    assert dataset.SOPInstanceUID in message
    assert "Synthetic" not in message
    assert "SYN-0001" not in message


def test_dicom_to_image_rejects_rgb():
    """Colour images are not radiographs this node renders: the error names the interpretation."""
    dataset = _synthetic(np.zeros((4, 4, 3), dtype=np.uint8), "RGB", bits_stored=8)

    with pytest.raises(ValueError, match="'RGB'"):
        dicom_to_image(dataset)


def test_dicom_to_image_unknown_mode_lists_choices():
    with pytest.raises(ValueError, match="'mimic', 'released'"):
        dicom_to_image(_synthetic(_pattern()), "windowed")


def test_dicom_to_image_accepts_enum_member():
    dataset = _synthetic(_pattern())

    by_member = _gray(dicom_to_image(dataset, DicomConversion.RELEASED))

    assert np.array_equal(by_member, _gray(dicom_to_image(dataset, "released")))


def test_dicom_conversion_values_are_strings():
    assert [str(member) for member in DicomConversion] == ["mimic", "released"]


# --- histogram equalisation as OpenCV does it -------------------------------------------


def test_equalize_histogram_rounds_to_nearest():
    """Each value v maps to round(count of (lowest, v] * 255 / 7), here 72.86 -> 73 and 218.57 -> 219."""
    gray = np.arange(8, dtype=np.uint8).reshape(2, 4)

    assert _equalize_histogram(gray).ravel().tolist() == [0, 36, 73, 109, 146, 182, 219, 255]


def test_equalize_histogram_spreads_sparse_values():
    """The lowest value maps to 0 and the highest to 255, whatever their counts."""
    gray = np.array([[5, 5, 9, 200, 250]], dtype=np.uint8)

    assert _equalize_histogram(gray).tolist() == [[0, 0, 85, 170, 255]]


def test_equalize_histogram_constant_unchanged():
    gray = np.full((3, 3), 42, dtype=np.uint8)

    assert np.array_equal(_equalize_histogram(gray), gray)


# --- padding and the processor steps -----------------------------------------------------


def test_background_color_truncates_mean():
    """0.5307 * 255 = 135.33 and 0.999 * 255 = 254.75 are truncated, not rounded."""
    processor = SimpleNamespace(image_mean=[0.5307, 0.999, 0.002])

    assert background_color(processor) == (135, 254, 0)


def test_background_color_reads_processor(image_processor):
    assert background_color(image_processor) == (135, 114, 158)


def test_expand_to_square_centres_wide_image():
    """A 7x4 image gets floor(3 / 2) = 1 row above and 2 rows below."""
    image = Image.new("RGB", (7, 4), (10, 20, 30))

    square = np.asarray(expand_to_square(image, (1, 2, 3)))

    assert square.shape == (7, 7, 3)
    assert (square[0] == (1, 2, 3)).all()
    assert (square[1:5] == (10, 20, 30)).all()
    assert (square[5:] == (1, 2, 3)).all()


def test_expand_to_square_centres_tall_image():
    """A 2x5 image gets floor(3 / 2) = 1 column on the left and 2 on the right."""
    image = Image.new("RGB", (2, 5), (10, 20, 30))

    square = np.asarray(expand_to_square(image, (1, 2, 3)))

    assert square.shape == (5, 5, 3)
    assert (square[:, 0] == (1, 2, 3)).all()
    assert (square[:, 1:3] == (10, 20, 30)).all()
    assert (square[:, 3:] == (1, 2, 3)).all()


def test_expand_to_square_keeps_square_image():
    image = Image.new("RGB", (5, 5))

    assert expand_to_square(image, (1, 2, 3)) is image


def test_preprocess_image_shape_and_dtype(image_processor):
    tensor = preprocess_image(_test_picture(), image_processor)

    assert tensor.shape == (3, 64, 64)
    assert tensor.dtype == torch.float32


def test_preprocess_image_matches_transformers_processor(image_processor):
    """After padding, the tensor equals the transformers PIL processor's output bit for bit."""
    picture = _test_picture()
    padded = expand_to_square(picture, background_color(image_processor))

    expected = image_processor(images=padded, return_tensors="pt")["pixel_values"][0]

    assert torch.equal(preprocess_image(picture, image_processor), expected)


def test_preprocess_image_matches_manual_pil_steps(image_processor):
    """Padding, PIL bicubic on uint8, centre crop, rescale and normalise, written out by hand."""
    picture = _test_picture(width=90, height=60)
    padded = Image.new("RGB", (90, 90), (135, 114, 158))
    padded.paste(picture, (0, 15))
    resized = np.asarray(padded.resize((72, 72), resample=Image.Resampling.BICUBIC))
    cropped = resized[4:68, 4:68]
    rescaled = (cropped.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array([0.5307, 0.45, 0.62], dtype=np.float32)
    std = np.array([0.2583, 0.3, 0.21], dtype=np.float32)
    expected = torch.from_numpy(((rescaled - mean) / std).transpose(2, 0, 1).copy())

    assert torch.equal(preprocess_image(picture, image_processor), expected)


def test_preprocess_image_independent_of_processor_class(image_processor):
    """A processor with dict sizes and a torchvision-style resample gives the same tensor."""
    stand_in = SimpleNamespace(
        do_resize=True,
        size={"shortest_edge": 72},
        resample=_InterpolationMode.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 64, "width": 64},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5307, 0.45, 0.62],
        image_std=[0.2583, 0.3, 0.21],
    )
    picture = _test_picture()

    assert torch.equal(preprocess_image(picture, stand_in), preprocess_image(picture, image_processor))


def test_preprocess_image_padding_normalises_to_mean_colour(image_processor):
    """Pure padding becomes (truncated mean colour / 255 - mean) / std on each channel."""
    tall = _test_picture(width=40, height=100)

    tensor = preprocess_image(tall, image_processor)

    color = np.array(background_color(image_processor), dtype=np.float64)
    mean = np.array(PROCESSOR_CONFIG["image_mean"], dtype=np.float32)
    std = np.array(PROCESSOR_CONFIG["image_std"], dtype=np.float32)
    expected = ((color * (1 / 255)).astype(np.float32) - mean) / std
    assert np.array_equal(tensor[:, 32, 0].numpy(), expected)
    assert np.array_equal(tensor[:, 32, -1].numpy(), expected)


def test_preprocess_image_normalises_with_processor_mean_std(image_processor):
    """A white square becomes (1 - mean) / std, with each channel's own mean and std."""
    white = Image.new("RGB", (80, 80), (255, 255, 255))

    tensor = preprocess_image(white, image_processor)

    mean = np.array(PROCESSOR_CONFIG["image_mean"], dtype=np.float32)
    std = np.array(PROCESSOR_CONFIG["image_std"], dtype=np.float32)
    expected = (np.float32(1) - mean) / std
    assert np.array_equal(tensor.amin(dim=(1, 2)).numpy(), expected)
    assert np.array_equal(tensor.amax(dim=(1, 2)).numpy(), expected)


def test_preprocess_image_crop_larger_than_resize_matches_processor(tmp_path):
    """Where the crop exceeds the resized image, both pad with zeros around the centre."""
    folder = tmp_path / "tower"
    folder.mkdir()
    config = PROCESSOR_CONFIG | {"size": {"shortest_edge": 47}, "crop_size": {"height": 52, "width": 52}}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    processor = AutoImageProcessor.from_pretrained(folder)
    picture = _test_picture()
    padded = expand_to_square(picture, background_color(processor))

    expected = processor(images=padded, return_tensors="pt")["pixel_values"][0]

    assert torch.equal(preprocess_image(picture, processor), expected)


def test_preprocess_image_grayscale_input_matches_rgb(image_processor):
    gray = Image.fromarray(np.asarray(_test_picture())[..., 0])

    from_gray = preprocess_image(gray, image_processor)

    assert torch.equal(from_gray, preprocess_image(gray.convert("RGB"), image_processor))


def test_preprocess_image_rejects_unsupported_size(image_processor):
    processor = copy.copy(image_processor)
    processor.size = {"longest_edge": 72}

    with pytest.raises(ValueError, match="shortest_edge"):
        preprocess_image(_test_picture(), processor)
