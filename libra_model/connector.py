"""Connectors that turn RAD-DINO features into LLM input embeddings, with the released key names.

The TAC (temporal alignment connector) owns the 54 tensors under `model.mm_projector.`: a
layerwise feature extractor (LFE) that collapses the 12 encoder layers of each image, and a
temporal fusion module (TFM) that fuses the current image with the prior. Its work is split in
two steps, so the per-image LFE output can be cached: `extract_layer_features` runs once per
image and `fuse` runs once per report.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from libra_model.configuration_libra import LibraConfig

NUM_VISION_LAYERS = 12
PRIOR_SIMILARITY_EXPONENT = 8
TFM_DROPOUT = 0.1


class LibraSqueezeExcitation(nn.Module):
    """Gate each channel of a (batch, channels, num_patches, width) tensor by its global mean.

    The gate is sigmoid(fc2(GELU(fc1(mean)))), where the mean runs over the patch and the feature
    axes and fc1 and fc2 are 1x1 convolutions with bias. Keys: `fc1.weight`, `fc1.bias`,
    `fc2.weight`, `fc2.bias`.

    Parameters
    ----------
    channels : int
        Number of input and output channels.
    hidden_channels : int
        Width of the bottleneck between fc1 and fc2.
    """

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden_channels, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(hidden_channels, channels, kernel_size=1, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scale each channel by its gate, keeping the shape."""
        channel_means = features.mean(dim=(2, 3), keepdim=True)
        gates = torch.sigmoid(self.fc2(F.gelu(self.fc1(channel_means))))
        return features * gates


class LibraTemporalAlignmentConnector(nn.Module):
    """TAC: layerwise feature extraction, then fusion of the current image with its prior.

    Owns the keys under `model.mm_projector.`: `LFE.{0..5}.*` and `LFE_prior_bias` for the LFE,
    and `cur_self_attention`, `prior_self_attention`, `cros_attention`, `norm1` to `norm4`,
    `mlp_attn` and `mlp_final` for the TFM.

    Parameters
    ----------
    vision_hidden_size : int
        Width m of the RAD-DINO features (`mm_hidden_size`).
    hidden_size : int
        Width H of the LLM embeddings.
    num_heads : int
        Head count of the three attention blocks, which is the LLM's `num_attention_heads`.

    Raises
    ------
    ValueError
        If `num_heads` does not divide `vision_hidden_size`.
    """

    def __init__(self, vision_hidden_size: int, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if vision_hidden_size % num_heads != 0:
            raise ValueError(
                f"TAC head count {num_heads} does not divide the vision width {vision_hidden_size}: "
                "use a num_attention_heads that divides mm_hidden_size."
            )
        width = vision_hidden_size

        self.LFE = nn.Sequential(
            LibraSqueezeExcitation(12, 6),
            nn.Conv2d(12, 6, kernel_size=1, bias=False),
            LibraSqueezeExcitation(6, 3),
            nn.Conv2d(6, 3, kernel_size=1, bias=False),
            LibraSqueezeExcitation(3, 1),
            nn.Conv2d(3, 1, kernel_size=1, bias=False),
        )
        self.LFE_prior_bias = nn.Parameter(torch.zeros(()))

        self.cur_self_attention = nn.MultiheadAttention(width, num_heads, add_bias_kv=True, batch_first=True)
        self.prior_self_attention = nn.MultiheadAttention(width, num_heads, add_bias_kv=True, batch_first=True)
        # NOTE: "cros_attention" is misspelled on purpose, because the released checkpoint keys use it.
        self.cros_attention = nn.MultiheadAttention(width, num_heads, add_bias_kv=True, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.norm4 = nn.LayerNorm(width)
        self.attention_dropout = nn.Dropout(TFM_DROPOUT)
        self.mlp_attn = nn.Sequential(
            nn.Linear(width, width),
            nn.GELU(),
            nn.Dropout(TFM_DROPOUT),
            nn.Linear(width, width),
            nn.Dropout(TFM_DROPOUT),
        )
        self.mlp_final = nn.Sequential(
            nn.Linear(width, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def extract_layer_features(self, tower_features: torch.Tensor) -> torch.Tensor:
        """Collapse the 12 encoder layers of each image into one feature map (the LFE).

        Parameters
        ----------
        tower_features : torch.Tensor
            Encoder block outputs, shape (batch, 12, num_patches, vision_hidden_size).

        Returns
        -------
        torch.Tensor
            Connector-ready features, shape (batch, num_patches, vision_hidden_size). These
            depend on one image only, so they can be cached per image.

        Raises
        ------
        ValueError
            If the layer axis does not have 12 entries.
        """
        if tower_features.dim() != 4 or tower_features.shape[1] != NUM_VISION_LAYERS:
            raise ValueError(
                f"TAC expects encoder features of shape (batch, {NUM_VISION_LAYERS}, num_patches, width), "
                f"got {tuple(tower_features.shape)}: pass all 12 RAD-DINO block outputs."
            )
        return self.LFE(tower_features).squeeze(1)

    def shift_prior(self, current_features: torch.Tensor, prior_features: torch.Tensor) -> torch.Tensor:
        """Add `LFE_prior_bias`, weighted by the similarity of current and prior, to the prior.

        The weight of sample b is ((cos_b + 1) / 2) ** 8, where cos_b is the cosine similarity of
        the flattened, L2-normalised current and prior LFE outputs. The shifted value is added to
        every element of that sample's prior features.

        Parameters
        ----------
        current_features, prior_features : torch.Tensor
            LFE outputs, shape (batch, num_patches, vision_hidden_size).

        Returns
        -------
        torch.Tensor
            Shifted prior features, same shape as `prior_features`.
        """
        current_flat = current_features.flatten(start_dim=1)
        prior_flat = prior_features.flatten(start_dim=1)
        # The release normalises without an epsilon before the cosine, so a zero vector gives NaN there too.
        current_unit = current_flat / current_flat.norm(dim=1, keepdim=True)
        prior_unit = prior_flat / prior_flat.norm(dim=1, keepdim=True)
        cosine = F.cosine_similarity(current_unit, prior_unit, dim=1, eps=1e-6)
        similarity_weight = ((cosine + 1) / 2) ** PRIOR_SIMILARITY_EXPONENT
        shift = similarity_weight * self.LFE_prior_bias
        return prior_features + shift[:, None, None]

    def fuse(self, current_features: torch.Tensor, prior_features: torch.Tensor) -> torch.Tensor:
        """Fuse current and prior LFE outputs into LLM image embeddings (the TFM).

        Parameters
        ----------
        current_features, prior_features : torch.Tensor
            LFE outputs from `extract_layer_features`, shape (batch, num_patches,
            vision_hidden_size). Without a prior study, pass the current features twice, as
            the released inference code does.

        Returns
        -------
        torch.Tensor
            Image embeddings, shape (batch, num_patches, hidden_size).
        """
        prior_shifted = self.shift_prior(current_features, prior_features)

        current_attended = self._attend(self.cur_self_attention, current_features, current_features)
        current_normed = self.norm1(current_features + self.attention_dropout(current_attended))

        prior_attended = self._attend(self.prior_self_attention, prior_shifted, prior_shifted)
        prior_normed = self.norm2(prior_shifted + self.attention_dropout(prior_attended))

        cross_attended = self._attend(self.cros_attention, current_normed, prior_normed)
        fused = self.norm3(current_normed + self.attention_dropout(cross_attended))

        # The release adds the raw LFE output here, not the attended features.
        refined = self.norm4(current_features + self.mlp_attn(fused))
        return self.mlp_final(refined)

    def forward(self, current_tower_features: torch.Tensor, prior_tower_features: torch.Tensor) -> torch.Tensor:
        """Run the LFE on both images and fuse them.

        Parameters
        ----------
        current_tower_features, prior_tower_features : torch.Tensor
            Encoder block outputs, shape (batch, 12, num_patches, vision_hidden_size).

        Returns
        -------
        torch.Tensor
            Image embeddings, shape (batch, num_patches, hidden_size).
        """
        current_features = self.extract_layer_features(current_tower_features)
        prior_features = self.extract_layer_features(prior_tower_features)
        return self.fuse(current_features, prior_features)

    @staticmethod
    def _attend(attention: nn.MultiheadAttention, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        attended, _ = attention(query, key_value, key_value, need_weights=False)
        return attended


class LibraSingleLayerProjectorMixin:
    """Layer selection and fusion shared by the projectors that read one image and one layer.

    These projectors ignore the prior image. `fuse` applies the projection to the current
    features only.
    """

    # NOTE: no released Libra checkpoint uses these projectors, so the LLaVA-style layer index and the
    # ignored prior are assumptions that were not compared with the reference code.

    select_layer: int

    def extract_layer_features(self, tower_features: torch.Tensor) -> torch.Tensor:
        """Select one encoder layer, shape (batch, 12, num_patches, width) to (batch, num_patches, width).

        `select_layer` indexes the encoder hidden states as LLaVA does, where index 0 is the
        embedding output, so index i >= 1 is block output i and a negative index counts from the
        last block.
        """
        if self.select_layer >= 0:
            return tower_features[:, self.select_layer - 1]
        return tower_features[:, self.select_layer]

    def fuse(self, current_features: torch.Tensor, prior_features: torch.Tensor) -> torch.Tensor:
        """Project the current features to (batch, num_patches, hidden_size), ignoring the prior."""
        return self(current_features)


class LibraMlpProjector(LibraSingleLayerProjectorMixin, nn.Sequential):
    """The `mlp2x_gelu` projector: Linear m->H, GELU, Linear H->H (keys `mm_projector.0.*`, `.2.*`)."""

    def __init__(self, vision_hidden_size: int, hidden_size: int, select_layer: int) -> None:
        super().__init__(nn.Linear(vision_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.select_layer = select_layer


class LibraLinearProjector(LibraSingleLayerProjectorMixin, nn.Linear):
    """The `linear` projector: one Linear m->H (keys `mm_projector.weight`, `mm_projector.bias`)."""

    def __init__(self, vision_hidden_size: int, hidden_size: int, select_layer: int) -> None:
        super().__init__(vision_hidden_size, hidden_size)
        self.select_layer = select_layer


def build_projector(config: LibraConfig) -> nn.Module:
    """Build the `mm_projector` named by `config.mm_projector_type`.

    Parameters
    ----------
    config : LibraConfig
        Checkpoint configuration. Reads `mm_projector_type`, `mm_hidden_size`, `hidden_size`,
        `num_attention_heads` and `mm_vision_select_layer`.

    Returns
    -------
    torch.nn.Module
        A module with `extract_layer_features(tower_features)` and `fuse(current, prior)`.

    Raises
    ------
    ValueError
        If the projector type or the layer selection is not supported.
    """
    if config.mm_vision_select_layer == 0:
        raise ValueError(
            "mm_vision_select_layer 0 selects the RAD-DINO embedding output, which this implementation "
            "does not keep: pick a block output such as -2."
        )
    if config.mm_projector_type == "TAC":
        return LibraTemporalAlignmentConnector(config.mm_hidden_size, config.hidden_size, config.num_attention_heads)
    if config.mm_projector_type == "mlp2x_gelu":
        return LibraMlpProjector(config.mm_hidden_size, config.hidden_size, config.mm_vision_select_layer)
    if config.mm_projector_type == "linear":
        return LibraLinearProjector(config.mm_hidden_size, config.hidden_size, config.mm_vision_select_layer)
    raise ValueError(
        f"mm_projector_type {config.mm_projector_type!r} is not supported: use TAC, mlp2x_gelu or linear."
    )


__all__ = [
    "LibraLinearProjector",
    "LibraMlpProjector",
    "LibraSqueezeExcitation",
    "LibraTemporalAlignmentConnector",
    "build_projector",
]
