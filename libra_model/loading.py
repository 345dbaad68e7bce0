"""Local-only loading and saving of Libra checkpoints in the released folder layout.

A checkpoint folder contains config.json and the weights as one `model.safetensors`, safetensors
shards with `model.safetensors.index.json`, one `pytorch_model.bin`, or .bin shards with
`pytorch_model.bin.index.json`. Nothing is downloaded. Loading fails on any missing key, and on
any unexpected key except the vision tower copy `model.vision_tower.vision_tower.*`, which is
ignored because the tower is loaded from its own RAD-DINO folder, as the release does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import structlog
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file
from transformers import GenerationConfig

from libra_model.configuration_libra import LibraConfig
from libra_model.modeling_libra import VISION_TOWER_KEY_PREFIX, LibraForCausalLM
from libra_model.vision_tower import check_vision_tower_folder, resolve_vision_tower_folder

log = structlog.get_logger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
WEIGHT_LAYOUTS = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, BIN_FILE, BIN_INDEX_FILE)
HASH_CHUNK_BYTES = 8 * 1024 * 1024
MAX_KEYS_IN_MESSAGE = 10


class CheckpointFileNotFoundError(FileNotFoundError):
    """A file that a Libra checkpoint folder must contain is missing."""


class CheckpointKeyMismatchError(ValueError):
    """The checkpoint weights lack keys that the model needs, or contain keys it does not know."""


def find_weight_files(folder: Path) -> list[Path]:
    """List the weight files of a checkpoint folder, in sorted order.

    The layouts are tried in this order: `model.safetensors`, `model.safetensors.index.json`,
    `pytorch_model.bin`, `pytorch_model.bin.index.json`. The first one present wins.

    Parameters
    ----------
    folder : pathlib.Path
        The checkpoint folder.

    Returns
    -------
    list of pathlib.Path
        One file, or every shard named in the index.

    Raises
    ------
    CheckpointFileNotFoundError
        If no layout is present, or a shard named in the index is missing.
    """
    for name in WEIGHT_LAYOUTS:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        shard_paths = sorted({folder / shard_name for shard_name in weight_map.values()})
        for shard_path in shard_paths:
            if not shard_path.is_file():
                raise CheckpointFileNotFoundError(
                    f"weight shard {shard_path.name} listed in {name} is missing from {folder}: copy the "
                    "complete checkpoint into that folder."
                )
        return shard_paths
    raise CheckpointFileNotFoundError(
        f"no weights found in {folder}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE}, {BIN_FILE} or "
        f"{BIN_INDEX_FILE}: copy the checkpoint weights into that folder."
    )


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Read one safetensors or .bin weight file onto the CPU.

    A .bin file is read with `weights_only=True`, so it cannot run code.
    """
    if path.name.endswith(".safetensors"):
        return load_safetensors_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def compute_checkpoint_sha256(config_path: Path, weight_files: list[Path]) -> str:
    """Return the SHA-256 (hex) of config.json followed by the weight files in sorted name order.

    The file contents are streamed into one digest, without file names or separators. Index
    files are not hashed, since the shards they list are.
    """
    digest = hashlib.sha256()
    for path in [config_path, *sorted(weight_files, key=lambda item: item.name)]:
        with path.open("rb") as stream:
            while chunk := stream.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_dtype(torch_dtype: torch.dtype | str | None, config: LibraConfig | None) -> torch.dtype:
    """Turn a dtype argument into a torch dtype: None is float32, "auto" is the config dtype.

    `config` is read only for "auto", and without a config "auto" means float32.

    Raises
    ------
    ValueError
        If a string names no floating-point torch dtype.
    """
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        config_dtype = config.dtype if config is not None else None
        if isinstance(config_dtype, torch.dtype):
            return config_dtype
        torch_dtype = config_dtype or "float32"
    resolved = getattr(torch, str(torch_dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"torch_dtype {torch_dtype!r} is not a floating-point torch dtype: use float32, float16, "
            "bfloat16 or \"auto\"."
        )
    return resolved


def resolve_device(device_map: str | torch.device | None) -> torch.device:
    """Turn a device argument into one torch device: None is the CPU, "auto" is CUDA when present.

    Raises
    ------
    ValueError
        If `device_map` is a per-module mapping, which this loader does not support.
    """
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, torch.device):
        return device_map
    if not isinstance(device_map, str):
        # NOTE: the whole model goes to one device, because per-module maps that split the LLM are not supported.
        raise ValueError(
            f"device_map {device_map!r} is not supported: pass one device such as \"cuda:0\" or \"cpu\", "
            "or \"auto\"."
        )
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def load_libra_checkpoint(
    folder: str | Path,
    *,
    vision_tower: str | Path | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: str | torch.device | None = None,
) -> LibraForCausalLM:
    """Load a Libra checkpoint folder and its RAD-DINO tower, using local files only.

    The model is built on the meta device, and each weight file is read, cast and assigned in
    turn, so peak memory stays near one model copy plus one shard.

    Parameters
    ----------
    folder : str or pathlib.Path
        The checkpoint folder (config.json plus weights).
    vision_tower : str or pathlib.Path, optional
        Local RAD-DINO folder, which replaces `mm_vision_tower` from config.json.
    torch_dtype : torch.dtype or str, optional
        See `resolve_dtype`.
    device_map : str or torch.device, optional
        See `resolve_device`.

    Returns
    -------
    LibraForCausalLM
        The model in eval mode with the tower attached, `checkpoint_folder` and
        `checkpoint_sha256` set.

    Raises
    ------
    CheckpointFileNotFoundError
        If the folder, config.json or a weight file is missing.
    CheckpointKeyMismatchError
        If keys are missing, or unexpected keys other than the tower copy are present.
    libra_model.vision_tower.VisionTowerNotFoundError
        If no local RAD-DINO folder is found or it lacks a file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointFileNotFoundError(
            f"Libra checkpoint folder {folder} does not exist: download the checkpoint (config.json and "
            "weights) into a local folder and pass that folder."
        )
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointFileNotFoundError(
            f"{CONFIG_FILE} is missing from {folder}: copy the checkpoint's config.json into that folder."
        )
    config = LibraConfig.from_pretrained(folder, local_files_only=True)
    weight_files = find_weight_files(folder)

    # Check the tower files before the slow weight reading, so a missing tower fails at once.
    tower_folder = resolve_vision_tower_folder(config.mm_vision_tower, folder, vision_tower)
    check_vision_tower_folder(tower_folder)

    dtype = resolve_dtype(torch_dtype, config)
    device = resolve_device(device_map)
    with torch.device("meta"):
        model = LibraForCausalLM(config)
    load_weights(model, weight_files, dtype=dtype, device=device)

    model.checkpoint_folder = folder
    model.checkpoint_sha256 = compute_checkpoint_sha256(config_path, weight_files)
    if (folder / GENERATION_CONFIG_FILE).is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    model.attach_vision_tower(tower_folder)
    model.eval()
    log.info(
        "loading.checkpoint_loaded",
        folder=str(folder),
        num_weight_files=len(weight_files),
        dtype=str(dtype),
        device=str(device),
        checkpoint_sha256=model.checkpoint_sha256,
    )
    return model


def load_weights(
    model: LibraForCausalLM,
    weight_files: list[Path],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Assign the tensors of `weight_files` to a model built on the meta device.

    Floating-point tensors are cast to `dtype` and every tensor is moved to `device`. With
    `tie_word_embeddings` set and no `lm_head.weight` in the files, the head shares the
    embedding table.

    Raises
    ------
    CheckpointKeyMismatchError
        If keys are missing, or unexpected keys other than the tower copy are present.
    """
    expected_keys = set(model.state_dict().keys())
    loaded_keys: set[str] = set()
    unexpected_keys: list[str] = []
    ignored_tower_keys = 0

    for path in weight_files:
        part: dict[str, torch.Tensor] = {}
        for key, tensor in read_weight_file(path).items():
            if key.startswith(VISION_TOWER_KEY_PREFIX):
                ignored_tower_keys += 1
                continue
            if key not in expected_keys:
                unexpected_keys.append(key)
                continue
            target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
            part[key] = tensor.to(device=device, dtype=target_dtype)
        model.load_state_dict(part, strict=False, assign=True)
        loaded_keys.update(part)

    if unexpected_keys:
        raise CheckpointKeyMismatchError(
            f"{len(unexpected_keys)} checkpoint keys are not part of the Libra model, for example "
            f"{sorted(unexpected_keys)[:MAX_KEYS_IN_MESSAGE]}: check that config.json (mm_projector_type, "
            "num_hidden_layers, sizes) matches the weights."
        )
    if model.config.tie_word_embeddings and "lm_head.weight" not in loaded_keys:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded_keys.add("lm_head.weight")
    missing_keys = sorted(expected_keys - loaded_keys)
    if missing_keys:
        raise CheckpointKeyMismatchError(
            f"{len(missing_keys)} model keys are missing from the checkpoint weights, for example "
            f"{missing_keys[:MAX_KEYS_IN_MESSAGE]}: copy every weight shard, and check that config.json "
            "matches the weights."
        )
    model.reset_rotary_embedding(device)
    if ignored_tower_keys:
        log.info("loading.vision_tower_copy_ignored", num_keys=ignored_tower_keys)


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    folder: Path,
    *,
    max_shard_bytes: int | None = None,
    serialization: str = "safetensors",
) -> list[Path]:
    """Write weights in the released layout: one file, or shards plus an index file.

    Parameters
    ----------
    state_dict : dict of str to torch.Tensor
        Tensors by key.
    folder : pathlib.Path
        Target folder, which must exist.
    max_shard_bytes : int, optional
        Maximum bytes per shard, or None for one file. A tensor larger than this gets a shard of
        its own.
    serialization : str
        "safetensors" (`model.safetensors`, `model-0000i-of-0000n.safetensors`) or "bin"
        (`pytorch_model.bin`, `pytorch_model-0000i-of-0000n.bin`).

    Returns
    -------
    list of pathlib.Path
        The weight files written, without the index.

    Raises
    ------
    ValueError
        If `serialization` is neither "safetensors" nor "bin".
    """
    if serialization not in ("safetensors", "bin"):
        raise ValueError(f"serialization {serialization!r} is not supported: use \"safetensors\" or \"bin\".")
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in state_dict.items()}
    shards = _split_into_shards(tensors, max_shard_bytes)

    stem, suffix = ("model", "safetensors") if serialization == "safetensors" else ("pytorch_model", "bin")
    if len(shards) == 1 and max_shard_bytes is None:
        names = [f"{stem}.{suffix}"]
    else:
        names = [f"{stem}-{index:05d}-of-{len(shards):05d}.{suffix}" for index in range(1, len(shards) + 1)]

    paths = []
    for name, shard in zip(names, shards):
        path = folder / name
        if serialization == "safetensors":
            # Tied or viewed tensors share storage, which safetensors rejects, so each gets its own copy.
            save_safetensors_file({key: tensor.clone() for key, tensor in shard.items()}, path, metadata={"format": "pt"})
        else:
            torch.save(shard, path)
        paths.append(path)

    if len(names) > 1 or max_shard_bytes is not None:
        index = {
            "metadata": {"total_size": sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        index_name = SAFETENSORS_INDEX_FILE if serialization == "safetensors" else BIN_INDEX_FILE
        (folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def _split_into_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_shard_bytes is None:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in tensors.items():
        tensor_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + tensor_bytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += tensor_bytes
    return shards


__all__ = [
    "CheckpointFileNotFoundError",
    "CheckpointKeyMismatchError",
    "compute_checkpoint_sha256",
    "find_weight_files",
    "load_libra_checkpoint",
    "read_weight_file",
    "save_state_dict",
]
