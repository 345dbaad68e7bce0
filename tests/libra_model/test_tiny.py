"""Tests of the tiny checkpoint builder: released layout, demo marker, tower subfolder and reproducibility."""

from __future__ import annotations

import hashlib
import json

import pytest
import sentencepiece
import torch
from safetensors.torch import load_file

from libra_model.tiny import build_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("block_network")

EXPECTED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "rad-dino-tiny/config.json",
    "rad-dino-tiny/model.safetensors",
    "rad-dino-tiny/preprocessor_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
]


def file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", EXPECTED_FILES)
def test_tiny_checkpoint_writes_file(tiny_checkpoint, name):
    assert (tiny_checkpoint / name).is_file()


def test_tiny_config_marks_demo_and_relative_tower(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["libra_demo_checkpoint"] is True
    assert config["model_type"] == "libra"
    assert config["mm_projector_type"] == "TAC"
    assert config["mm_vision_tower"] == "rad-dino-tiny"
    assert config["mm_hidden_size"] % config["num_attention_heads"] == 0


def test_tiny_vocab_matches_tokenizer(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    assert config["vocab_size"] == processor.get_piece_size()
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id()) == (0, 1, 2)
    assert processor.id_to_piece(2) == "</s>"


def test_tiny_tokenizer_has_byte_fallback(tiny_checkpoint):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    assert processor.piece_to_id("<0x0A>") != processor.unk_id()


def test_tiny_tower_is_rad_dino_shaped(tiny_checkpoint):
    tower_config = json.loads((tiny_checkpoint / "rad-dino-tiny" / "config.json").read_text())
    processor_config = json.loads((tiny_checkpoint / "rad-dino-tiny" / "preprocessor_config.json").read_text())
    assert tower_config["model_type"] == "dinov2"
    assert tower_config["num_hidden_layers"] == 12
    assert tower_config["patch_size"] == 14
    assert processor_config["image_processor_type"] == "BitImageProcessor"
    assert processor_config["crop_size"] == {"height": 56, "width": 56}


def test_tiny_prior_bias_is_nonzero(tiny_checkpoint):
    weights = load_file(tiny_checkpoint / "model.safetensors")
    assert weights["model.mm_projector.LFE_prior_bias"].shape == ()
    assert weights["model.mm_projector.LFE_prior_bias"].item() != 0.0


def test_tiny_weights_have_no_tower_copy(tiny_checkpoint):
    weights = load_file(tiny_checkpoint / "model.safetensors")
    assert not any(key.startswith("model.vision_tower.") for key in weights)


def test_tiny_build_is_reproducible(tiny_checkpoint, tmp_path):
    rebuilt = build_tiny_checkpoint(tmp_path / "again", seed=0)
    assert file_sha256(rebuilt / "model.safetensors") == file_sha256(tiny_checkpoint / "model.safetensors")
    assert file_sha256(rebuilt / "tokenizer.model") == file_sha256(tiny_checkpoint / "tokenizer.model")


def test_tiny_seed_changes_weights(tiny_checkpoint, tmp_path):
    rebuilt = build_tiny_checkpoint(tmp_path / "other", seed=1)
    assert file_sha256(rebuilt / "model.safetensors") != file_sha256(tiny_checkpoint / "model.safetensors")


def test_tiny_build_keeps_global_random_state(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoint(tmp_path / "tiny")
    assert torch.equal(torch.rand(3), expected)
