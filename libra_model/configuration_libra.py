"""Libra configuration: a LLaMA configuration plus the multimodal `mm_*` keys of the released config.json.

Keys that this class does not declare are kept as attributes, so a released config.json survives a
load and save round trip. One exception is transformers' own normalisation: `rope_theta` and
`rope_scaling` are written back as `rope_parameters`.
"""

from __future__ import annotations

from transformers import LlamaConfig

SUPPORTED_PROJECTOR_TYPES = ("TAC", "mlp2x_gelu", "linear")


class LibraConfig(LlamaConfig):
    """Configuration of a Libra checkpoint (`model_type` "libra").

    The LLaMA fields (`hidden_size`, `num_attention_heads`, `vocab_size` and so on) configure the
    language model. The fields below come from the released libra-v1.0-7b config.json, and their
    defaults are the released values where the release sets one.

    Parameters
    ----------
    mm_vision_tower : str or None
        RAD-DINO location: a hub id such as "microsoft/rad-dino" (never downloaded), an absolute
        folder, or a folder relative to the checkpoint folder.
    mm_hidden_size : int
        Width m of the vision features, 768 for RAD-DINO.
    mm_projector_type : str
        "TAC" (temporal alignment connector), "mlp2x_gelu" or "linear".
    mm_vision_select_layer : int or str
        "all" for TAC, which consumes all 12 encoder block outputs. For the other projector
        types, an index into the encoder hidden states where 0 is the embedding output, as in
        LLaVA (for example -2).
    mm_vision_select_feature : str
        "patch": the CLS token is dropped. This is the only supported value.
    mm_use_im_start_end, mm_use_im_patch_token : bool
        Image start/end and patch tokens. Both are false in the release and must stay false.
    image_aspect_ratio : str
        "pad": images are padded to a square with the processor mean colour before resizing.
    libra_demo_checkpoint : bool
        True for the tiny random checkpoint built by `libra_model.tiny`, whose text is meaningless.
    **kwargs
        Any other config.json key, kept as an attribute.

    Raises
    ------
    ValueError
        If a `mm_*` value names a variant that this implementation does not support.
    """

    model_type = "libra"

    mm_vision_tower: str | None = None
    mm_hidden_size: int = 768
    mm_projector_type: str = "TAC"
    mm_vision_select_layer: int | str = "all"
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    image_aspect_ratio: str = "pad"
    use_mm_proj: bool = True
    tune_mm_mlp_adapter: bool = False
    freeze_mm_mlp_adapter: bool = True
    mm_projector_lr: float | None = None
    tokenizer_model_max_length: int | None = None
    tokenizer_padding_side: str = "right"
    libra_demo_checkpoint: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_multimodal_fields()

    def validate_multimodal_fields(self) -> None:
        """Raise ValueError naming the key when a `mm_*` value is not supported.

        Raises
        ------
        ValueError
            If the projector type, layer selection, feature selection or image token flags
            are outside what the released checkpoints use.
        """
        if self.mm_projector_type not in SUPPORTED_PROJECTOR_TYPES:
            raise ValueError(
                f"mm_projector_type {self.mm_projector_type!r} is not supported: "
                f"set it to one of {', '.join(SUPPORTED_PROJECTOR_TYPES)} in config.json."
            )
        if self.mm_projector_type == "TAC" and self.mm_vision_select_layer != "all":
            raise ValueError(
                f"mm_vision_select_layer {self.mm_vision_select_layer!r} does not work with the TAC "
                "projector, which consumes all 12 encoder layers: set it to \"all\" in config.json."
            )
        if self.mm_projector_type != "TAC" and not isinstance(self.mm_vision_select_layer, int):
            raise ValueError(
                f"mm_vision_select_layer {self.mm_vision_select_layer!r} does not work with the "
                f"{self.mm_projector_type} projector, which reads one encoder layer: set it to a "
                "hidden-state index such as -2 in config.json."
            )
        if self.mm_vision_select_feature != "patch":
            raise ValueError(
                f"mm_vision_select_feature {self.mm_vision_select_feature!r} is not supported: "
                "set it to \"patch\" in config.json."
            )
        if self.mm_use_im_start_end or self.mm_use_im_patch_token:
            raise ValueError(
                "mm_use_im_start_end and mm_use_im_patch_token must both be false, because this "
                "implementation splices the image at a single <image> placeholder: set both to false "
                "in config.json."
            )
        if self.mm_hidden_size % self.num_attention_heads != 0 and self.mm_projector_type == "TAC":
            raise ValueError(
                f"mm_hidden_size {self.mm_hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}, which the TAC attention blocks use as their head count: "
                "pick sizes where the heads divide mm_hidden_size."
            )


__all__ = ["LibraConfig", "SUPPORTED_PROJECTOR_TYPES"]
