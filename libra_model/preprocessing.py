"""Turn chest radiographs into the pixel tensors that the Libra vision tower reads.

`dicom_to_image` renders a DICOM image as an 8-bit RGB picture, and `preprocess_image` pads,
resizes and normalises that picture exactly as the RAD-DINO image processor's PIL path does.
"""

from __future__ import annotations

import enum
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom
import structlog
import torch
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

log = structlog.get_logger(__name__)

# JPEG quality with which MIMIC-CXR-JPG was written (PhysioNet MIMIC-CXR-JPG 2.1.0 page, Methods).
MIMIC_JPEG_QUALITY = 95

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class DicomConversion(enum.StrEnum):
    """Rendering of stored DICOM pixel values as an 8-bit image."""

    MIMIC = "mimic"
    """The conversion that produced MIMIC-CXR-JPG, Libra's training data (the node's default)."""

    RELEASED = "released"
    """The DICOM load path of the released Libra code, kept for output equivalence with it."""


def dicom_to_image(dataset: pydicom.Dataset, mode: str | DicomConversion = "mimic") -> Image.Image:
    """Render the first frame of a grayscale DICOM image as an 8-bit RGB picture.

    Both conversions end with one 8-bit gray channel that is copied into R, G and B, so that
    the minimum is black and the maximum is white, as in a MONOCHROME2 display (PS3.3 C.7.6.3.1.2).

    ``"released"``: apply the VOI LUT Sequence, else the first Window Center/Width pair, else
    nothing (pydicom ``apply_voi_lut`` on the stored values, without the modality LUT first).
    Then invert MONOCHROME1 as max - value, min-max scale to [0, 1], multiply by 255 and
    truncate to uint8. PresentationLUTShape is ignored, as in the released code.

    ``"mimic"``: apply the modality LUT, min-max scale to [0, 255] and truncate to uint8.
    Then invert once if PhotometricInterpretation is MONOCHROME1 or PresentationLUTShape is
    INVERSE, equalise the histogram as OpenCV's ``equalizeHist`` does, and encode and decode
    as JPEG at quality 95. The stored VOI (window or VOI LUT) is not applied. When the two
    attributes disagree (PS3.3 pairs INVERSE with MONOCHROME1 only), a warning is logged.

    Parameters
    ----------
    dataset
        A DICOM image whose PhotometricInterpretation is MONOCHROME1 or MONOCHROME2. Compressed
        Pixel Data is decoded by the installed pydicom plugins (JPEG, JPEG-LS, JPEG 2000, RLE).
    mode
        ``"mimic"`` (default) or ``"released"``, or the matching `DicomConversion` member.

    Returns
    -------
    PIL.Image.Image
        An RGB image of Columns x Rows pixels whose three channels are equal.

    Raises
    ------
    ValueError
        If `mode` is not a `DicomConversion` value, if the data set has no pixel data, or if
        its PhotometricInterpretation is not MONOCHROME1 or MONOCHROME2.
    """
    conversion = _parse_conversion(mode)
    frame = _first_frame(dataset)
    if conversion is DicomConversion.RELEASED:
        gray = _render_released(frame, dataset)
    else:
        gray = _render_mimic(frame, dataset)
    return Image.fromarray(gray).convert("RGB")


def background_color(image_processor: Any) -> tuple[int, int, int]:
    """Return the padding colour: the processor's ``image_mean`` times 255, truncated per channel.

    Truncation, not rounding, matches the released padding step (for example 0.5307 gives 135).

    Parameters
    ----------
    image_processor
        The vision tower's image processor. Only its ``image_mean`` (one value or three) is read.

    Returns
    -------
    tuple of int
        The (R, G, B) colour, each in 0..255.
    """
    mean = _per_channel(image_processor.image_mean, "image_mean")
    red, green, blue = (int(value * 255) for value in mean)
    return red, green, blue


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Pad an image to a square whose side is its longer edge, keeping the original centred.

    The original is pasted at integer offsets floor((long - short) / 2), so an odd difference
    leaves one more row or column of padding after the image than before it.

    Parameters
    ----------
    image
        The picture to pad. `color` must fit its mode, so use an RGB image for a 3-tuple.
    color
        The fill colour of the added border.

    Returns
    -------
    PIL.Image.Image
        A new square image, or `image` itself when it is already square.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_image(image: Image.Image, image_processor: Any) -> torch.Tensor:
    """Pad, resize, crop and normalise a picture into the vision tower's input tensor.

    The image is converted to RGB and padded to a square with `background_color`. The steps
    of the transformers ``BitImageProcessorPil`` (the slow PIL path) follow, reproduced here
    from the processor's fields, so that any processor class, fast or slow, gives the same
    tensor and torchvision is not needed:

    1. resize the uint8 image with PIL to ``size`` (``shortest_edge``, or ``height`` and ``width``)
       with ``resample``, so the result is uint8 again;
    2. centre-crop to ``crop_size``, padding with zeros where the image is smaller;
    3. multiply by ``rescale_factor`` in float64 and cast to float32;
    4. subtract ``image_mean`` and divide by ``image_std`` per channel, in float32.

    Each step runs only when the processor's ``do_resize``, ``do_center_crop``, ``do_rescale``
    or ``do_normalize`` flag is set.

    Parameters
    ----------
    image
        The picture, for example from `dicom_to_image`. Modes other than RGB are converted.
    image_processor
        The RAD-DINO image processor loaded from the vision tower folder (a transformers
        ``BitImageProcessor`` or ``BitImageProcessorPil``), or any object with the same fields.

    Returns
    -------
    torch.Tensor
        Shape (3, crop_height, crop_width), float32; (3, 518, 518) for RAD-DINO.

    Raises
    ------
    ValueError
        If ``size`` sets neither ``shortest_edge`` nor ``height`` and ``width``, if
        ``resample`` has no PIL equivalent, or if ``image_mean`` or ``image_std`` does not
        have one or three values.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    square = expand_to_square(rgb, background_color(image_processor))

    if image_processor.do_resize:
        target_height, target_width = _resize_target(square.size, image_processor.size)
        resample = _pil_resample(image_processor.resample)
        square = square.resize((target_width, target_height), resample=resample)
    pixels = np.asarray(square)

    if image_processor.do_center_crop:
        crop = image_processor.crop_size
        pixels = _center_crop(pixels, _size_field(crop, "height"), _size_field(crop, "width"))

    if image_processor.do_rescale:
        # Upcast first and downcast at the end, as transformers' rescale does.
        values = (pixels.astype(np.float64) * image_processor.rescale_factor).astype(np.float32)
    else:
        values = pixels.astype(np.float32)

    if image_processor.do_normalize:
        mean = np.asarray(_per_channel(image_processor.image_mean, "image_mean"), dtype=np.float32)
        std = np.asarray(_per_channel(image_processor.image_std, "image_std"), dtype=np.float32)
        values = (values - mean) / std

    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))


def _parse_conversion(mode: str | DicomConversion) -> DicomConversion:
    try:
        return DicomConversion(mode)
    except ValueError as exc:
        choices = ", ".join(repr(member.value) for member in DicomConversion)
        raise ValueError(f"Unknown DICOM conversion {mode!r}: use one of {choices}") from exc


def _first_frame(dataset: pydicom.Dataset) -> np.ndarray:
    """Decode the stored values of frame 1 as a 2-D array, after checking that it is grayscale."""
    sop_instance_uid = dataset.get("SOPInstanceUID", "(absent)")
    if not any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS):
        raise ValueError(
            f"Instance with SOP Instance UID {sop_instance_uid} has no Pixel Data (7FE0,0010): "
            "send the image instance itself, not a report or presentation state that refers to it"
        )

    photometric_interpretation = dataset.get("PhotometricInterpretation")
    if photometric_interpretation not in _MONOCHROME:
        raise ValueError(
            f"Instance with SOP Instance UID {sop_instance_uid} has PhotometricInterpretation "
            f"{photometric_interpretation!r}: only MONOCHROME1 and MONOCHROME2 radiographs can be rendered"
        )

    number_of_frames = int(dataset.get("NumberOfFrames") or 1)
    if number_of_frames > 1:
        # NOTE: only frame 1 of a multi-frame image is rendered, and the other frames are ignored.
        log.warning(
            "preprocessing.first_frame_used",
            sop_instance_uid=sop_instance_uid,
            number_of_frames=number_of_frames,
        )
    return pixel_array(dataset, index=0)


def _render_released(frame: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    # The window is applied to stored values, as in the released code, although PS3.4 puts the
    # modality LUT first. So an image with a rescale is windowed on the wrong scale.
    values = apply_voi_lut(frame, dataset).astype(np.float64)
    # Inverting in float64 avoids the integer overflow of max - value on wide signed data.
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() - values
    return _min_max_to_uint8(values)


def _render_mimic(frame: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    # Steps from the PhysioNet MIMIC-CXR-JPG 2.1.0 page (Methods): read the pixels with pydicom,
    # min-max scale to [0, 255] and truncate, invert by PhotometricInterpretation, equalise the
    # histogram with OpenCV and write a JPEG with OpenCV at quality 95. The page names no
    # windowing, so the stored VOI is not applied.
    # NOTE: this follows the page's text, not its conversion code, and OpenCV is not a dependency. So
    # the step order is read from the text, and bit-identity with OpenCV's output is unchecked.

    # The modality LUT comes first, as in the PS3.4 grayscale pipeline. A linear rescale with a
    # positive slope cancels in min-max scaling, so only a Modality LUT Sequence or a negative
    # slope, which can reorder the values, changes the result.
    values = apply_modality_lut(frame, dataset).astype(np.float64)
    gray = _min_max_to_uint8(values)

    # The page wants air white but the outside of the body black, although both are air. So the
    # DICOM meaning is used instead: MONOCHROME1 and INVERSE each display the minimum as white.
    if _is_inverted(dataset):
        gray = gray.max() - gray

    gray = _equalize_histogram(gray)
    return _jpeg_round_trip(gray, MIMIC_JPEG_QUALITY)


def _is_inverted(dataset: pydicom.Dataset) -> bool:
    """Return whether PhotometricInterpretation or PresentationLUTShape displays the minimum as white.

    PS3.3 requires INVERSE with MONOCHROME1 and IDENTITY with MONOCHROME2, so a conformant
    image with both MONOCHROME1 and INVERSE is inverted once. A mismatch is logged because
    some modalities write a wrong Presentation LUT Shape, and the image may then be inverted.
    """
    monochrome1 = dataset.PhotometricInterpretation == "MONOCHROME1"
    presentation_lut_shape = dataset.get("PresentationLUTShape")
    shape_inverts = presentation_lut_shape == "INVERSE"
    if presentation_lut_shape in ("INVERSE", "IDENTITY") and shape_inverts != monochrome1:
        log.warning(
            "preprocessing.presentation_lut_shape_mismatch",
            sop_instance_uid=dataset.get("SOPInstanceUID", "(absent)"),
            photometric_interpretation=dataset.PhotometricInterpretation,
            presentation_lut_shape=presentation_lut_shape,
        )
    return monochrome1 or shape_inverts


def _min_max_to_uint8(values: np.ndarray) -> np.ndarray:
    shifted = values - values.min()
    peak = shifted.max()
    if peak == 0:
        # NOTE: the released code divides by zero on a constant image; here it becomes all zeros.
        return np.zeros(values.shape, dtype=np.uint8)
    return (shifted / peak * 255).astype(np.uint8)


def _equalize_histogram(gray: np.ndarray) -> np.ndarray:
    """Equalise a uint8 image with the lookup table of OpenCV's ``cv::equalizeHist``.

    OpenCV maps the lowest occurring value to 0, and every other value v to the count of
    pixels in (lowest, v] times 255 / (pixels above the lowest value). It computes in float32
    and rounds to the nearest integer. A constant image is returned unchanged.
    """
    histogram = np.bincount(gray.ravel(), minlength=256)
    lowest = int(np.flatnonzero(histogram)[0])
    pixels_above_lowest = gray.size - int(histogram[lowest])
    if pixels_above_lowest == 0:
        return gray.copy()

    scale = np.float32(255) / np.float32(pixels_above_lowest)
    counts_above_lowest = np.cumsum(histogram) - histogram[lowest]
    lookup = np.rint(counts_above_lowest.astype(np.float32) * scale)
    lookup = np.clip(lookup, 0, 255).astype(np.uint8)
    lookup[: lowest + 1] = 0
    return lookup[gray]


def _jpeg_round_trip(gray: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 image as a one-component baseline JPEG and decode it again.

    The training images went through this round trip, so it is kept although it moves pixels by
    about one gray level on average. Pillow writes the same kind of JPEG as OpenCV's encoder:
    one baseline component with libjpeg's standard table scaled to `quality`.
    """
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"))


def _size_field(size: Any, key: str) -> int | None:
    # transformers 4 stores sizes as dicts and transformers 5 as SizeDict objects.
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def _resize_target(image_size: tuple[int, int], size: Any) -> tuple[int, int]:
    """Return the (height, width) that transformers' PIL resize computes from ``size``."""
    width, height = image_size
    shortest_edge = _size_field(size, "shortest_edge")
    if shortest_edge and not _size_field(size, "longest_edge"):
        short, long = sorted((width, height))
        scaled_long = int(shortest_edge * long / short)
        if width <= height:
            return scaled_long, shortest_edge
        return shortest_edge, scaled_long

    target_height, target_width = _size_field(size, "height"), _size_field(size, "width")
    if target_height and target_width:
        return target_height, target_width
    raise ValueError(
        f"Unsupported image processor size {size!r}: set 'shortest_edge' alone, or 'height' and "
        "'width', in the vision tower's preprocessor_config.json"
    )


def _pil_resample(resample: Any) -> Image.Resampling:
    if resample is None:
        return Image.Resampling.BILINEAR  # transformers' PIL resize default
    if isinstance(resample, int):
        return Image.Resampling(int(resample))
    # A torchvision InterpolationMode from a fast processor: its value is the filter name.
    name = str(getattr(resample, "value", resample)).upper()
    if name in Image.Resampling.__members__:
        return Image.Resampling[name]
    raise ValueError(
        f"Image processor resample {resample!r} has no PIL filter: use 'bicubic' (3) for RAD-DINO"
    )


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Crop (H, W, C) pixels around the centre as transformers' ``center_crop`` does.

    The top-left corner sits at floor((size - crop) / 2). Where the crop is larger than the
    image, the image is first centred on a zero canvas with ceil((crop - size) / 2) before it.
    """
    height, width = pixels.shape[:2]
    canvas_height, canvas_width = max(height, crop_height), max(width, crop_width)
    top_pad = math.ceil((canvas_height - height) / 2)
    left_pad = math.ceil((canvas_width - width) / 2)
    if (canvas_height, canvas_width) != (height, width):
        canvas = np.zeros((canvas_height, canvas_width, pixels.shape[2]), dtype=pixels.dtype)
        canvas[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
        pixels = canvas

    top = (height - crop_height) // 2 + top_pad
    left = (width - crop_width) // 2 + left_pad
    return pixels[top : top + crop_height, left : left + crop_width]


def _per_channel(values: float | Sequence[float], field: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    values = tuple(float(value) for value in values)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(
            f"Image processor {field} has {len(values)} values: expected 1 or 3 (one per RGB channel)"
        )
    return values
