"""Cache of connector-ready image features (the LFE output), keyed by SOP Instance UID.

The features of one image depend only on that image, the checkpoint, the RAD-DINO weights, the
DICOM conversion and the dtype, so a follow-up study can reuse its prior's features instead of
running the vision encoder again. The cache keeps recent entries in memory (an LRU) and, when
given a folder, every entry on disk as one safetensors file, so that the features outlive the
worker process and are shared by workers that share the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from pathlib import Path

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file

log = structlog.get_logger(__name__)

FEATURES_TENSOR_NAME = "features"
# PS3.5 9.1: digits and dots, at most 64 characters; such keys are safe file names as they are.
_UID_KEY_PATTERN = re.compile(r"^[0-9][0-9.]{0,63}$")


def cache_file_name(key: str) -> str:
    """Return the file name of a key: the key itself when it is a UID, else its SHA-256."""
    stem = key if _UID_KEY_PATTERN.match(key) else hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{stem}.safetensors"


def _make_private_directory(folder: Path) -> None:
    """Create `folder` and each missing parent with mode 0700, which `mkdir(parents=True)`
    gives only to the last folder."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            # Another process sharing the folder created it a moment ago.
            pass


class FeatureCache:
    """Image features by key: an LRU of `max_entries` in memory, backed by `folder` when one is given.

    One cache serves one thread at a time. Several processes may share a folder, because each
    file is written under a temporary name and renamed into place.

    Parameters
    ----------
    max_entries : int
        Entries kept in memory; 0 keeps none in memory (the folder, if any, still works).
    folder : pathlib.Path, optional
        Folder of the on-disk entries, created when missing. It must be specific to one model
        identity (checkpoint, RAD-DINO weights, DICOM conversion, dtype); `ReportGenerator`
        names a subfolder after that identity.

    Notes
    -----
    NOTE: the folder has no size limit: it grows by one file per cached image (about 4.2 MB in
    float32 or 2.1 MB in bfloat16 for RAD-DINO at 518 px), until an operator deletes old files.
    """

    def __init__(self, max_entries: int, folder: Path | None = None) -> None:
        if max_entries < 0:
            raise ValueError(f"feature cache size {max_entries} is negative: use 0 to keep no entries in memory.")
        self.max_entries = max_entries
        self.folder = folder
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        if folder is not None:
            _make_private_directory(folder)

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """Return the features of `key` on `device` in `dtype`, or None when they are not cached.

        An unreadable file is logged, deleted and treated as missing.
        """
        features = self._memory.get(key)
        if features is not None:
            self._memory.move_to_end(key)
            return features
        if self.folder is None:
            return None
        path = self.folder / cache_file_name(key)
        try:
            features = load_safetensors_file(path, device=str(device))[FEATURES_TENSOR_NAME]
        except FileNotFoundError:
            return None
        except (OSError, SafetensorError, KeyError) as exc:
            log.warning("feature_cache.entry_unreadable", path=str(path), exc_info=exc)
            path.unlink(missing_ok=True)
            return None
        features = features.to(dtype=dtype)
        self._remember(key, features)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store the features of one image, shape (1, num_patches, mm_hidden_size).

        A failed disk write is logged and leaves the entry in memory only.
        """
        self._remember(key, features)
        if self.folder is None:
            return
        path = self.folder / cache_file_name(key)
        temporary_path = self.folder / f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
        try:
            save_safetensors_file({FEATURES_TENSOR_NAME: features.detach().contiguous().cpu()}, temporary_path)
            # Features of patient images are readable by the node's user only, whatever the umask.
            os.chmod(temporary_path, 0o600)
            os.replace(temporary_path, path)
        except OSError as exc:
            log.warning("feature_cache.write_failed", path=str(path), exc_info=exc)
            temporary_path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Drop the entries held in memory; files on disk stay."""
        self._memory.clear()

    def _remember(self, key: str, features: torch.Tensor) -> None:
        if self.max_entries == 0:
            return
        self._memory[key] = features
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)


__all__ = ["FeatureCache", "cache_file_name"]
