"""Tests of LibraConfig: reading the released config.json, keeping unknown keys and rejecting unsupported variants."""

from __future__ import annotations

import json

import pytest

from libra_model.configuration_libra import LibraConfig

# config.json of libra-v1.0-7b as published, with one key added that no class declares.
RELEASED_7B_CONFIG = {
    "model_type": "libra",
    "architectures": ["LibraLlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32017,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
    "use_cache": False,
    "mm_vision_tower": "microsoft/rad-dino",
    "mm_hidden_size": 768,
    "mm_projector_type": "TAC",
    "mm_vision_select_layer": "all",
    "mm_vision_select_feature": "patch",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_aspect_ratio": "pad",
    "use_mm_proj": True,
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": True,
    "mm_projector_lr": 2e-05,
    "tokenizer_model_max_length": 4096,
    "tokenizer_padding_side": "right",
    "transformers_version": "4.43.3",
    "mm_site_extra": {"kept": True},
}
MULTIMODAL_KEYS = [key for key in RELEASED_7B_CONFIG if key.startswith(("mm_", "tokenizer_"))] + [
    "image_aspect_ratio",
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
]


@pytest.fixture
def released_folder(tmp_path):
    folder = tmp_path / "libra-v1.0-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(RELEASED_7B_CONFIG))
    return folder


def test_released_config_reads_llm_fields(released_folder):
    config = LibraConfig.from_pretrained(released_folder, local_files_only=True)
    assert config.model_type == "libra"
    assert config.hidden_size == 4096
    assert config.num_attention_heads == 32
    assert config.vocab_size == 32017
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.tie_word_embeddings is False


@pytest.mark.parametrize("key", MULTIMODAL_KEYS)
def test_released_config_reads_multimodal_field(released_folder, key):
    config = LibraConfig.from_pretrained(released_folder, local_files_only=True)
    assert getattr(config, key) == RELEASED_7B_CONFIG[key]


def test_save_load_round_trip_keeps_keys(released_folder, tmp_path):
    config = LibraConfig.from_pretrained(released_folder, local_files_only=True)
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = LibraConfig.from_pretrained(tmp_path / "saved", local_files_only=True)

    for key in [*MULTIMODAL_KEYS, "architectures"]:
        assert saved[key] == RELEASED_7B_CONFIG[key], key
    assert reloaded.mm_site_extra == {"kept": True}
    assert reloaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mm_projector_type": "qformer"}, "mm_projector_type 'qformer' is not supported"),
        ({"mm_vision_select_layer": -2}, "does not work with the TAC projector"),
        ({"mm_projector_type": "linear"}, "does not work with the linear projector"),
        ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature 'cls_patch' is not supported"),
        ({"mm_use_im_start_end": True}, "must both be false"),
        ({"mm_hidden_size": 100}, "mm_hidden_size 100 is not divisible by num_attention_heads 32"),
    ],
)
def test_unsupported_multimodal_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        LibraConfig(**{**RELEASED_7B_CONFIG, **overrides})
