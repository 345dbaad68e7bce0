"""Libra model: a LLaMA language model that reads RAD-DINO features through the TAC connector.

The image embeddings replace the single placeholder id IMAGE_TOKEN_INDEX (-200) in the prompt,
and positions run over the expanded sequence. The state-dict keys are the released ones:
`model.embed_tokens.weight`, `model.layers.{i}.*`, `model.norm.weight`, `model.mm_projector.*`
and `lm_head.weight`. An attached vision tower adds `model.vision_tower.vision_tower.*`, which
`save_pretrained` leaves out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel, LlamaRotaryEmbedding

from libra_model.configuration_libra import LibraConfig
from libra_model.connector import build_projector
from libra_model.vision_tower import LibraVisionTower, resolve_vision_tower_folder

IMAGE_TOKEN_INDEX = -200
VISION_TOWER_KEY_PREFIX = "model.vision_tower."


class LibraPreTrainedModel(LlamaPreTrainedModel):
    """Base class that ties the Libra modules to `LibraConfig`."""

    config: LibraConfig
    config_class = LibraConfig
    base_model_prefix = "model"


class LibraLlamaModel(LlamaModel):
    """LLaMA decoder stack plus the image connector and, once attached, the vision tower.

    Owns the keys `model.embed_tokens.*`, `model.layers.*`, `model.norm.*` and
    `model.mm_projector.*`. The vision tower is attached after construction because it is
    loaded from its own folder.

    Parameters
    ----------
    config : LibraConfig
        Checkpoint configuration.
    """

    config_class = LibraConfig

    def __init__(self, config: LibraConfig) -> None:
        super().__init__(config)
        self.mm_projector = build_projector(config)
        self.vision_tower: LibraVisionTower | None = None


class LibraForCausalLM(LibraPreTrainedModel, GenerationMixin):
    """Libra report model: vision tower, connector, LLaMA decoder and language-model head.

    Parameters
    ----------
    config : LibraConfig
        Checkpoint configuration.

    Attributes
    ----------
    checkpoint_folder : pathlib.Path or None
        Folder the weights were loaded from, set by `from_pretrained`.
    checkpoint_sha256 : str or None
        SHA-256 (hex) over config.json and the weight files, set by `from_pretrained`.
    """

    _tied_weights_keys = None

    def __init__(self, config: LibraConfig) -> None:
        super().__init__(config)
        self.model = LibraLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.checkpoint_folder: Path | None = None
        self.checkpoint_sha256: str | None = None
        self.post_init()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        vision_tower: str | Path | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
    ) -> LibraForCausalLM:
        """Load a released-layout Libra checkpoint and its RAD-DINO tower from local folders.

        Nothing is downloaded. See `libra_model.loading.load_libra_checkpoint` for the files
        read, the key checks and the errors raised.

        Parameters
        ----------
        pretrained_model_name_or_path : str or pathlib.Path
            The Libra checkpoint folder.
        vision_tower : str or pathlib.Path, optional
            Local RAD-DINO folder, which replaces `mm_vision_tower` from config.json.
        torch_dtype : torch.dtype or str, optional
            Parameter dtype: a torch dtype, its name ("float16") or "auto" for the dtype in
            config.json. None means float32.
        device_map : str or torch.device, optional
            One device for the whole model ("cpu", "cuda", "cuda:1"), or "auto" for the first
            CUDA device when there is one and the CPU otherwise. None means CPU.

        Returns
        -------
        LibraForCausalLM
            The model in eval mode, with `checkpoint_folder` and `checkpoint_sha256` set.
        """
        from libra_model.loading import load_libra_checkpoint

        return load_libra_checkpoint(
            pretrained_model_name_or_path,
            vision_tower=vision_tower,
            torch_dtype=torch_dtype,
            device_map=device_map,
        )

    def save_pretrained(self, save_directory: str | Path, *, max_shard_bytes: int | None = None) -> Path:
        """Write config.json and the weights in the released layout, without the vision tower copy.

        Parameters
        ----------
        save_directory : str or pathlib.Path
            Target folder, created when missing.
        max_shard_bytes : int, optional
            Split the weights into `model-0000i-of-0000n.safetensors` shards of at most this size,
            with a `model.safetensors.index.json`. One `model.safetensors` when None.

        Returns
        -------
        pathlib.Path
            The folder written.
        """
        from libra_model.loading import save_state_dict

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        state_dict = {
            key: tensor for key, tensor in self.state_dict().items() if not key.startswith(VISION_TOWER_KEY_PREFIX)
        }
        save_state_dict(state_dict, folder, max_shard_bytes=max_shard_bytes)
        return folder

    def get_input_embeddings(self) -> nn.Embedding:
        """Token embedding table `model.embed_tokens`."""
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        """Language-model head `lm_head`."""
        return self.lm_head

    @property
    def is_demo_checkpoint(self) -> bool:
        """Whether config.json marks this as the tiny random demo checkpoint."""
        return bool(self.config.libra_demo_checkpoint)

    def get_vision_tower(self) -> LibraVisionTower:
        """Return the attached RAD-DINO tower.

        Raises
        ------
        RuntimeError
            If no tower is attached yet.
        """
        tower = self.model.vision_tower
        if tower is None:
            raise RuntimeError(
                "The Libra model has no vision tower attached: load it with "
                "LibraForCausalLM.from_pretrained(folder, vision_tower=RAD_DINO_FOLDER) or call "
                "attach_vision_tower(RAD_DINO_FOLDER)."
            )
        return tower

    def attach_vision_tower(self, override: str | Path | None = None) -> LibraVisionTower:
        """Load RAD-DINO from a local folder and attach it as `model.vision_tower`.

        The folder is `override` when given, else `config.mm_vision_tower` (relative paths are
        resolved against the checkpoint folder). The tower takes the dtype and device of the
        connector.

        Parameters
        ----------
        override : str or pathlib.Path, optional
            Local RAD-DINO folder.

        Returns
        -------
        LibraVisionTower
            The attached, frozen tower.

        Raises
        ------
        libra_model.vision_tower.VisionTowerNotFoundError
            If no local folder is found or it lacks a required file.
        """
        folder = resolve_vision_tower_folder(self.config.mm_vision_tower, self.checkpoint_folder, override)
        reference = next(self.model.mm_projector.parameters())
        tower = LibraVisionTower.from_folder(folder, dtype=reference.dtype, device=reference.device)
        if tower.hidden_size != self.config.mm_hidden_size:
            raise ValueError(
                f"RAD-DINO in {folder} has hidden size {tower.hidden_size} but config.json sets "
                f"mm_hidden_size {self.config.mm_hidden_size}: point the vision tower path at the "
                "encoder this checkpoint was trained with."
            )
        self.model.vision_tower = tower
        return tower

    def extract_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images and collapse the encoder layers into connector-ready features.

        Parameters
        ----------
        pixel_values : torch.Tensor
            Normalised images, shape (batch, 3, image_size, image_size).

        Returns
        -------
        torch.Tensor
            Per-image features, shape (batch, num_patches, mm_hidden_size): the LFE output for
            TAC, the selected encoder layer for the other projectors. They depend on one image
            only, so a caller may cache them by SOP Instance UID.
        """
        tower_features = self.get_vision_tower()(pixel_values)
        projector = self.model.mm_projector
        reference = next(projector.parameters())
        tower_features = tower_features.to(device=reference.device, dtype=reference.dtype)
        return projector.extract_layer_features(tower_features)

    def fuse_image_features(self, current_features: torch.Tensor, prior_features: torch.Tensor) -> torch.Tensor:
        """Fuse current and prior connector-ready features into image embeddings.

        Parameters
        ----------
        current_features, prior_features : torch.Tensor
            Outputs of `extract_image_features`, shape (batch, num_patches, mm_hidden_size).
            Without a prior study, pass the current features twice, as the released inference
            code does.

        Returns
        -------
        torch.Tensor
            Image embeddings, shape (batch, num_patches, hidden_size).
        """
        return self.model.mm_projector.fuse(current_features, prior_features)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode current and prior images into image embeddings.

        Parameters
        ----------
        images : torch.Tensor
            Shape (2, batch, 3, image_size, image_size): index 0 contains the current images and
            index 1 the priors. The two are encoded separately, as in the release.

        Returns
        -------
        torch.Tensor
            Image embeddings, shape (batch, num_patches, hidden_size).

        Raises
        ------
        ValueError
            If the first dimension is not 2.
        """
        if images.dim() != 5 or images.shape[0] != 2:
            raise ValueError(
                f"images must have shape (2, batch, 3, height, width) with the current images at index 0 "
                f"and the priors at index 1, got {tuple(images.shape)}: without a prior, stack the current "
                "image twice."
            )
        current_features = self.extract_image_features(images[0])
        prior_features = self.extract_image_features(images[1])
        return self.fuse_image_features(current_features, prior_features)

    def splice_image_embeddings(
        self,
        input_ids: torch.Tensor,
        image_embeddings: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the placeholder id -200 of each sample by its image embeddings.

        Parameters
        ----------
        input_ids : torch.Tensor
            Token ids, shape (batch, seq_len), with exactly one IMAGE_TOKEN_INDEX per sample.
        image_embeddings : torch.Tensor
            Shape (batch, num_patches, hidden_size).
        attention_mask : torch.Tensor, optional
            Shape (batch, seq_len), all ones when None.

        Returns
        -------
        tuple of torch.Tensor
            Input embeddings of shape (batch, seq_len - 1 + num_patches, hidden_size) and the
            attention mask of shape (batch, seq_len - 1 + num_patches), with ones at the image
            positions.

        Raises
        ------
        ValueError
            If a sample has no placeholder or more than one, or the batch sizes differ.
        """
        batch_size = input_ids.shape[0]
        if image_embeddings.shape[0] != batch_size:
            raise ValueError(
                f"got {image_embeddings.shape[0]} image embeddings for {batch_size} prompts: pass one "
                "current/prior pair per prompt."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embedding_layer = self.model.embed_tokens
        image_embeddings = image_embeddings.to(device=embedding_layer.weight.device, dtype=embedding_layer.weight.dtype)
        num_patches = image_embeddings.shape[1]

        sample_embeddings = []
        sample_masks = []
        for index in range(batch_size):
            ids = input_ids[index]
            placeholder_positions = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            if len(placeholder_positions) != 1:
                raise ValueError(
                    f"prompt {index} contains {len(placeholder_positions)} image placeholders "
                    f"({IMAGE_TOKEN_INDEX}), but Libra takes exactly one image pair per prompt: put one "
                    "<image> in the prompt."
                )
            position = placeholder_positions[0]
            before = embedding_layer(ids[:position])
            after = embedding_layer(ids[position + 1 :])
            sample_embeddings.append(torch.cat([before, image_embeddings[index], after], dim=0))
            mask = attention_mask[index]
            # NOTE: the image positions get mask ones at the placeholder. The released batch helper puts them
            # at the left instead, so its left-padded prompts of unequal length differ from ours.
            image_mask = mask.new_ones(num_patches)
            sample_masks.append(torch.cat([mask[:position], image_mask, mask[position + 1 :]]))
        return torch.stack(sample_embeddings), torch.stack(sample_masks)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        image_embeddings: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Compute next-token logits, splicing the image at the placeholder of `input_ids`.

        Parameters
        ----------
        input_ids : torch.LongTensor, optional
            Shape (batch, seq_len). With `images` or `image_embeddings`, each sample contains one
            IMAGE_TOKEN_INDEX, and the sequence grows by num_patches - 1.
        images : torch.Tensor, optional
            Shape (2, batch, 3, image_size, image_size): current images at index 0, priors at 1.
        attention_mask : torch.Tensor, optional
            Shape (batch, seq_len) over `input_ids`, or over the expanded sequence when
            `inputs_embeds` is given.
        position_ids : torch.LongTensor, optional
            Positions over the expanded sequence, counted from the cache length when None.
        cache : transformers.Cache, optional
            Key/value cache of earlier steps.
        inputs_embeds : torch.Tensor, optional
            Ready input embeddings, shape (batch, seq_len, hidden_size), instead of `input_ids`.
        use_cache : bool, optional
            Return a cache for the next step.
        image_embeddings : torch.Tensor, optional
            Precomputed output of `encode_images` or `fuse_image_features`, instead of `images`.
        logits_to_keep : int
            Compute logits for the last this many positions only, or for all positions when 0.

        Returns
        -------
        transformers.modeling_outputs.CausalLMOutputWithPast
            `logits` of shape (batch, expanded_seq_len, vocab_size) and `cache`.

        Raises
        ------
        ValueError
            If `input_ids` contains a placeholder but no image is given.
        """
        has_placeholder = input_ids is not None and bool((input_ids == IMAGE_TOKEN_INDEX).any())
        if has_placeholder:
            if image_embeddings is None and images is None:
                raise ValueError(
                    f"input_ids contain the image placeholder {IMAGE_TOKEN_INDEX} but no images were given: "
                    "pass images of shape (2, batch, 3, height, width) or image_embeddings."
                )
            if image_embeddings is None:
                image_embeddings = self.encode_images(images)
            inputs_embeds, attention_mask = self.splice_image_embeddings(input_ids, image_embeddings, attention_mask)
            input_ids = None

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        return CausalLMOutputWithPast(logits=logits, cache=outputs.cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        *,
        image_embeddings: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate text after a prompt that contains the image placeholder.

        The image is spliced into the prompt embeddings once, and transformers' GenerationMixin
        then runs the prompt step and the cached one-token steps, with positions that continue
        over the expanded sequence. The key/value cache is on unless `use_cache=False` is passed.

        Parameters
        ----------
        input_ids : torch.LongTensor
            Prompt ids, shape (batch, seq_len), one IMAGE_TOKEN_INDEX per sample.
        images : torch.Tensor, optional
            Shape (2, batch, 3, image_size, image_size): current images at index 0, priors at 1.
        image_embeddings : torch.Tensor, optional
            Precomputed image embeddings, shape (batch, num_patches, hidden_size).
        attention_mask : torch.Tensor, optional
            Shape (batch, seq_len), all ones when None.
        **generate_kwargs
            Passed to `transformers.GenerationMixin.generate`, for example `max_new_tokens`,
            `do_sample`, `temperature`, `top_p`, `stopping_criteria` and `streamer`.

        Returns
        -------
        torch.LongTensor
            The new token ids only, shape (batch, num_new_tokens), without the prompt.

        Raises
        ------
        ValueError
            If neither images nor image embeddings are given.
        """
        if image_embeddings is None and images is None:
            raise ValueError(
                "Libra generation needs an image: pass images of shape (2, batch, 3, height, width) or "
                "image_embeddings."
            )
        if image_embeddings is None:
            image_embeddings = self.encode_images(images)
        inputs_embeds, attention_mask = self.splice_image_embeddings(input_ids, image_embeddings, attention_mask)
        # The released config.json sets use_cache false, which is a training setting.
        generate_kwargs.setdefault("use_cache", True)
        if generate_kwargs.get("pad_token_id") is None and self.generation_config.pad_token_id is None:
            generate_kwargs["pad_token_id"] = self.generation_config.eos_token_id
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    def reset_rotary_embedding(self, device: torch.device | str | None = None) -> None:
        """Recompute the rotary frequency buffers, which a model built on the meta device lacks."""
        self.model.rotary_emb = LlamaRotaryEmbedding(config=self.config).to(device)


__all__ = ["IMAGE_TOKEN_INDEX", "LibraForCausalLM", "LibraLlamaModel", "LibraPreTrainedModel"]
