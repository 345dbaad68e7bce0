"""Calling AE titles and destinations in the TOML configuration file, edited in place.

Edits go through tomlkit, so the file keeps its comments, key order and formatting. Every
edit validates the whole new document as the node would at start. It then writes the file
atomically (temporary file, fsync, rename, same mode) under an exclusive lock on the file's
folder, so that the command line and the HTTP API never overwrite each other's edit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
import tomlkit
from pydantic import ValidationError
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Comment, Table, Whitespace

from node.config import (
    CallerSettings,
    ConfigError,
    DestinationSettings,
    NodeConfig,
    parse_config,
    validate_ae_title,
)
from node.sender import echo

log = structlog.get_logger(__name__)


class AEConfigError(ConfigError):
    """An AE edit that is invalid or does not match the file; the message names the entry."""


@dataclass(frozen=True)
class EchoResult:
    """The outcome of a C-ECHO to a destination."""

    destination: str
    ae_title: str
    host: str
    port: int
    status: int | None
    round_trip_ms: float

    @property
    def succeeded(self) -> bool:
        """Whether the destination returned Success (0x0000)."""
        return self.status == 0

    def as_dict(self) -> dict:
        """Return the result as JSON-compatible values."""
        return {
            "destination": self.destination,
            "ae_title": self.ae_title,
            "host": self.host,
            "port": self.port,
            "status": f"0x{self.status:04X}" if self.status is not None else None,
            "succeeded": self.succeeded,
            "round_trip_ms": round(self.round_trip_ms, 1),
        }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    descriptor = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _read_document(path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AEConfigError(f"configuration file {path} not found; copy config/node.toml and edit it") from exc
    except TOMLKitError as exc:
        raise AEConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc


def _write_document(path: Path, document: tomlkit.TOMLDocument) -> None:
    """Validate the document as the node would, then replace the file atomically."""
    parse_config(document.unwrap(), source=f"configuration file {path} after the edit")
    mode = stat.S_IMODE(path.stat().st_mode)
    temporary_path = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(temporary_path, "w", encoding="utf-8") as file:
            file.write(tomlkit.dumps(document))
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary_path, mode)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    descriptor = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _pop_trailing_trivia(table: Table) -> list:
    """Remove and return the comments and blank lines at the end of a table.

    tomlkit keeps a comment that introduces the next table as the trailing part of the
    table before it, so that trivia moves along when entries are added or removed.
    """
    body = table.value.body
    trivia = []
    while body and body[-1][0] is None and isinstance(body[-1][1], (Comment, Whitespace)):
        trivia.insert(0, body.pop()[1])
    return trivia


def _append_trivia(table: Table, trivia: list) -> None:
    for item in trivia:
        table.value.body.append((None, item))


def _table_before(document: tomlkit.TOMLDocument, key: str) -> Table | None:
    """Return the table that precedes the array of tables `key` in the document, if any."""
    previous = None
    for item_key, item in document.body:
        if item_key is not None and item_key.key == key:
            return previous
        if isinstance(item, Table):
            previous = item
        elif isinstance(item, AoT) and len(item):
            previous = item[-1]
    return None


def _append_entry(document: tomlkit.TOMLDocument, key: str, entry: Table) -> None:
    """Append an entry to an array of tables, keeping the comment that follows the array after it."""
    if key not in document:
        document.append(key, tomlkit.aot())
    entries = document[key]
    trivia = _pop_trailing_trivia(entries[-1]) if len(entries) else []
    if len(entries):
        entries[-1].add(tomlkit.nl())
    entries.append(entry)
    _append_trivia(entries[-1], trivia or [tomlkit.nl()])


def _remove_entries(document: tomlkit.TOMLDocument, key: str, positions: list[int]) -> None:
    """Remove entries from an array of tables, keeping the comment that follows the array."""
    entries = document[key]
    trivia = _pop_trailing_trivia(entries[-1])
    for index in sorted(positions, reverse=True):
        del entries[index]
    if len(entries):
        _pop_trailing_trivia(entries[-1])
        _append_trivia(entries[-1], trivia)
        return
    previous = _table_before(document, key)
    del document[key]
    if previous is not None:
        _append_trivia(previous, trivia)


def load_entries(path: Path) -> tuple[list[CallerSettings], list[DestinationSettings]]:
    """Return the validated `[[callers]]` and `[[destinations]]` entries of a configuration file.

    Raises
    ------
    ConfigError
        When the file is missing, is not TOML or contains an invalid value.
    """
    config: NodeConfig = parse_config(_read_document(path).unwrap(), source=f"configuration file {path}")
    return list(config.callers), list(config.destinations)


def add_caller(path: Path, ae_title: str, host: str = "") -> CallerSettings:
    """Allow a calling AE title, optionally only from one host, and return the new entry.

    Raises
    ------
    AEConfigError
        When the title is invalid or the same title and host are already allowed.
    """
    try:
        ae_title = validate_ae_title(ae_title)
    except ValueError as exc:
        raise AEConfigError(f"calling AE title not added: {exc}") from exc
    host = host.strip()
    with _locked(path):
        document = _read_document(path)
        for caller in document.get("callers", []):
            if caller.get("ae_title", "").strip() == ae_title and caller.get("host", "") == host:
                where = f" from {host}" if host else ""
                raise AEConfigError(f"calling AE title {ae_title!r}{where} is already allowed in {path}")
        entry = tomlkit.table()
        entry["ae_title"] = ae_title
        entry["host"] = host
        _append_entry(document, "callers", entry)
        _write_document(path, document)
    log.info("admin.caller_added", calling_ae_title=ae_title, peer_host=host, config_path=str(path))
    return CallerSettings(ae_title=ae_title, host=host)


def remove_caller(path: Path, ae_title: str, host: str | None = None, allow_any_caller: bool = False) -> int:
    """Remove the `[[callers]]` entries of a calling AE title and return how many were removed.

    Parameters
    ----------
    host
        Remove only the entry bound to this host; None removes the title's entries for every host.
    allow_any_caller
        Allow removing the last entry. With no entries left, every calling AE title may store.

    Raises
    ------
    AEConfigError
        When no entry matches, or when the last entry would go without `allow_any_caller`.
    """
    ae_title = ae_title.strip()
    with _locked(path):
        document = _read_document(path)
        callers = document.get("callers", [])
        keep = [
            index
            for index, caller in enumerate(callers)
            if not (caller.get("ae_title", "").strip() == ae_title and (host is None or caller.get("host", "") == host))
        ]
        removed = len(callers) - len(keep)
        if removed == 0:
            where = f" from {host}" if host else ""
            raise AEConfigError(f"calling AE title {ae_title!r}{where} is not in {path}; see 'libra-node ae list'")
        if not keep and not allow_any_caller:
            raise AEConfigError(
                f"{ae_title!r} is the last [[callers]] entry; without one, every calling AE title may store. "
                "Add another caller first, or pass --allow-any-caller"
            )
        _remove_entries(document, "callers", [index for index in range(len(callers)) if index not in keep])
        _write_document(path, document)
    log.info("admin.caller_removed", calling_ae_title=ae_title, peer_host=host, removed=removed, config_path=str(path))
    return removed


def make_destination(values: dict) -> DestinationSettings:
    """Validate the keys of a new `[[destinations]]` entry and return it.

    Raises
    ------
    AEConfigError
        With one clause per invalid key: the key, the value and the expected form.
    """
    try:
        return DestinationSettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])} = {error.get('input')!r}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise AEConfigError(f"destination not added: {problems}") from exc


def add_destination(path: Path, destination: DestinationSettings) -> DestinationSettings:
    """Add a `[[destinations]]` entry and return it.

    Raises
    ------
    AEConfigError
        When a destination of that name exists.
    ConfigError
        When the new file would not be valid.
    """
    with _locked(path):
        document = _read_document(path)
        if any(item.get("name") == destination.name for item in document.get("destinations", [])):
            raise AEConfigError(
                f"destination {destination.name!r} already exists in {path}; remove it first or choose another name"
            )
        entry = tomlkit.table()
        entry["name"] = destination.name
        entry["ae_title"] = destination.ae_title
        entry["host"] = destination.host
        entry["port"] = destination.port
        entry["sr_class"] = destination.sr_class.value
        _append_entry(document, "destinations", entry)
        _write_document(path, document)
    log.info(
        "admin.destination_added",
        destination=destination.name,
        called_ae_title=destination.ae_title,
        peer_host=destination.host,
        peer_port=destination.port,
        config_path=str(path),
    )
    return destination


def remove_destination(path: Path, name: str) -> None:
    """Remove the `[[destinations]]` entry with this name.

    Pending deliveries to it are marked failed by the sender once the node reloads, with the
    reason that the destination is no longer configured.

    Raises
    ------
    AEConfigError
        When no destination has this name.
    """
    with _locked(path):
        document = _read_document(path)
        destinations = document.get("destinations", [])
        positions = [index for index, item in enumerate(destinations) if item.get("name") == name]
        if not positions:
            raise AEConfigError(f"destination {name!r} is not in {path}; see 'libra-node ae list'")
        _remove_entries(document, "destinations", positions)
        _write_document(path, document)
    log.info("admin.destination_removed", destination=name, config_path=str(path))


def echo_destination(
    destination: DestinationSettings, calling_ae_title: str, timeout_seconds: float | None = None
) -> EchoResult:
    """Send a C-ECHO to a destination and return its status and round-trip time.

    The time covers the whole exchange: association, C-ECHO and release.
    """
    started = time.monotonic()
    status = echo(
        destination.host,
        destination.port,
        destination.ae_title,
        calling_ae_title,
        timeout_seconds=timeout_seconds or destination.timeout_seconds,
    )
    round_trip_ms = (time.monotonic() - started) * 1000
    log.info(
        "admin.echo_sent",
        destination=destination.name,
        called_ae_title=destination.ae_title,
        peer_host=destination.host,
        peer_port=destination.port,
        status=f"0x{status:04X}" if status is not None else None,
        round_trip_ms=round(round_trip_ms, 1),
    )
    return EchoResult(destination.name, destination.ae_title, destination.host, destination.port, status, round_trip_ms)
