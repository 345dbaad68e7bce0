"""File store: one DICOM file per instance, at a path built from validated UIDs only.

Promise: `commit_file` returns only after the file's bytes and its directory entry are on
disk (fsync of the file, atomic rename, fsync of the folder), so a crash leaves either the
whole file at its final path or nothing there.

Layout under `<data_dir>/store`::

    <StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    .incoming/<host>-<pid>/   temporary files of one receiving process
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# PS3.5 9.1: components of digits separated by dots, no leading zero in a multi-digit
# component, at most 64 characters in all.
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX_LENGTH = 64


class InvalidUIDError(ValueError):
    """A value that must be a DICOM UID is not one, so it is never used in a path."""


def is_valid_uid(value: object) -> bool:
    """Return True when `value` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return isinstance(value, str) and len(value) <= UID_MAX_LENGTH and bool(_UID_PATTERN.match(value))


def check_uid(keyword: str, value: object) -> str:
    """Return `value` when it is a valid UID, else raise `InvalidUIDError` naming the attribute."""
    if not is_valid_uid(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else f"{str(value)[:80]}..."
        raise InvalidUIDError(
            f"{keyword} {shown!r} is not a valid DICOM UID (digits and dots, at most 64 characters)"
        )
    return value  # type: ignore[return-value]


def make_private_directory(path: Path) -> None:
    """Create `path` and each missing parent with mode 0700 (owner only).

    `Path.mkdir(parents=True)` gives the parents the umask's default mode instead, so with
    a umask of 000 a study folder would become writable by everyone.
    """
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            # Another thread or process created it a moment ago.
            pass


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class FileStore:
    """The folder that contains received instances and written SRs.

    Parameters
    ----------
    root
        The store folder; created with mode 0700 when missing.
    free_disk_reserve_bytes
        Free space below which `has_free_space` returns False.
    """

    def __init__(self, root: Path, free_disk_reserve_bytes: int = 0) -> None:
        self.root = root
        self.free_disk_reserve_bytes = free_disk_reserve_bytes
        # One incoming folder per process, so that processes sharing the store (on one
        # host or several) never remove each other's files in progress.
        self._incoming_parent = root / ".incoming"
        self._host_prefix = f"{socket.gethostname()}-"
        self.incoming_dir = self._incoming_parent / f"{self._host_prefix}{os.getpid()}"
        make_private_directory(self.incoming_dir)
        os.chmod(root, 0o700)

    def relative_path(self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> Path:
        """Return the store path of an instance, relative to the root, from validated UIDs.

        Raises
        ------
        InvalidUIDError
            When any of the three is not a valid UID.
        """
        return Path(
            check_uid("StudyInstanceUID", study_instance_uid),
            check_uid("SeriesInstanceUID", series_instance_uid),
            check_uid("SOPInstanceUID", sop_instance_uid) + ".dcm",
        )

    def absolute(self, relative_path: Path | str) -> Path:
        """Return the absolute path of a store-relative path."""
        return self.root / relative_path

    def has_free_space(self) -> bool:
        """Return False when the store's file system has less free space than the reserve."""
        return shutil.disk_usage(self.root).free >= self.free_disk_reserve_bytes

    def new_temporary_path(self, suffix: str = ".part") -> Path:
        """Return a fresh path in the incoming folder, on the same file system as the store."""
        return self.incoming_dir / f"{os.getpid()}-{os.urandom(8).hex()}{suffix}"

    def commit_file(self, temporary_path: Path, relative_path: Path) -> Path:
        """Move a complete temporary file to its final path durably and return that path.

        The file is fsynced, renamed atomically (replacing nothing: an existing final file
        raises FileExistsError), and the folder entry is fsynced.
        """
        final_path = self.root / relative_path
        make_private_directory(final_path.parent)
        descriptor = os.open(temporary_path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.chmod(temporary_path, 0o600)
        # os.link fails when the target exists, which makes the move exclusive; the
        # temporary name is then removed.
        os.link(temporary_path, final_path)
        os.unlink(temporary_path)
        _fsync_directory(final_path.parent)
        return final_path

    def remove(self, relative_path: Path | str) -> None:
        """Delete a stored file if it exists (used only before its index row is committed)."""
        try:
            (self.root / relative_path).unlink()
        except FileNotFoundError:
            pass

    def remove_stale_incoming(self, max_age_seconds: float) -> int:
        """Delete this process's temporary files not written to for `max_age_seconds`.

        A file that is still being received is written to at least once per network
        timeout, so a file older than that belongs to an association that is gone.
        Returns the number of files removed.
        """
        removed = 0
        cutoff = time.time() - max_age_seconds
        for path in self.incoming_dir.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.warning("store.stale_incoming_removed", removed_files=removed)
        return removed

    def clean_incoming(self) -> int:
        """Delete the incoming folders of this host's processes that no longer run.

        Returns the number of files removed. Folders of other hosts are left alone, because
        their processes may still be receiving.
        """
        removed = 0
        for folder in self._incoming_parent.iterdir():
            pid_text = folder.name.removeprefix(self._host_prefix)
            if folder == self.incoming_dir or pid_text == folder.name or not pid_text.isdigit():
                continue
            if _process_exists(int(pid_text)):
                continue
            removed += sum(1 for path in folder.rglob("*") if path.is_file())
            shutil.rmtree(folder, ignore_errors=True)
        if removed:
            log.info("store.incoming_cleaned", removed_files=removed)
        return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
