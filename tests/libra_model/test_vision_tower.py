"""Tests of the RAD-DINO tower: block outputs before the final LayerNorm, freezing and local-folder checks."""

from __future__ import annotations

import shutil

import pytest
import torch

from libra_model.modeling_libra import LibraForCausalLM
from libra_model.vision_tower import LibraVisionTower, VisionTowerNotFoundError, resolve_vision_tower_folder
from tests.libra_model.sample_images import make_pixel_values

pytestmark = pytest.mark.usefixtures("block_network")


@pytest.fixture
def tower(tiny_checkpoint) -> LibraVisionTower:
    return LibraVisionTower.from_folder(tiny_checkpoint / "rad-dino-tiny")


@pytest.fixture
def tower_folder_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint / "rad-dino-tiny", tmp_path / "rad-dino-tiny")


def test_tower_returns_twelve_patch_layers(tower):
    features = tower(make_pixel_values(1)[None])
    assert features.shape == (1, 12, 16, 32)


def test_tower_features_are_block_outputs_without_cls(tower):
    pixel_values = make_pixel_values(1)[None]
    with torch.no_grad():
        hidden_states = tower.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    expected = torch.stack([states[:, 1:] for states in hidden_states[1:13]], dim=1)
    assert torch.equal(tower(pixel_values), expected)


def test_tower_skips_final_layernorm(tower):
    pixel_values = make_pixel_values(1)[None]
    with torch.no_grad():
        normed_last_layer = tower.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
    assert not torch.allclose(tower(pixel_values)[:, -1], normed_last_layer)


def test_tower_is_frozen_and_stays_in_eval(tower):
    tower.train()
    assert not tower.vision_tower.training
    assert not any(parameter.requires_grad for parameter in tower.parameters())


def test_tower_output_has_no_grad(tower):
    features = tower(make_pixel_values(1)[None].requires_grad_(True))
    assert not features.requires_grad


def test_tower_loads_pil_image_processor(tower):
    assert type(tower.image_processor).__name__ == "BitImageProcessorPil"
    assert tower.image_processor.crop_size == {"height": 56, "width": 56}


@pytest.mark.parametrize("missing_name", ["config.json", "preprocessor_config.json", "model.safetensors"])
def test_missing_tower_file_is_named(tower_folder_copy, missing_name):
    (tower_folder_copy / missing_name).unlink()
    with pytest.raises(VisionTowerNotFoundError) as error:
        LibraVisionTower.from_folder(tower_folder_copy)
    assert missing_name in str(error.value)
    assert str(tower_folder_copy) in str(error.value)


def test_missing_tower_folder_is_named(tmp_path):
    with pytest.raises(VisionTowerNotFoundError) as error:
        LibraVisionTower.from_folder(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)
    assert "does not exist" in str(error.value)


def test_missing_override_folder_fails_model_load(tiny_checkpoint, tmp_path):
    with pytest.raises(VisionTowerNotFoundError, match="absent-rad-dino"):
        LibraForCausalLM.from_pretrained(tiny_checkpoint, vision_tower=tmp_path / "absent-rad-dino")


def test_resolve_relative_path_against_checkpoint(tiny_checkpoint):
    assert resolve_vision_tower_folder("rad-dino-tiny", tiny_checkpoint) == tiny_checkpoint / "rad-dino-tiny"


def test_resolve_override_wins(tiny_checkpoint, tmp_path):
    assert resolve_vision_tower_folder("rad-dino-tiny", tiny_checkpoint, tmp_path) == tmp_path


def test_resolve_hub_id_raises_download_hint(tiny_checkpoint):
    with pytest.raises(VisionTowerNotFoundError, match="download microsoft/rad-dino"):
        resolve_vision_tower_folder("microsoft/rad-dino", tiny_checkpoint)


def test_resolve_unset_tower_raises(tiny_checkpoint):
    with pytest.raises(VisionTowerNotFoundError, match="sets no mm_vision_tower"):
        resolve_vision_tower_folder(None, tiny_checkpoint)
