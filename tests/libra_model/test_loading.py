"""Tests of local-only checkpoint loading: folder layouts, key checks, missing files and the checkpoint hash."""

from __future__ import annotations

import hashlib
import socket
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from libra_model.loading import (
    CheckpointFileNotFoundError,
    CheckpointKeyMismatchError,
    compute_checkpoint_sha256,
    save_state_dict,
)
from libra_model.modeling_libra import LibraForCausalLM
from libra_model.prompts import DEFAULT_QUESTION, get_template, tokenize_prompt
from libra_model.tokenization_libra import LibraTokenizer
from libra_model.vision_tower import VisionTowerNotFoundError
from tests.libra_model.sample_images import make_pixel_values

pytestmark = pytest.mark.usefixtures("block_network")


def reference_logits(model: LibraForCausalLM, checkpoint_folder) -> torch.Tensor:
    tokenizer = LibraTokenizer.from_folder(checkpoint_folder)
    ids = tokenize_prompt(get_template("libra_v1").render(DEFAULT_QUESTION), tokenizer)
    images = torch.stack([make_pixel_values(1), make_pixel_values(2)])[:, None]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), images=images).logits


def llm_state_dict(model: LibraForCausalLM) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in model.state_dict().items() if not key.startswith("model.vision_tower.")}


def replace_weights(folder, serialization: str, max_shard_bytes: int | None, state_dict) -> None:
    (folder / "model.safetensors").unlink()
    save_state_dict(state_dict, folder, max_shard_bytes=max_shard_bytes, serialization=serialization)


def test_load_sets_eval_mode_and_hash(tiny_model):
    assert not tiny_model.training
    assert len(tiny_model.checkpoint_sha256) == 64


def test_save_then_load_gives_identical_logits(tiny_model, tiny_checkpoint, tmp_path):
    saved_folder = tiny_model.save_pretrained(tmp_path / "resaved")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (saved_folder / name).write_bytes((tiny_checkpoint / name).read_bytes())

    reloaded = LibraForCausalLM.from_pretrained(saved_folder, vision_tower=tiny_checkpoint / "rad-dino-tiny")

    assert torch.equal(reference_logits(tiny_model, tiny_checkpoint), reference_logits(reloaded, saved_folder))


def test_saved_weights_have_no_tower_copy(tiny_model, tmp_path):
    saved_folder = tiny_model.save_pretrained(tmp_path / "resaved")
    saved_keys = set(load_file(saved_folder / "model.safetensors"))
    assert saved_keys == set(llm_state_dict(tiny_model))


def test_saved_config_keeps_unknown_keys(tiny_model, tmp_path):
    tiny_model.config.site_specific_note = "kept"
    saved_folder = tiny_model.save_pretrained(tmp_path / "resaved")
    saved_config = json.loads((saved_folder / "config.json").read_text())
    assert saved_config["site_specific_note"] == "kept"
    assert saved_config["libra_demo_checkpoint"] is True


@pytest.mark.parametrize(
    ("serialization", "index_name"),
    [("bin", "pytorch_model.bin.index.json"), ("safetensors", "model.safetensors.index.json")],
)
def test_sharded_checkpoint_loads_same_logits(tiny_model, tiny_checkpoint, tiny_checkpoint_copy, serialization, index_name):
    replace_weights(tiny_checkpoint_copy, serialization, 200_000, llm_state_dict(tiny_model))
    num_shards = len(set(json.loads((tiny_checkpoint_copy / index_name).read_text())["weight_map"].values()))

    reloaded = LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)

    assert num_shards > 1
    assert torch.equal(reference_logits(tiny_model, tiny_checkpoint), reference_logits(reloaded, tiny_checkpoint_copy))


def test_single_bin_checkpoint_loads_same_logits(tiny_model, tiny_checkpoint, tiny_checkpoint_copy):
    replace_weights(tiny_checkpoint_copy, "bin", None, llm_state_dict(tiny_model))
    reloaded = LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)
    assert (tiny_checkpoint_copy / "pytorch_model.bin").is_file()
    assert torch.equal(reference_logits(tiny_model, tiny_checkpoint), reference_logits(reloaded, tiny_checkpoint_copy))


def test_vision_tower_copy_keys_are_ignored(tiny_model, tiny_checkpoint, tiny_checkpoint_copy):
    with_tower_copy = dict(tiny_model.state_dict())
    with_tower_copy["model.vision_tower.vision_tower.encoder.layer.0.attention.attention.query.weight"] = torch.zeros(2, 2)
    save_file({key: tensor.clone() for key, tensor in with_tower_copy.items()}, tiny_checkpoint_copy / "model.safetensors")

    reloaded = LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)

    assert torch.equal(reference_logits(tiny_model, tiny_checkpoint), reference_logits(reloaded, tiny_checkpoint_copy))


def test_unexpected_key_raises(tiny_model, tiny_checkpoint_copy):
    state_dict = llm_state_dict(tiny_model)
    state_dict["model.mm_projector.extra.weight"] = torch.zeros(3)
    replace_weights(tiny_checkpoint_copy, "safetensors", None, state_dict)
    with pytest.raises(CheckpointKeyMismatchError, match="model.mm_projector.extra.weight"):
        LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)


def test_missing_key_raises(tiny_model, tiny_checkpoint_copy):
    state_dict = llm_state_dict(tiny_model)
    del state_dict["model.mm_projector.LFE_prior_bias"]
    replace_weights(tiny_checkpoint_copy, "safetensors", None, state_dict)
    with pytest.raises(CheckpointKeyMismatchError, match="LFE_prior_bias"):
        LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)


def test_missing_config_names_file_and_folder(tiny_checkpoint_copy):
    (tiny_checkpoint_copy / "config.json").unlink()
    with pytest.raises(CheckpointFileNotFoundError) as error:
        LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)
    assert "config.json" in str(error.value)
    assert str(tiny_checkpoint_copy) in str(error.value)


def test_missing_weights_name_files_and_folder(tiny_checkpoint_copy):
    (tiny_checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointFileNotFoundError) as error:
        LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)
    assert "model.safetensors" in str(error.value)
    assert "pytorch_model.bin" in str(error.value)
    assert str(tiny_checkpoint_copy) in str(error.value)


def test_missing_shard_names_shard(tiny_model, tiny_checkpoint_copy):
    replace_weights(tiny_checkpoint_copy, "safetensors", 200_000, llm_state_dict(tiny_model))
    index = json.loads((tiny_checkpoint_copy / "model.safetensors.index.json").read_text())
    second_shard = sorted(set(index["weight_map"].values()))[1]
    (tiny_checkpoint_copy / second_shard).unlink()
    with pytest.raises(CheckpointFileNotFoundError, match=second_shard):
        LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)


def test_missing_checkpoint_folder_names_folder(tmp_path):
    with pytest.raises(CheckpointFileNotFoundError, match="does not exist"):
        LibraForCausalLM.from_pretrained(tmp_path / "absent")


def test_hub_id_vision_tower_asks_for_local_folder(tiny_checkpoint_copy):
    config_path = tiny_checkpoint_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["mm_vision_tower"] = "microsoft/rad-dino"
    config_path.write_text(json.dumps(config))

    with pytest.raises(VisionTowerNotFoundError) as error:
        LibraForCausalLM.from_pretrained(tiny_checkpoint_copy)

    assert "microsoft/rad-dino" in str(error.value)
    assert "download" in str(error.value)
    assert "vision_tower_path" in str(error.value)


def test_hub_id_vision_tower_with_override_loads(tiny_checkpoint, tiny_checkpoint_copy):
    config_path = tiny_checkpoint_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["mm_vision_tower"] = "microsoft/rad-dino"
    config_path.write_text(json.dumps(config))

    model = LibraForCausalLM.from_pretrained(tiny_checkpoint_copy, vision_tower=tiny_checkpoint / "rad-dino-tiny")

    assert model.get_vision_tower().folder == tiny_checkpoint / "rad-dino-tiny"


def test_checkpoint_sha256_streams_config_then_weights(tiny_checkpoint, tiny_model):
    expected = hashlib.sha256(
        (tiny_checkpoint / "config.json").read_bytes() + (tiny_checkpoint / "model.safetensors").read_bytes()
    ).hexdigest()
    assert tiny_model.checkpoint_sha256 == expected
    assert compute_checkpoint_sha256(tiny_checkpoint / "config.json", [tiny_checkpoint / "model.safetensors"]) == expected


@pytest.mark.parametrize(("torch_dtype", "expected"), [("bfloat16", torch.bfloat16), ("auto", torch.float32), (None, torch.float32)])
def test_from_pretrained_casts_dtype(tiny_checkpoint, torch_dtype, expected):
    model = LibraForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch_dtype)
    assert model.lm_head.weight.dtype == expected
    assert model.model.mm_projector.LFE_prior_bias.dtype == expected
    assert model.get_vision_tower().dtype == expected


def test_from_pretrained_rejects_unknown_dtype(tiny_checkpoint):
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        LibraForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype="int8")


def test_network_block_is_active():
    with pytest.raises(OSError, match="must stay offline"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
