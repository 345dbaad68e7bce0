"""RAD-DINO vision tower: a frozen Dinov2 encoder loaded from a local folder, never from a hub.

The tower returns the 12 transformer block outputs of each image, before the final LayerNorm and
without the CLS token, because the TAC connector consumes all of them. Its weights are those in
the tower folder, together with the folder's preprocessor_config.json.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
from torch import nn
from transformers import AutoImageProcessor, Dinov2Model

log = structlog.get_logger(__name__)

TOWER_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class VisionTowerNotFoundError(FileNotFoundError):
    """The RAD-DINO folder, or a file it must contain, does not exist locally."""


class LibraVisionTower(nn.Module):
    """Frozen RAD-DINO encoder that returns all 12 block outputs as patch features.

    The Libra model keeps it as `model.vision_tower`, so its Dinov2 parameters get the released
    prefix `model.vision_tower.vision_tower.`. Below that prefix, transformers 5.25 names some
    Dinov2 modules differently in memory (`attention.q_proj` for `attention.attention.query`)
    and converts the names when it reads or writes a Dinov2 checkpoint.

    Parameters
    ----------
    encoder : transformers.Dinov2Model
        The RAD-DINO encoder. It is switched to eval mode and frozen.
    image_processor : transformers.BaseImageProcessor
        The PIL-backed image processor from the same folder. Preprocessing reads its mean, std
        and crop size.
    folder : pathlib.Path
        The folder the encoder and processor were loaded from.
    """

    def __init__(self, encoder: Dinov2Model, image_processor, folder: Path) -> None:
        super().__init__()
        self.vision_tower = encoder
        self.image_processor = image_processor
        self.folder = folder
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LibraVisionTower:
        """Load RAD-DINO and its image processor from a local folder.

        Parameters
        ----------
        folder : str or pathlib.Path
            Folder with config.json, the weights (model.safetensors or pytorch_model.bin, single
            or sharded) and preprocessor_config.json.
        dtype : torch.dtype, optional
            Parameter dtype, or None for the checkpoint dtype.
        device : torch.device or str, optional
            Target device, or None for the CPU.

        Returns
        -------
        LibraVisionTower
            The frozen tower in eval mode.

        Raises
        ------
        VisionTowerNotFoundError
            If the folder or one of its required files is missing.
        """
        folder = Path(folder)
        check_vision_tower_folder(folder)
        encoder = Dinov2Model.from_pretrained(folder, local_files_only=True, dtype=dtype)
        if device is not None:
            encoder = encoder.to(device)
        # The PIL backend resizes on uint8 with PIL bicubic as the release does, and needs no torchvision.
        image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
        log.info("vision_tower.loaded", folder=str(folder), num_layers=encoder.config.num_hidden_layers)
        return cls(encoder, image_processor, folder)

    @property
    def hidden_size(self) -> int:
        """Width m of the encoder features."""
        return self.vision_tower.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the encoder."""
        return self.vision_tower.embeddings.patch_embeddings.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the encoder parameters."""
        return self.vision_tower.embeddings.patch_embeddings.projection.weight.device

    def train(self, mode: bool = True) -> LibraVisionTower:
        """Keep the encoder in eval mode whatever `mode` is, because the tower is frozen."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images into the stacked block outputs.

        Parameters
        ----------
        pixel_values : torch.Tensor
            Normalised images, shape (batch, 3, image_size, image_size).

        Returns
        -------
        torch.Tensor
            Patch features, shape (batch, num_layers, num_patches, hidden_size). They are the raw
            residual-stream states of blocks 1 to 12 (the final LayerNorm is not applied) with
            the CLS token removed.
        """
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        outputs = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        # hidden_states[0] is the embedding output, entries 1 to 12 are the block outputs.
        block_outputs = outputs.hidden_states[1:]
        return torch.stack([states[:, 1:] for states in block_outputs], dim=1)


def check_vision_tower_folder(folder: Path) -> None:
    """Raise VisionTowerNotFoundError naming the first file that the RAD-DINO folder lacks.

    Raises
    ------
    VisionTowerNotFoundError
        If `folder` is not a directory, or lacks config.json, the weights or
        preprocessor_config.json.
    """
    if not folder.is_dir():
        raise VisionTowerNotFoundError(
            f"RAD-DINO folder {folder} does not exist: download microsoft/rad-dino (config.json, "
            "model.safetensors, preprocessor_config.json) into a local folder and pass that folder "
            "as the vision tower path (vision_tower_path in the node configuration)."
        )
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise VisionTowerNotFoundError(
                f"RAD-DINO file {name} is missing from {folder}: copy it from the microsoft/rad-dino "
                "download into that folder."
            )
    if not any((folder / name).is_file() for name in TOWER_WEIGHT_FILES):
        raise VisionTowerNotFoundError(
            f"RAD-DINO weights are missing from {folder}: expected one of {', '.join(TOWER_WEIGHT_FILES)}. "
            "Copy model.safetensors from the microsoft/rad-dino download into that folder."
        )


def resolve_vision_tower_folder(
    mm_vision_tower: str | None,
    checkpoint_folder: Path | None,
    override: str | Path | None = None,
) -> Path:
    """Find the local RAD-DINO folder for a checkpoint.

    The explicit `override` wins. Otherwise `mm_vision_tower` from config.json is used if it is
    an existing folder: an absolute path as is, a relative path relative to the checkpoint folder.
    A hub id such as "microsoft/rad-dino" is never downloaded.

    Parameters
    ----------
    mm_vision_tower : str or None
        The `mm_vision_tower` value of config.json.
    checkpoint_folder : pathlib.Path or None
        The Libra checkpoint folder, for relative paths.
    override : str or pathlib.Path, optional
        A local RAD-DINO folder that replaces `mm_vision_tower`.

    Returns
    -------
    pathlib.Path
        The RAD-DINO folder. `LibraVisionTower.from_folder` checks its files later.

    Raises
    ------
    VisionTowerNotFoundError
        If the override is not a folder, or `mm_vision_tower` is unset or not a local folder.
    """
    if override is not None:
        return Path(override)
    if not mm_vision_tower:
        raise VisionTowerNotFoundError(
            "config.json sets no mm_vision_tower: download microsoft/rad-dino into a local folder and "
            "pass it as the vision tower path (vision_tower_path in the node configuration)."
        )
    candidate = Path(mm_vision_tower)
    if not candidate.is_absolute() and checkpoint_folder is not None:
        candidate = checkpoint_folder / candidate
    if candidate.is_dir():
        return candidate
    raise VisionTowerNotFoundError(
        f"mm_vision_tower {mm_vision_tower!r} is not a local folder and hub downloads are disabled: "
        f"download {mm_vision_tower} (config.json, model.safetensors, preprocessor_config.json) into a "
        "local folder and pass it as the vision tower path (vision_tower_path in the node configuration)."
    )


__all__ = [
    "LibraVisionTower",
    "VisionTowerNotFoundError",
    "check_vision_tower_folder",
    "resolve_vision_tower_folder",
]
