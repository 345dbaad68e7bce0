"""Tiny random Libra checkpoint in the released folder layout, built offline for tests and demos.

The checkpoint has the real architecture at toy sizes: a 2-layer LLaMA of width 64, the full
54-tensor TAC connector, and a 12-layer Dinov2 of width 32 as its RAD-DINO tower. Its weights are
random, so the text it writes is meaningless, and config.json marks it with
`libra_demo_checkpoint: true`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file as save_safetensors_file
from transformers import Dinov2Config, Dinov2Model

from libra_model.configuration_libra import LibraConfig
from libra_model.modeling_libra import LibraForCausalLM

TINY_VISION_TOWER_FOLDER = "rad-dino-tiny"
TINY_IMAGE_SIZE = 56
TINY_PATCH_SIZE = 14
TINY_VISION_HIDDEN_SIZE = 32
TINY_HIDDEN_SIZE = 64
TINY_VOCAB_SIZE = 512
TINY_PRIOR_BIAS = 0.75
# Believed to be the image mean and std of microsoft/rad-dino (not verified), which is plausible enough for a toy tower.
RAD_DINO_IMAGE_MEAN = [0.5307, 0.5307, 0.5307]
RAD_DINO_IMAGE_STD = [0.2583, 0.2583, 0.2583]

# Training text for the tiny SentencePiece model: invented chest radiograph report sentences plus
# the prompt wording, so that common words become single pieces.
TINY_TOKENIZER_TEXT = """\
The assistant specialized in comparing Chest X-ray images, identifying differences, and noting temporal changes.
USER: Provide a detailed description of the findings in the radiology image. ASSISTANT:
The heart size is normal. The mediastinal and hilar contours are unremarkable.
The lungs are clear without focal consolidation, pleural effusion or pneumothorax.
Compared with the prior radiograph, the right lower lobe opacity has improved.
There is a new small left pleural effusion with adjacent atelectasis.
No acute cardiopulmonary process. Mild bibasilar atelectasis is unchanged.
The endotracheal tube terminates 4 cm above the carina.
A nasogastric tube courses below the diaphragm and out of view.
The right internal jugular central venous catheter ends in the mid superior vena cava.
Moderate cardiomegaly is stable. Pulmonary vascular congestion has decreased.
Patchy opacities in both lower lobes may reflect aspiration or early pneumonia.
There is no free air below the diaphragm. The osseous structures are intact.
Degenerative changes of the thoracic spine are noted.
Median sternotomy wires and mediastinal clips are in place.
The left basilar opacity has resolved since the prior study.
Interval placement of a left chest tube with a decrease of the pneumothorax.
Hyperinflated lungs are consistent with chronic obstructive pulmonary disease.
A 2 cm nodule projects over the right upper lobe; a CT of the chest is recommended.
Small bilateral pleural effusions are similar to the prior exam.
Clinical indication: shortness of breath, fever and cough. Evaluate for pneumonia.
Frontal and lateral views of the chest were obtained. Portable AP view of the chest.
Findings: no change. Impression: stable appearance of the chest.
"""


def build_tiny_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Libra checkpoint, with its own RAD-DINO tower, into `folder`.

    The folder receives config.json, model.safetensors, generation_config.json,
    tokenizer.model, tokenizer_config.json and the tower subfolder `rad-dino-tiny/` (config.json,
    model.safetensors, preprocessor_config.json). config.json sets `mm_vision_tower` to
    "rad-dino-tiny", which the loader resolves relative to the checkpoint folder. No network
    access is needed.

    Parameters
    ----------
    folder : str or pathlib.Path
        Target folder, created when missing. Existing files of the same names are replaced.
    seed : int
        Seed of the random weights. The same seed writes the same weights. The global torch
        random state is left unchanged.

    Returns
    -------
    pathlib.Path
        The checkpoint folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_model = _train_tokenizer(folder)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_vision_tower(folder / TINY_VISION_TOWER_FOLDER)
        config = _tiny_config(vocab_size=tokenizer_model.get_piece_size())
        model = LibraForCausalLM(config)
        # Training starts this bias at 0, and a non-zero value makes the prior change the output.
        with torch.no_grad():
            model.model.mm_projector.LFE_prior_bias.fill_(TINY_PRIOR_BIAS)

    config.save_pretrained(folder)
    save_safetensors_file(
        {key: tensor.contiguous() for key, tensor in model.state_dict().items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    _write_json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": config.max_position_embeddings,
            "padding_side": "right",
            "clean_up_tokenization_spaces": False,
        },
    )
    return folder


def _tiny_config(vocab_size: int) -> LibraConfig:
    return LibraConfig(
        architectures=["LibraLlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        use_cache=False,
        torch_dtype="float32",
        mm_vision_tower=TINY_VISION_TOWER_FOLDER,
        mm_hidden_size=TINY_VISION_HIDDEN_SIZE,
        mm_projector_type="TAC",
        mm_vision_select_layer="all",
        mm_vision_select_feature="patch",
        tokenizer_model_max_length=2048,
        libra_demo_checkpoint=True,
    )


def _train_tokenizer(folder: Path) -> sentencepiece.SentencePieceProcessor:
    """Train a LLaMA-style SentencePiece BPE model and write it as tokenizer.model."""
    model_stream = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_TOKENIZER_TEXT.splitlines()),
        model_writer=model_stream,
        model_type="bpe",
        vocab_size=TINY_VOCAB_SIZE,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model_stream.getvalue())
    return sentencepiece.SentencePieceProcessor(model_proto=model_stream.getvalue())


def _write_vision_tower(tower_folder: Path) -> None:
    """Write a RAD-DINO-shaped Dinov2 (12 layers, patch 14) with a BitImageProcessor config."""
    tower_folder.mkdir(parents=True, exist_ok=True)
    tower_config = Dinov2Config(
        hidden_size=TINY_VISION_HIDDEN_SIZE,
        num_hidden_layers=12,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        layerscale_value=1.0,
    )
    Dinov2Model(tower_config).save_pretrained(tower_folder)
    _write_json(
        tower_folder / "preprocessor_config.json",
        {
            "image_processor_type": "BitImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": TINY_IMAGE_SIZE},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": RAD_DINO_IMAGE_MEAN,
            "image_std": RAD_DINO_IMAGE_STD,
            "do_convert_rgb": True,
        },
    )


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["TINY_IMAGE_SIZE", "TINY_VISION_TOWER_FOLDER", "build_tiny_checkpoint"]
