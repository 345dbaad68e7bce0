"""Tests of the TAC connector: released key names and shapes, and its math against a plain re-computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from libra_model.configuration_libra import LibraConfig
from libra_model.connector import (
    LibraLinearProjector,
    LibraMlpProjector,
    LibraTemporalAlignmentConnector,
    build_projector,
)

# libra-v1.0-7b sizes: m = 768 (RAD-DINO width), H = 4096 (LLM width), h = 32 heads.
M, H = 768, 4096
RELEASED_TAC_SHAPES = {
    "model.mm_projector.LFE.0.fc1.weight": (6, 12, 1, 1),
    "model.mm_projector.LFE.0.fc1.bias": (6,),
    "model.mm_projector.LFE.0.fc2.weight": (12, 6, 1, 1),
    "model.mm_projector.LFE.0.fc2.bias": (12,),
    "model.mm_projector.LFE.1.weight": (6, 12, 1, 1),
    "model.mm_projector.LFE.2.fc1.weight": (3, 6, 1, 1),
    "model.mm_projector.LFE.2.fc1.bias": (3,),
    "model.mm_projector.LFE.2.fc2.weight": (6, 3, 1, 1),
    "model.mm_projector.LFE.2.fc2.bias": (6,),
    "model.mm_projector.LFE.3.weight": (3, 6, 1, 1),
    "model.mm_projector.LFE.4.fc1.weight": (1, 3, 1, 1),
    "model.mm_projector.LFE.4.fc1.bias": (1,),
    "model.mm_projector.LFE.4.fc2.weight": (3, 1, 1, 1),
    "model.mm_projector.LFE.4.fc2.bias": (3,),
    "model.mm_projector.LFE.5.weight": (1, 3, 1, 1),
    "model.mm_projector.LFE_prior_bias": (),
    "model.mm_projector.cur_self_attention.in_proj_weight": (3 * M, M),
    "model.mm_projector.cur_self_attention.in_proj_bias": (3 * M,),
    "model.mm_projector.cur_self_attention.bias_k": (1, 1, M),
    "model.mm_projector.cur_self_attention.bias_v": (1, 1, M),
    "model.mm_projector.cur_self_attention.out_proj.weight": (M, M),
    "model.mm_projector.cur_self_attention.out_proj.bias": (M,),
    "model.mm_projector.prior_self_attention.in_proj_weight": (3 * M, M),
    "model.mm_projector.prior_self_attention.in_proj_bias": (3 * M,),
    "model.mm_projector.prior_self_attention.bias_k": (1, 1, M),
    "model.mm_projector.prior_self_attention.bias_v": (1, 1, M),
    "model.mm_projector.prior_self_attention.out_proj.weight": (M, M),
    "model.mm_projector.prior_self_attention.out_proj.bias": (M,),
    "model.mm_projector.cros_attention.in_proj_weight": (3 * M, M),
    "model.mm_projector.cros_attention.in_proj_bias": (3 * M,),
    "model.mm_projector.cros_attention.bias_k": (1, 1, M),
    "model.mm_projector.cros_attention.bias_v": (1, 1, M),
    "model.mm_projector.cros_attention.out_proj.weight": (M, M),
    "model.mm_projector.cros_attention.out_proj.bias": (M,),
    "model.mm_projector.norm1.weight": (M,),
    "model.mm_projector.norm1.bias": (M,),
    "model.mm_projector.norm2.weight": (M,),
    "model.mm_projector.norm2.bias": (M,),
    "model.mm_projector.norm3.weight": (M,),
    "model.mm_projector.norm3.bias": (M,),
    "model.mm_projector.norm4.weight": (M,),
    "model.mm_projector.norm4.bias": (M,),
    "model.mm_projector.mlp_attn.0.weight": (M, M),
    "model.mm_projector.mlp_attn.0.bias": (M,),
    "model.mm_projector.mlp_attn.3.weight": (M, M),
    "model.mm_projector.mlp_attn.3.bias": (M,),
    "model.mm_projector.mlp_final.0.weight": (H, M),
    "model.mm_projector.mlp_final.0.bias": (H,),
    "model.mm_projector.mlp_final.2.weight": (H, H),
    "model.mm_projector.mlp_final.2.bias": (H,),
    "model.mm_projector.mlp_final.4.weight": (H, H),
    "model.mm_projector.mlp_final.4.bias": (H,),
    "model.mm_projector.mlp_final.6.weight": (H, H),
    "model.mm_projector.mlp_final.6.bias": (H,),
}


def released_size_connector_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        connector = LibraTemporalAlignmentConnector(M, H, num_heads=32)
    return {f"model.mm_projector.{key}": tuple(tensor.shape) for key, tensor in connector.state_dict().items()}


def test_released_table_has_54_tensors():
    assert len(RELEASED_TAC_SHAPES) == 54


def test_connector_keys_match_release():
    assert sorted(released_size_connector_shapes()) == sorted(RELEASED_TAC_SHAPES)


@pytest.mark.parametrize("key", sorted(RELEASED_TAC_SHAPES))
def test_connector_shape_matches_release(key):
    assert released_size_connector_shapes()[key] == RELEASED_TAC_SHAPES[key]


def test_connector_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="does not divide the vision width 10"):
        LibraTemporalAlignmentConnector(10, 16, num_heads=4)


def test_mlp2x_gelu_projector_keys():
    config = LibraConfig(
        hidden_size=16, num_attention_heads=2, mm_hidden_size=8, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2
    )
    projector = build_projector(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in projector.state_dict().items()}
    assert isinstance(projector, LibraMlpProjector)
    assert shapes == {"0.weight": (16, 8), "0.bias": (16,), "2.weight": (16, 16), "2.bias": (16,)}


def test_linear_projector_keys():
    config = LibraConfig(
        hidden_size=16, num_attention_heads=2, mm_hidden_size=8, mm_projector_type="linear", mm_vision_select_layer=-1
    )
    projector = build_projector(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in projector.state_dict().items()}
    assert isinstance(projector, LibraLinearProjector)
    assert shapes == {"weight": (16, 8), "bias": (16,)}


@pytest.mark.parametrize(("select_layer", "block_index"), [(-2, 10), (-1, 11), (12, 11), (1, 0)])
def test_single_layer_projector_selects_hidden_state(select_layer, block_index):
    projector = LibraLinearProjector(8, 16, select_layer=select_layer)
    tower_features = torch.randn(1, 12, 4, 8)
    assert torch.equal(projector.extract_layer_features(tower_features), tower_features[:, block_index])


# Plain re-computation of the TAC forward pass, written from the formulas without nn modules.


def gelu_exact(values: torch.Tensor) -> torch.Tensor:
    return 0.5 * values * (1.0 + torch.erf(values / math.sqrt(2.0)))


def squeeze_excitation(features, weights, prefix):
    means = features.mean(dim=(2, 3))
    fc1_weight = weights[f"{prefix}.fc1.weight"][:, :, 0, 0]
    fc2_weight = weights[f"{prefix}.fc2.weight"][:, :, 0, 0]
    hidden = gelu_exact(means @ fc1_weight.T + weights[f"{prefix}.fc1.bias"])
    gates = torch.sigmoid(hidden @ fc2_weight.T + weights[f"{prefix}.fc2.bias"])
    return features * gates[:, :, None, None]


def channel_mix(features, weight):
    return torch.einsum("oc,bcnd->bond", weight[:, :, 0, 0], features)


def layer_features(tower_features, weights):
    features = squeeze_excitation(tower_features, weights, "LFE.0")
    features = channel_mix(features, weights["LFE.1.weight"])
    features = squeeze_excitation(features, weights, "LFE.2")
    features = channel_mix(features, weights["LFE.3.weight"])
    features = squeeze_excitation(features, weights, "LFE.4")
    features = channel_mix(features, weights["LFE.5.weight"])
    return features[:, 0]


def attention_with_bias_kv(query, key_value, weights, prefix, num_heads):
    width = query.shape[-1]
    head_width = width // num_heads
    w_q, w_k, w_v = weights[f"{prefix}.in_proj_weight"].split(width)
    b_q, b_k, b_v = weights[f"{prefix}.in_proj_bias"].split(width)
    q = query @ w_q.T + b_q
    k = key_value @ w_k.T + b_k
    v = key_value @ w_v.T + b_v
    batch = query.shape[0]
    k = torch.cat([k, weights[f"{prefix}.bias_k"].expand(batch, 1, width)], dim=1)
    v = torch.cat([v, weights[f"{prefix}.bias_v"].expand(batch, 1, width)], dim=1)
    outputs = []
    for head in range(num_heads):
        columns = slice(head * head_width, (head + 1) * head_width)
        scores = q[..., columns] @ k[..., columns].transpose(1, 2) / math.sqrt(head_width)
        outputs.append(torch.softmax(scores, dim=-1) @ v[..., columns])
    concatenated = torch.cat(outputs, dim=-1)
    return concatenated @ weights[f"{prefix}.out_proj.weight"].T + weights[f"{prefix}.out_proj.bias"]


def layer_norm(values, weights, prefix):
    return F.layer_norm(values, values.shape[-1:], weights[f"{prefix}.weight"], weights[f"{prefix}.bias"], eps=1e-5)


def linear(values, weights, prefix):
    return values @ weights[f"{prefix}.weight"].T + weights[f"{prefix}.bias"]


def reference_tac(current_tower, prior_tower, weights, num_heads):
    current = layer_features(current_tower, weights)
    prior = layer_features(prior_tower, weights)

    current_flat = current.flatten(1)
    prior_flat = prior.flatten(1)
    cosine = ((current_flat / current_flat.norm(dim=1, keepdim=True)) * (prior_flat / prior_flat.norm(dim=1, keepdim=True))).sum(1)
    shift = ((cosine + 1) / 2) ** 8 * weights["LFE_prior_bias"]
    prior_shifted = prior + shift[:, None, None]

    current_tilde = layer_norm(current + attention_with_bias_kv(current, current, weights, "cur_self_attention", num_heads), weights, "norm1")
    prior_tilde = layer_norm(
        prior_shifted + attention_with_bias_kv(prior_shifted, prior_shifted, weights, "prior_self_attention", num_heads),
        weights,
        "norm2",
    )
    fused = layer_norm(current_tilde + attention_with_bias_kv(current_tilde, prior_tilde, weights, "cros_attention", num_heads), weights, "norm3")
    refined_input = linear(gelu_exact(linear(fused, weights, "mlp_attn.0")), weights, "mlp_attn.3")
    refined = layer_norm(current + refined_input, weights, "norm4")

    hidden = gelu_exact(linear(refined, weights, "mlp_final.0"))
    hidden = gelu_exact(linear(hidden, weights, "mlp_final.2"))
    hidden = gelu_exact(linear(hidden, weights, "mlp_final.4"))
    return linear(hidden, weights, "mlp_final.6")


@pytest.fixture
def small_connector():
    torch.manual_seed(7)
    connector = LibraTemporalAlignmentConnector(8, 16, num_heads=2).double().eval()
    with torch.no_grad():
        connector.LFE_prior_bias.fill_(0.8)
        for name, parameter in connector.named_parameters():
            # Non-trivial norms, biases and bias_k/v so that every term of the formulas is exercised.
            is_bias = name.endswith(("bias", "bias_k", "bias_v")) and name != "LFE_prior_bias"
            if name.startswith("norm") or is_bias:
                parameter.normal_(0.0, 0.5)
    return connector


def test_tac_matches_plain_recomputation(small_connector):
    generator = torch.Generator().manual_seed(3)
    current_tower = torch.randn(2, 12, 5, 8, generator=generator, dtype=torch.float64)
    prior_tower = torch.randn(2, 12, 5, 8, generator=generator, dtype=torch.float64)
    weights = {key: tensor.detach() for key, tensor in small_connector.state_dict().items()}

    with torch.no_grad():
        actual = small_connector(current_tower, prior_tower)
    expected = reference_tac(current_tower, prior_tower, weights, num_heads=2)

    assert actual.shape == (2, 5, 16)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def test_tac_prior_shift_uses_similarity_power(small_connector):
    generator = torch.Generator().manual_seed(4)
    current = torch.randn(1, 5, 8, generator=generator, dtype=torch.float64)
    prior = torch.randn(1, 5, 8, generator=generator, dtype=torch.float64)
    cosine = F.cosine_similarity(current.flatten(1), prior.flatten(1), dim=1)
    expected_shift = ((cosine + 1) / 2) ** 8 * 0.8

    with torch.no_grad():
        shifted = small_connector.shift_prior(current, prior)

    torch.testing.assert_close(shifted - prior, expected_shift[:, None, None].expand_as(prior))


def test_tac_identical_prior_gets_full_bias(small_connector):
    current = torch.randn(1, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        shifted = small_connector.shift_prior(current, current.clone())
    torch.testing.assert_close(shifted - current, torch.full_like(current, 0.8))


def test_tac_split_steps_equal_forward(small_connector):
    current_tower = torch.randn(1, 12, 5, 8, dtype=torch.float64)
    prior_tower = torch.randn(1, 12, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        whole = small_connector(current_tower, prior_tower)
        split = small_connector.fuse(
            small_connector.extract_layer_features(current_tower), small_connector.extract_layer_features(prior_tower)
        )
    assert torch.equal(whole, split)


def test_tac_rejects_wrong_layer_count(small_connector):
    with pytest.raises(ValueError, match="pass all 12 RAD-DINO block outputs"):
        small_connector.extract_layer_features(torch.randn(1, 11, 5, 8, dtype=torch.float64))
