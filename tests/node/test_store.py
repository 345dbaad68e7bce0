"""File store: UID checks keep paths safe, and commits are exclusive and durable."""

from __future__ import annotations

import os

import pytest

from node.store import FileStore, InvalidUIDError, is_valid_uid


@pytest.mark.parametrize(
    "value",
    ["1.2.abc", "1..2", "1.2/3", "../1.2", "1.2.", ".1.2", "1.02", "1." + "2" * 63, "", "1.2 3"],
)
def test_store_rejects_invalid_uid(value, tmp_path):
    store = FileStore(tmp_path / "store")
    with pytest.raises(InvalidUIDError):
        store.relative_path(value, "1.2.3", "1.2.4")


@pytest.mark.parametrize("value", ["1.2.840.10008.5.1.4.1.1.1", "0", "2.25.329800735698586629295641978511506172918"])
def test_uid_valid_values_accepted(value):
    assert is_valid_uid(value)


def test_store_commit_moves_file_with_owner_only_mode(tmp_path):
    store = FileStore(tmp_path / "store")
    temporary = store.new_temporary_path()
    temporary.write_bytes(b"content")
    final = store.commit_file(temporary, store.relative_path("1.2", "1.3", "1.4"))
    assert final.read_bytes() == b"content"
    assert not temporary.exists()
    assert final.stat().st_mode & 0o777 == 0o600


def test_store_commit_never_overwrites(tmp_path):
    store = FileStore(tmp_path / "store")
    relative = store.relative_path("1.2", "1.3", "1.4")
    first = store.new_temporary_path()
    first.write_bytes(b"first")
    store.commit_file(first, relative)
    second = store.new_temporary_path()
    second.write_bytes(b"second")
    with pytest.raises(FileExistsError):
        store.commit_file(second, relative)
    assert store.absolute(relative).read_bytes() == b"first"


def test_store_cleans_incoming_of_dead_process(tmp_path):
    root = tmp_path / "store"
    store = FileStore(root)
    dead_folder = store.incoming_dir.parent / f"{store.incoming_dir.name.rsplit('-', 1)[0]}-999999999"
    dead_folder.mkdir()
    (dead_folder / "partial.dcm").write_bytes(b"partial")
    own_file = store.new_temporary_path()
    own_file.write_bytes(b"in progress")
    assert store.clean_incoming() == 1
    assert not dead_folder.exists()
    assert own_file.exists()


def test_store_folder_is_owner_only(tmp_path):
    store = FileStore(tmp_path / "store")
    assert os.stat(store.root).st_mode & 0o777 == 0o700
