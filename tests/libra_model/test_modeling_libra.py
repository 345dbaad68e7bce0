"""Tests of the Libra model: released key layout, image splicing, prior handling and cached generation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from libra_model.configuration_libra import LibraConfig
from libra_model.modeling_libra import IMAGE_TOKEN_INDEX, LibraForCausalLM
from libra_model.prompts import DEFAULT_QUESTION, get_template, tokenize_prompt
from libra_model.tokenization_libra import LibraTokenizer
from tests.libra_model.sample_images import make_pixel_values

pytestmark = pytest.mark.usefixtures("block_network")

LAYER_KEY_SUFFIXES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
NUM_TINY_PATCHES = 16


@pytest.fixture
def prompt_ids(tiny_checkpoint) -> torch.Tensor:
    tokenizer = LibraTokenizer.from_folder(tiny_checkpoint)
    ids = tokenize_prompt(get_template("libra_v1").render(DEFAULT_QUESTION), tokenizer)
    return torch.tensor([ids])


def image_pair(current_seed: int, prior_seed: int) -> torch.Tensor:
    return torch.stack([make_pixel_values(current_seed), make_pixel_values(prior_seed)])[:, None]


def test_fresh_model_has_released_keys(tiny_checkpoint):
    model = LibraForCausalLM(LibraConfig.from_pretrained(tiny_checkpoint))
    keys = set(model.state_dict())
    projector_keys = {key for key in keys if key.startswith("model.mm_projector.")}
    layer_keys = {f"model.layers.{index}.{suffix}" for index in range(2) for suffix in LAYER_KEY_SUFFIXES}
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | layer_keys | projector_keys
    assert len(projector_keys) == 54
    assert keys == expected


def test_loaded_model_keeps_tower_under_released_prefix(tiny_model):
    tower_keys = [key for key in tiny_model.state_dict() if key.startswith("model.vision_tower.")]
    assert tower_keys
    assert all(key.startswith("model.vision_tower.vision_tower.") for key in tower_keys)


def test_forward_covers_expanded_sequence(tiny_model, prompt_ids):
    with torch.no_grad():
        logits = tiny_model(input_ids=prompt_ids, images=image_pair(1, 2)).logits
    assert logits.shape == (1, prompt_ids.shape[1] - 1 + NUM_TINY_PATCHES, tiny_model.config.vocab_size)


def test_forward_rejects_placeholder_without_images(tiny_model, prompt_ids):
    with pytest.raises(ValueError, match="no images were given"):
        tiny_model(input_ids=prompt_ids)


def test_forward_rejects_two_placeholders(tiny_model, prompt_ids):
    doubled = torch.cat([prompt_ids, torch.tensor([[IMAGE_TOKEN_INDEX]])], dim=1)
    with pytest.raises(ValueError, match="contains 2 image placeholders"):
        tiny_model(input_ids=doubled, images=image_pair(1, 2))


def test_encode_images_rejects_missing_prior_slot(tiny_model):
    with pytest.raises(ValueError, match="stack the current image twice"):
        tiny_model.encode_images(make_pixel_values(1)[None, None])


def test_tiny_prior_bias_is_nonzero(tiny_model):
    assert tiny_model.model.mm_projector.LFE_prior_bias.item() != 0.0


def test_different_prior_changes_logits(tiny_model, prompt_ids):
    with torch.no_grad():
        with_prior_a = tiny_model(input_ids=prompt_ids, images=image_pair(1, 2)).logits
        with_prior_b = tiny_model(input_ids=prompt_ids, images=image_pair(1, 3)).logits
    assert not torch.allclose(with_prior_a, with_prior_b)


def test_current_as_prior_equals_reused_features(tiny_model, prompt_ids):
    current = make_pixel_values(1)
    with torch.no_grad():
        duplicated = tiny_model(input_ids=prompt_ids, images=image_pair(1, 1)).logits
        features = tiny_model.extract_image_features(current[None])
        reused = tiny_model(input_ids=prompt_ids, image_embeddings=tiny_model.fuse_image_features(features, features)).logits
    assert torch.equal(duplicated, reused)


def test_cached_generation_matches_full_forward(tiny_model, prompt_ids):
    images = image_pair(1, 2)
    output = tiny_model.generate(
        prompt_ids,
        images,
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new_ids = output.sequences
    step_logits = torch.stack(output.logits, dim=1)

    with torch.no_grad():
        full_logits = tiny_model(input_ids=torch.cat([prompt_ids, new_ids[:, :-1]], dim=1), images=images).logits
    recomputed = full_logits[:, -new_ids.shape[1] :]

    assert new_ids.shape[1] >= 2
    torch.testing.assert_close(step_logits, recomputed, rtol=1e-4, atol=1e-5)


def test_decode_positions_continue_over_expanded_sequence(tiny_model, prompt_ids):
    images = image_pair(1, 2)
    next_token = torch.tensor([[5]])
    expanded_length = prompt_ids.shape[1] - 1 + NUM_TINY_PATCHES

    with torch.no_grad():
        full_logits = tiny_model(input_ids=torch.cat([prompt_ids, next_token], dim=1), images=images).logits[:, -1]

        cache = DynamicCache(config=tiny_model.config)
        tiny_model(input_ids=prompt_ids, images=images, cache=cache, use_cache=True)
        assert cache.get_seq_length() == expanded_length
        cached_logits = tiny_model(input_ids=next_token, cache=cache, use_cache=True).logits[:, -1]

        cache = DynamicCache(config=tiny_model.config)
        tiny_model(input_ids=prompt_ids, images=images, cache=cache, use_cache=True)
        raw_position = torch.tensor([[prompt_ids.shape[1]]])
        raw_position_logits = tiny_model(
            input_ids=next_token, cache=cache, use_cache=True, position_ids=raw_position
        ).logits[:, -1]

    torch.testing.assert_close(cached_logits, full_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw_position_logits, full_logits, rtol=1e-4, atol=1e-5)


def test_generate_returns_new_tokens_only(tiny_model, prompt_ids):
    new_ids = tiny_model.generate(prompt_ids, image_pair(1, 2), max_new_tokens=4, do_sample=False)
    assert new_ids.shape[0] == 1
    assert 1 <= new_ids.shape[1] <= 4
    assert IMAGE_TOKEN_INDEX not in new_ids.tolist()[0]


def test_generate_greedy_is_deterministic(tiny_model, prompt_ids):
    first = tiny_model.generate(prompt_ids, image_pair(1, 2), max_new_tokens=8, do_sample=False)
    second = tiny_model.generate(prompt_ids, image_pair(1, 2), max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)


def test_generate_requires_image(tiny_model, prompt_ids):
    with pytest.raises(ValueError, match="needs an image"):
        tiny_model.generate(prompt_ids, max_new_tokens=2)


def test_get_vision_tower_without_tower_raises(tiny_checkpoint):
    model = LibraForCausalLM(LibraConfig.from_pretrained(tiny_checkpoint))
    with pytest.raises(RuntimeError, match="attach_vision_tower"):
        model.get_vision_tower()


def test_generate_encodes_images_once(tiny_model, prompt_ids):
    tower_calls = []
    tiny_model.get_vision_tower().register_forward_hook(lambda module, inputs, output: tower_calls.append(1))
    new_ids = tiny_model.generate(prompt_ids, image_pair(1, 2), max_new_tokens=4, do_sample=False)
    assert new_ids.shape[1] >= 2
    assert len(tower_calls) == 2
