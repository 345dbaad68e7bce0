"""Command line: print the draft findings that Libra writes for a current image and an optional prior.

Usage: python -m libra_model.generate --model DIR [--vision-tower DIR] [--max-new-tokens N]
[--conversion mimic|released] CURRENT [PRIOR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pydicom
import structlog
from PIL import Image

from libra_model.report_generator import DEFAULT_MAX_NEW_TOKENS, ReportGenerator

DICOM_PREAMBLE_BYTES = 128
DICOM_MAGIC = b"DICM"


def is_dicom_file(path: Path) -> bool:
    """Return whether the file has the DICOM Part 10 magic "DICM" after its 128-byte preamble (PS3.10 7.1)."""
    with path.open("rb") as stream:
        header = stream.read(DICOM_PREAMBLE_BYTES + len(DICOM_MAGIC))
    return header[DICOM_PREAMBLE_BYTES:] == DICOM_MAGIC


def read_image(path: Path) -> pydicom.Dataset | Image.Image:
    """Read a DICOM Part 10 file as a data set, any other file as a PIL image.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist: pass the path of a DICOM or image file.")
    if is_dicom_file(path):
        return pydicom.dcmread(path)
    with Image.open(path) as image:
        image.load()
        return image


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m libra_model.generate",
        description="Print the draft findings that a local Libra checkpoint writes for a chest radiograph.",
    )
    parser.add_argument("--model", required=True, type=Path, help="Libra checkpoint folder (config.json, weights, tokenizer).")
    parser.add_argument(
        "--vision-tower",
        type=Path,
        default=None,
        help="local RAD-DINO folder (default: mm_vision_tower from the checkpoint's config.json)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"maximum number of generated tokens (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--conversion",
        choices=("mimic", "released"),
        default="mimic",
        help="DICOM to picture conversion: the MIMIC-CXR-JPG one (default) or the released code's",
    )
    parser.add_argument("--device", default="auto", help="\"auto\" (default), \"cpu\", \"cuda\" or \"cuda:N\"")
    parser.add_argument("current", type=Path, help="current image: a DICOM file or an image file such as PNG or JPEG")
    parser.add_argument("prior", type=Path, nargs="?", default=None, help="prior image of the same patient, optional")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    arguments = build_parser().parse_args(argv)
    # This process owns its output: logs go to stderr so that stdout carries only the findings text.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    current = read_image(arguments.current)
    prior = read_image(arguments.prior) if arguments.prior is not None else None
    generator = ReportGenerator.from_pretrained(
        arguments.model,
        vision_tower_dir=arguments.vision_tower,
        device=arguments.device,
        dicom_conversion=arguments.conversion,
    )
    report = generator.generate(current, prior, max_new_tokens=arguments.max_new_tokens)
    if report.is_demo_checkpoint:
        print("Demo checkpoint with random weights: the text below is meaningless.", file=sys.stderr)
    print(report.findings_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
