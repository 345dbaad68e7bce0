"""Libra-v1.0 chest radiograph report model: checkpoint-compatible loading, generation and a tiny demo checkpoint.

Nothing here downloads weights: checkpoints and the RAD-DINO vision tower are read from local folders.
"""

from __future__ import annotations

from libra_model.configuration_libra import LibraConfig
from libra_model.modeling_libra import IMAGE_TOKEN_INDEX, LibraForCausalLM
from libra_model.preprocessing import dicom_to_image
from libra_model.report_generator import GeneratedReport, ReportGenerator
from libra_model.tiny import build_tiny_checkpoint

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "GeneratedReport",
    "LibraConfig",
    "LibraForCausalLM",
    "ReportGenerator",
    "build_tiny_checkpoint",
    "dicom_to_image",
]
